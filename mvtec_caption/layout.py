"""Walking an MVTec AD / MVTec LOCO tree into records, refusing any gap or misalignment.

AD:   <category>/{train/good, test/<defect>}/<i:03d>.png, masks ground_truth/<defect>/<i:03d>_mask.png
LOCO: <category>/{train/good, validation/good, test/<defect>}/<i:03d>.png,
      masks = every region file in ground_truth/<defect>/<i:03d>/
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .captions import Captions
from .errors import MVTecCaptionError

AD_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
CATEGORIES = {"ad": AD_CATEGORIES, "loco": LOCO_CATEGORIES}
GRAYSCALE_CATEGORIES = ("grid", "screw", "zipper")
NORMAL = "good"


@dataclass(frozen=True)
class Record:
    """One image of the tree with everything needed to make its example."""

    split: str
    category: str
    defect_type: str
    index: int
    count: int
    image: Path
    masks: tuple[Path, ...]
    caption: str

    @property
    def is_anomaly(self) -> bool:
        return self.defect_type != NORMAL

    @property
    def fold(self) -> str:
        """Few-shot protocol: the first floor(n/3) anomalies of a defect type train the generator."""
        if not self.is_anomaly:
            return ""
        return "generator" if self.index < self.count // 3 else "evaluation"


def find_data_root(path: str | Path, categories: Sequence[str]) -> Path:
    """The folder holding the category folders: `path` itself or one of its sub-folders (archives)."""
    path = Path(path)
    if not path.is_dir():
        raise MVTecCaptionError(f"data_dir {path} is not a folder nor an MVTec .tar.xz archive")
    for candidate in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
        if any((candidate / c).is_dir() for c in categories):
            return candidate
    raise MVTecCaptionError(
        f"data_dir {path} holds none of the category folders {', '.join(categories)}; "
        "point data_dir at the extracted MVTec folder or its .tar.xz archive"
    )


def _numbered_pngs(folder: Path) -> dict[int, Path]:
    files: dict[int, Path] = {}
    for file in folder.iterdir():
        if file.suffix.lower() != ".png":
            continue
        if not file.stem.isdigit():
            raise MVTecCaptionError(f"Image {file} is not named <number>.png as MVTec images are")
        files[int(file.stem)] = file
    return files


def _normal_records(root: Path, split: str, category: str) -> Iterator[Record]:
    folder = root / category / split / NORMAL  # the split's folder is named after it
    if not folder.is_dir():
        raise MVTecCaptionError(f"{category}/{NORMAL}: folder {folder} of split {split!r} is missing")
    files = _numbered_pngs(folder)
    for index in sorted(files):
        yield Record(split, category, NORMAL, index, len(files), files[index], (), "")


def _mask_files(
    root: Path, layout: str, category: str, defect: str, index: int, where: str
) -> tuple[Path, ...]:
    gt = root / category / "ground_truth" / defect
    if layout == "ad":
        mask = gt / f"{index:03d}_mask.png"
        if not mask.is_file():
            raise MVTecCaptionError(f"{where}: mask {mask} is missing")
        return (mask,)
    folder = gt / f"{index:03d}"
    regions = tuple(sorted(folder.glob("*.png"))) if folder.is_dir() else ()
    if not regions:
        raise MVTecCaptionError(f"{where}: mask folder {folder} is missing or holds no region .png files")
    return regions


def _anomaly_records(
    root: Path, layout: str, category: str, defect: str, captions: list[str]
) -> Iterator[Record]:
    folder = root / category / "test" / defect
    n_captions = len(captions)
    if not folder.is_dir():
        raise MVTecCaptionError(
            f"{category}/{defect}: image folder {folder} is missing (captions: {n_captions}, images: 0)"
        )
    files = _numbered_pngs(folder)
    if len(files) != n_captions:
        raise MVTecCaptionError(
            f"{category}/{defect}: {n_captions} captions but {len(files)} images in {folder}; "
            "caption i belongs to image i, so the counts must agree"
        )
    for index in range(n_captions):
        image = folder / f"{index:03d}.png"
        if index not in files:
            raise MVTecCaptionError(
                f"{category}/{defect}: image {image} is missing (captions: {n_captions}, images: {len(files)})"
            )
        where = (
            f"{category}/{defect} image {image} ({index + 1} of {n_captions} captions, {len(files)} images)"
        )
        masks = _mask_files(root, layout, category, defect, index, where)
        yield Record("test", category, defect, index, n_captions, image, masks, captions[index])


def iter_records(
    root: Path, layout: str, captions: Captions, categories: Sequence[str], split: str
) -> Iterator[Record]:
    """Records of one split, category by category, in file-number order; raises on any mismatch."""
    for category in categories:
        if not (root / category).is_dir():
            raise MVTecCaptionError(
                f"Category folder {root / category} is missing (category {category!r}); "
                "extract it or choose a subset with categories=[...] / --categories"
            )
        if split != "test":
            yield from _normal_records(root, split, category)
            continue
        yield from _normal_records(root, split, category)
        test = root / category / "test"
        extra = sorted(
            p.name
            for p in test.iterdir()
            if p.is_dir() and p.name != NORMAL and p.name not in captions[category]
        )
        if extra:
            n = len(_numbered_pngs(test / extra[0]))
            raise MVTecCaptionError(
                f"{category}/{extra[0]}: {n} images in {test / extra[0]} but 0 captions for this defect type "
                "in the captions file"
            )
        for defect, defect_captions in captions[category].items():
            yield from _anomaly_records(root, layout, category, defect, defect_captions)


def check_categories(layout: str, captions: Captions, categories: Sequence[str] | None) -> list[str]:
    """The categories to build: all captioned ones, or the requested subset (each must be captioned)."""
    if categories is None:
        return list(captions)
    chosen = list(dict.fromkeys(categories))
    unknown = [c for c in chosen if c not in captions]
    if unknown:
        raise MVTecCaptionError(
            f"Unknown {layout} categories {unknown}; the captions file has {', '.join(captions)}"
        )
    return chosen
