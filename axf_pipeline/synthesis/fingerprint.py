"""What a synthesis output was made from, by content rather than by the path typed.

A rerun resumes only against the same weights and the same data: a model retrained in place, or a dataset
rebuilt under the same folder, gets a new fingerprint and the rerun is refused, so an output folder never
mixes two models. The same hash names a local model in provenance without its path
(``<folder base name>@sha256:<12 hex digits>``).

TODO(merge with branch ``pkg``): :func:`content_hash` and :func:`publishable_name` follow
``axf_pipeline/publishing.py`` of the packaging work (the same files, the same hash, the same name form);
once that module is on main, import both from there and keep only the fingerprints here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

__all__ = [
    "content_hash",
    "dataset_fingerprint",
    "files_fingerprint",
    "model_fingerprint",
    "publishable_name",
]

HASH_CHARS = 12  # of the sha256 in a publishable name
_SKIPPED = {"README.md", ".gitattributes"}  # a card edit changes no weight or row


def _files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".") and f not in _SKIPPED]
    return found


def _content_files(folder: Path) -> list[Path]:
    """A pipeline: ``model_index.json`` and the component folders it names (not checkpoints or logs beside
    them); any other folder (a dataset export, a ``save_to_disk`` folder, LoRA weights): every file but the
    card and hidden ones."""
    index = folder / "model_index.json"
    if index.is_file():
        components = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list)]
        roots = [folder / name for name in components if (folder / name).is_dir()]
        return [index, *sorted(f for root in roots for f in _files(root))]
    return sorted(_files(folder))


@lru_cache(maxsize=64)
def _hash_files(root: str, stamp: tuple) -> str:
    """sha256 over (relative path, bytes) of the files in ``stamp``; cached while no size or mtime changes."""
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        digest.update(name.encode() + b"\0")
        with open(Path(root) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """sha256 over the files that decide a local model or dataset folder (or one file), paths included."""
    path = Path(path).resolve()
    root, files = (path.parent, [path]) if path.is_file() else (path, _content_files(path))
    stamp = []
    for file in files:
        stat = file.stat()
        stamp.append((file.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return _hash_files(str(root), tuple(stamp))


def publishable_name(reference: str | os.PathLike) -> str:
    """How provenance names a model or dataset: a Hub id as typed, a local file or folder as
    ``<base name>@sha256:<12 hex digits>`` (never its path)."""
    path = Path(reference)
    if not path.exists():
        return str(reference)
    return f"{path.resolve().name}@sha256:{content_hash(path)[:HASH_CHARS]}"


def _hub_commit(repo: str, repo_type: str) -> str:
    """The commit a Hub id resolves to now (the cached one when offline)."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(repo, repo_type=repo_type, allow_patterns=["model_index.json", "README.md"])
    return Path(folder).name


def model_fingerprint(model: str, flag: str = "--model") -> str:
    """``sha256:<hex>`` of a local pipeline (or LoRA) folder's weights and configs; ``hub:<id>@<commit>``
    for a Hub id."""
    from .core import SynthesisError

    if Path(model).exists():
        return f"sha256:{content_hash(model)}"
    try:
        return f"hub:{model}@{_hub_commit(model, 'model')}"
    except Exception as err:  # offline and not cached, unknown repo: say which
        raise SynthesisError(
            f"{flag} {model}: cannot resolve its Hub commit ({type(err).__name__})"
        ) from None


def dataset_fingerprint(dataset: str) -> str:
    """``sha256:<hex>`` of a local dataset's data files (export, ``save_to_disk`` or data-files folder);
    ``hub:<id>@<commit>`` for a Hub id."""
    from .core import SynthesisError

    if Path(dataset).exists():
        return f"sha256:{content_hash(dataset)}"
    try:
        return f"hub:{dataset}@{_hub_commit(dataset, 'dataset')}"
    except Exception as err:
        raise SynthesisError(
            f"--dataset {dataset}: cannot resolve its Hub commit ({type(err).__name__})"
        ) from None


def files_fingerprint(named: Iterable[tuple[str, str | os.PathLike]]) -> str:
    """``sha256:<hex>`` over (name, bytes) of each file: inputs named as the output names them, so the same
    pictures in a moved folder give the same fingerprint."""
    digest = hashlib.sha256()
    for name, path in named:
        digest.update(name.encode() + b"\0" + content_hash(path).encode() + b"\0")
    return f"sha256:{digest.hexdigest()}"
