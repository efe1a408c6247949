"""Reading the source dataset of `axf synthesize`: only the train normals and the generator fold.

The source has the MVTec Caption columns (``image, mask, caption, category, defect_type, is_anomaly,
fold``, optional ``path``) in a ``train`` split (normals) and a ``test`` split. Metadata columns are read
for every row (to index and to name what is missing); image bytes only for train normals and generator-
fold anomalies: the evaluation fold's pixels are never read.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import PIL.Image

from mvtec_caption._io import load_source

from .core import SynthesisError

REQUIRED = {
    "train": ("image", "category", "is_anomaly"),
    "test": ("image", "mask", "caption", "category", "defect_type", "is_anomaly", "fold"),
}
HELD_OUT_EVERY = 5  # the last floor(n / 5) train normals of a category become test/good, never a base


def _load(dataset: str, config: str):
    import datasets

    try:
        return load_source(dataset, config)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise SynthesisError(f"--dataset {dataset} (config {config!r}) cannot be loaded: {err}") from None


def _decode(value, mode: str) -> PIL.Image.Image:
    """An undecoded ``datasets.Image`` cell ({bytes, path}) as a PIL image in ``mode``."""
    if value.get("bytes") is not None:
        image = PIL.Image.open(io.BytesIO(value["bytes"]))
    else:
        image = PIL.Image.open(value["path"])
    return image.convert(mode)


class SourceData:
    """Index of a source dataset by category and defect type, decoding images only on request."""

    def __init__(self, dataset: str, config: str):
        import datasets

        data = _load(dataset, config)
        self.name = f"{dataset} ({config})"
        if not isinstance(data, datasets.DatasetDict):
            raise SynthesisError(f"--dataset {self.name} must have train and test splits, got one Dataset")
        for split, columns in REQUIRED.items():
            if split not in data:
                raise SynthesisError(f"--dataset {self.name} has no {split!r} split; it has {sorted(data)}")
            if missing := [c for c in columns if c not in data[split].column_names]:
                raise SynthesisError(
                    f"--dataset {self.name}: the {split} split lacks the column(s) {', '.join(missing)} "
                    f"(synthesis needs {', '.join(columns)})"
                )
        image_columns = {"train": ("image",), "test": ("image", "mask")}
        self.splits = {}
        for split, columns in image_columns.items():
            ds = data[split]
            for column in columns:
                ds = ds.cast_column(column, datasets.Image(decode=False))
            self.splits[split] = ds
        meta = {
            split: self.splits[split]
            .select_columns([c for c in ("category", "defect_type", "is_anomaly", "fold", "caption", "path")
                             if c in self.splits[split].column_names])
            .to_list()
            for split in self.splits
        }  # fmt: skip
        self.rows = meta
        self.normals: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(meta["train"]):
            if not r["is_anomaly"]:
                self.normals[r["category"]].append(i)
        self.generator: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.all_types: dict[str, set[str]] = defaultdict(set)
        for i, r in enumerate(meta["test"]):
            if r["is_anomaly"]:
                self.all_types[r["category"]].add(r["defect_type"])
                if r["fold"] == "generator":
                    self.generator[(r["category"], r["defect_type"])].append(i)
        self._sizes: dict[int, tuple[int, int]] = {}
        self._masks: dict[tuple[str, str], list[np.ndarray]] = {}

    @property
    def categories(self) -> list[str]:
        return sorted(set(self.normals) | set(self.all_types))

    def bases_and_held_out(self, category: str) -> tuple[list[int], list[int]]:
        """Train normals used as bases, and the held-out ones (the last floor(n / 5)) for test/good."""
        normals = self.normals.get(category, [])
        held = len(normals) // HELD_OUT_EVERY
        return normals[: len(normals) - held], normals[len(normals) - held :]

    def path(self, split: str, index: int) -> str:
        return self.rows[split][index].get("path") or f"{split}[{index}]"

    def caption(self, index: int) -> str:
        return self.rows["test"][index]["caption"]

    def normal_size(self, index: int) -> tuple[int, int]:
        """(width, height) of a train image from its header."""
        if index not in self._sizes:
            value = self.splits["train"][index]["image"]
            source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
            with PIL.Image.open(source) as image:
                self._sizes[index] = image.size
        return self._sizes[index]

    def normal(self, index: int) -> PIL.Image.Image:
        return _decode(self.splits["train"][index]["image"], "RGB")

    def normal_bytes(self, index: int) -> bytes:
        value = self.splits["train"][index]["image"]
        return value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()

    def anomaly(self, index: int) -> tuple[PIL.Image.Image, PIL.Image.Image]:
        """A generator-fold anomaly and its mask (refuses any other row: the evaluation fold stays unread)."""
        if self.rows["test"][index]["fold"] != "generator":
            raise SynthesisError(f"{self.path('test', index)} is not in the generator fold")
        row = self.splits["test"][index]
        return _decode(row["image"], "RGB"), _decode(row["mask"], "L")

    def generator_masks(self, category: str, defect: str) -> list[np.ndarray]:
        key = (category, defect)
        if key not in self._masks:
            masks = []
            for index in self.generator[key]:
                mask = np.asarray(self.anomaly(index)[1]) > 0
                if not mask.any():
                    raise SynthesisError(f"generator-fold mask of {self.path('test', index)} is empty")
                masks.append(mask)
            self._masks[key] = masks
        return self._masks[key]
