"""What a synthesis output was made from, by content rather than by the path typed.

A rerun resumes only against the same weights and the same data: a model retrained in place, or a dataset
rebuilt under the same folder, gets a new fingerprint and the rerun is refused, so an output folder never
mixes two models. The hash and the publishable name live in :mod:`axf_pipeline.publishing`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from ..publishing import content_hash, publishable_name

__all__ = [
    "content_hash",
    "dataset_fingerprint",
    "files_fingerprint",
    "model_fingerprint",
    "publishable_name",
]


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
