"""Reading and writing helpers with one home each: the atomic write and the dataset loader (``axf_pipeline``
imports them from here, since ``mvtec_caption`` imports nothing of ``axf_pipeline``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["TMP_TAG", "atomic_write", "load_source"]

# Every temporary name holds this tag and ends in ``.tmp``: ``.<name>.axf-tmp-<pid>.tmp`` beside the target,
# so a folder's owner can recognise (and remove) what a killed write of ours left.
TMP_TAG = ".axf-tmp-"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], durable: bool = False) -> None:
    """``write(tmp)``, then rename ``tmp`` over ``path``: readers see the old file or the new one, never a part.

    ``durable`` also flushes the file to disk before the rename (a power cut keeps it too).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}.tmp")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_source(source, config: str | None = None, cache_dir: str | None = None):
    """The one way a dataset is read by path or Hub id: a ``Dataset``/``DatasetDict`` object as it is, a
    ``save_to_disk`` folder with ``load_from_disk``, anything else with ``load_dataset(source, config)``.

    Errors pass through; each caller names its own argument in the message.
    """
    import datasets

    if isinstance(source, datasets.Dataset | datasets.DatasetDict):
        return source
    path = Path(source)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    if path.is_dir():
        # A local folder's files are named to load_dataset explicitly: with only the folder, datasets keys
        # its cache on the folder's base name and card, so a second `synthetic/` (or one rewritten in
        # place) silently loads the first one's cached rows.
        files = datasets.load_dataset_builder(str(path), config, cache_dir=cache_dir).config.data_files
        if files:
            files = {split: list(found) for split, found in files.items()}
            return datasets.load_dataset(str(path), config, data_files=files, cache_dir=cache_dir)
    return datasets.load_dataset(str(source), config, cache_dir=cache_dir)
