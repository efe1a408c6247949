"""How a model or a dataset is named in anything written for publication (cards, provenance columns).

A local path means nothing on the Hub and tells a stranger where the author keeps their files. A reference is
published as its Hub id where one is known, else as the folder's base name plus a short hash of its content,
so that two different models saved under the same folder name are told apart and a model retrained in place
gets a new name.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

HASH_CHARS = 12
_SKIPPED = {"README.md", ".gitattributes"}


def _content_files(folder: Path) -> list[Path]:
    """What decides a folder's content: a pipeline's ``model_index.json`` and the components it names (not its
    checkpoints, logs or unfused LoRA); any other folder (a component, a dataset export): every file but the
    card and hidden ones."""
    index = folder / "model_index.json"
    if index.is_file():
        components = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list)]
        roots = [folder / name for name in components if (folder / name).is_dir()]
        return [index, *sorted(f for root in roots for f in _files(root))]
    return sorted(_files(folder))


def _files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".") and f not in _SKIPPED]
    return found


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
    """sha256 over the files that decide a local model or dataset folder (or one file), their paths included."""
    path = Path(path).resolve()
    root, files = (path.parent, [path]) if path.is_file() else (path, _content_files(path))
    stamp = []
    for file in files:
        stat = file.stat()
        stamp.append((file.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return _hash_files(str(root), tuple(stamp))


def publishable_name(reference: str | os.PathLike | None, hub_id: str | None = None) -> str | None:
    """The name of a model or dataset reference fit for a card: ``hub_id`` when given; a reference that is not
    a local path (a Hub id) as typed; a local file or folder as ``<base name>@sha256:<12 hex digits>``."""
    if hub_id:
        return hub_id
    if reference is None:
        return None
    path = Path(reference)
    if not path.exists():
        return str(reference)
    return f"{path.resolve().name}@sha256:{content_hash(path)[:HASH_CHARS]}"


def is_local(reference: str | os.PathLike | None) -> bool:
    """Whether a model/dataset reference names a local file or folder (not a Hub id)."""
    return reference is not None and Path(reference).exists()


def drop_local_paths(folder: str | os.PathLike) -> None:
    """Removes the ``_name_or_path`` that diffusers and transformers record in a saved config when it names a
    local folder (where the component was loaded from, on this machine); a Hub id stays."""
    folder = Path(folder)
    for config in sorted({*folder.glob("*.json"), *folder.glob("*/*.json")}):
        try:
            data = json.loads(config.read_text())
        except (UnicodeDecodeError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        local = [
            key
            for key in ("_name_or_path", "name_or_path")
            if isinstance(data.get(key), str) and (os.path.isabs(data[key]) or is_local(data[key]))
        ]
        if local:
            for key in local:
                del data[key]
            tmp = config.with_name(f".{config.name}.tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, config)
