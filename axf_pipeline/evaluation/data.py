"""Where evaluation reads its images: a folder of image/mask pairs or a dataset in the MVTec Caption schema.

Folder layout of generated anomalies (any generator)::

    <root>/<category>/<defect_type>/<name>.png        the image (any PIL-readable extension)
    <root>/<category>/<defect_type>/<name>_mask.png   its binary mask ({0, 255} or {0, 1})

A dataset source is a ``datasets`` dataset with the MVTec Caption columns ``image, mask, category,
defect_type, is_anomaly`` (and ``fold`` for real data): a ``Dataset``/``DatasetDict`` object, a
``save_to_disk`` folder, or anything ``load_dataset(path, config)`` reads (e.g. an export folder).
Real data uses the MVTec Caption splits: ``train`` normals train the localisation model; ``test`` holds
the good test images, the ``generator`` fold (IC-LPIPS centres) and the ``evaluation`` fold (real test).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mvtec_caption._io import load_source as load_dataset_source

from .images import load_mask, to_rgb_uint8

__all__ = [
    "RealData",
    "Sample",
    "check_anomalies",
    "load_anomalies",
    "load_anomaly_folder",
    "load_dataset_source",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MASK_SUFFIX = "_mask"
REQUIRED_COLUMNS = ("image", "mask", "category", "defect_type", "is_anomaly")


@dataclass
class Sample:
    """One image with its mask; ``image``/``mask`` are paths, arrays, PIL images or ``(dataset, row)``."""

    image: Any
    mask: Any
    category: str
    defect_type: str
    source: str = ""

    def _resolve(self, value, column: str):
        if isinstance(value, tuple) and len(value) == 2 and hasattr(value[0], "column_names"):
            dataset, row = value
            return dataset[row][column]
        return value

    def load_image(self) -> np.ndarray:
        return to_rgb_uint8(self._resolve(self.image, "image"), name=f"image of {self.source}")

    def load_mask(self, size: tuple[int, int] | None = None) -> np.ndarray:
        if self.mask is None:
            raise ValueError(f"{self.source} has no mask")
        return load_mask(self._resolve(self.mask, "mask"), size=size, name=f"mask of {self.source}")

    @property
    def is_anomaly(self) -> bool:
        return self.defect_type != "good"

    def _name(self, value, what: str) -> str:
        return str(value) if isinstance(value, str | os.PathLike) else f"{what} of {self.source}"

    def check_anomaly(self) -> None:
        """A synthetic anomaly's mask must mark a defect and have its image's size (nothing is stretched)."""
        import torch

        from ..image_processing import check_same_sizes

        image, mask = self.load_image(), self.load_mask()
        mask_name = self._name(self.mask, "mask")
        if not mask.any():
            raise ValueError(f"{mask_name} is empty (all zero): the anomaly marks no defect to evaluate")
        check_same_sizes(  # compares heights and widths only
            [torch.empty(0, *image.shape[:2])],
            [torch.empty(0, *mask.shape)],
            image_name=self._name(self.image, "image"),
            mask_name=mask_name,
        )


def load_anomaly_folder(root: str | os.PathLike) -> list[Sample]:
    """Samples of ``<root>/<category>/<defect_type>/<name>.png`` + ``<name>_mask.png``; unpaired files fail."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"anomaly folder {root} does not exist")
    samples = []
    for category in sorted(p for p in root.iterdir() if p.is_dir()):
        for defect in sorted(p for p in category.iterdir() if p.is_dir()):
            files = {p.stem: p for p in defect.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
            images = {stem: p for stem, p in files.items() if not stem.endswith(MASK_SUFFIX)}
            masks = {stem[: -len(MASK_SUFFIX)]: p for stem, p in files.items() if stem.endswith(MASK_SUFFIX)}
            if missing := sorted(set(images) - set(masks)):
                raise FileNotFoundError(
                    f"{defect}: image {images[missing[0]].name} has no mask {missing[0]}{MASK_SUFFIX}.png "
                    f"({len(missing)} image(s) without a mask)"
                )
            if orphans := sorted(set(masks) - set(images)):
                raise FileNotFoundError(
                    f"{defect}: mask {masks[orphans[0]].name} has no image {orphans[0]}.png"
                )
            for stem in sorted(images):
                samples.append(
                    Sample(images[stem], masks[stem], category.name, defect.name, str(images[stem]))
                )
    if not samples:
        raise ValueError(
            f"anomaly folder {root} holds no image/mask pairs; expected "
            f"<category>/<defect_type>/<name>.png with <name>{MASK_SUFFIX}.png"
        )
    return samples


def _check_columns(dataset, name: str) -> None:
    if missing := [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]:
        raise ValueError(
            f"dataset {name} lacks the MVTec Caption column(s) {missing}; it has {dataset.column_names}"
        )


def _rows(dataset, name: str) -> list[dict]:
    _check_columns(dataset, name)
    columns = [
        c for c in ("category", "defect_type", "is_anomaly", "fold", "path") if c in dataset.column_names
    ]
    return dataset.select_columns(columns).to_list()


def _samples(dataset, rows: list[dict], indices, name: str) -> list[Sample]:
    return [
        Sample(
            (dataset, i),
            (dataset, i),
            rows[i]["category"],
            rows[i]["defect_type"],
            f"{name}[{rows[i].get('path', i)}]",
        )
        for i in indices
    ]


def load_anomalies(source, config: str | None = None) -> list[Sample]:
    """Generated anomalies from a folder of image/mask pairs or a dataset (every split, anomalies only)."""
    if not isinstance(source, str | os.PathLike) or not _is_pair_folder(Path(source)):
        data = load_dataset_source(source, config)
        splits = data.values() if hasattr(data, "values") else [data]
        samples = []
        for split in splits:
            rows = _rows(split, str(source))
            samples += _samples(split, rows, [i for i, r in enumerate(rows) if r["is_anomaly"]], str(source))
        if not samples:
            raise ValueError(f"dataset {source} holds no anomalies (no row with is_anomaly=True)")
        return samples
    return load_anomaly_folder(source)


def check_anomalies(samples: list[Sample], name: str, progress: bool = True) -> None:
    """:meth:`Sample.check_anomaly` on every sample of generator ``name``, before any metric runs."""
    from tqdm.auto import tqdm

    for sample in tqdm(samples, desc=f"checking {name}", disable=not progress, leave=False):
        sample.check_anomaly()


def _is_pair_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    dataset_markers = ("dataset_dict.json", "state.json", "README.md", "data")
    return not any((path / marker).exists() for marker in dataset_markers)


class RealData:
    """The real MVTec Caption splits of one config, indexed by category without decoding any image."""

    def __init__(self, source, config: str | None = None):
        import datasets

        data = load_dataset_source(source, config)
        if isinstance(data, datasets.Dataset):
            raise ValueError(
                f"real data {source} must have splits (train with normals, test); got one Dataset"
            )
        self.name = str(source) if not isinstance(source, datasets.DatasetDict) else "real dataset"
        for split in ("train", "test"):
            if split not in data:
                raise ValueError(f"real data {self.name} has no {split!r} split; it has {list(data)}")
        self.train, self.test = data["train"], data["test"]
        self.train_rows = _rows(self.train, f"{self.name}/train")
        self.test_rows = _rows(self.test, f"{self.name}/test")
        if "fold" not in self.test.column_names:
            raise ValueError(f"real data {self.name}/test lacks the 'fold' column (generator/evaluation)")
        self._by_category: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, r in enumerate(self.train_rows):
            if not r["is_anomaly"]:
                self._by_category[r["category"]]["train_good"].append(i)
        for i, r in enumerate(self.test_rows):
            key = "test_good" if not r["is_anomaly"] else r["fold"]
            self._by_category[r["category"]][key].append(i)

    @property
    def categories(self) -> list[str]:
        return sorted(self._by_category)

    def _need(self, category: str, key: str, what: str) -> list[int]:
        if category not in self._by_category:
            raise ValueError(f"real data {self.name} has no category {category!r}; it has {self.categories}")
        indices = self._by_category[category].get(key, [])
        if not indices:
            raise ValueError(f"real data {self.name}: category {category!r} has no {what}")
        return indices

    def normals(self, category: str) -> list[Sample]:
        rows = self._need(category, "train_good", "normal training images (train split, is_anomaly False)")
        return _samples(self.train, self.train_rows, rows, f"{self.name}/train")

    def test_set(self, category: str) -> list[Sample]:
        """Good test images plus the evaluation fold: the real test set of the downstream metrics."""
        good = self._need(category, "test_good", "good test images (test split, is_anomaly False)")
        anomalies = self._need(category, "evaluation", "anomalies in the evaluation fold (test split)")
        return _samples(self.test, self.test_rows, good + anomalies, f"{self.name}/test")

    def centres(self, category: str) -> list[Sample]:
        """Real anomalies of the generator fold: the IC-LPIPS centres."""
        rows = self._need(category, "generator", "anomalies in the generator fold (IC-LPIPS centres)")
        return _samples(self.test, self.test_rows, rows, f"{self.name}/test")

    def defect_types(self, category: str) -> list[str]:
        return sorted({s.defect_type for s in self.test_set(category) if s.is_anomaly})


def group_by(samples: list[Sample], *keys: str) -> dict:
    """``{key values: [samples]}`` in first-seen order (e.g. by "category", "defect_type")."""
    out: dict = defaultdict(list)
    for s in samples:
        out[tuple(getattr(s, k) for k in keys) if len(keys) > 1 else getattr(s, keys[0])].append(s)
    return dict(out)
