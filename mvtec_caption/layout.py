"""Walking an MVTec AD / MVTec LOCO / any MVTec-layout tree into records, refusing any gap or misalignment.

AD:     <category>/{train/good, test/<defect>}/<i:03d>.png, masks ground_truth/<defect>/<i:03d>_mask.png
LOCO:   <category>/{train/good, validation/good, test/<defect>}/<i:03d>.png,
        masks = every region file in ground_truth/<defect>/<i:03d>/
custom: whatever categories and defect types the tree has (MPDD, BTAD, converted VisA, your own):
        <category>/{train/good, [validation/good], [test/good], test/<defect>}/<any name>.<png|jpg|bmp|tif>,
        masks ground_truth/<defect>/<stem>_mask.<ext> or <stem>.<ext> (or a folder <stem>/ of region
        files), paired with their image by stem; files in natural order (img_2 before img_10).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .captions import Captions, CustomCaptions, template_caption
from .errors import MVTecCaptionError
from .images import is_image_file

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
    caption_source: str = ""  # "human" (a person wrote it), "template" (from folder names), "" (normal)

    @property
    def is_anomaly(self) -> bool:
        return self.defect_type != NORMAL

    @property
    def fold(self) -> str:
        return fold_of(self.index, self.count) if self.is_anomaly else ""


def fold_of(index: int, count: int) -> str:
    """Few-shot protocol: the first floor(n/3) of a defect type's ``count`` anomalies (by ``index``, from 0)
    train the generator; the rest are held out for evaluation."""
    return "generator" if index < count // 3 else "evaluation"


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
        yield Record("test", category, defect, index, n_captions, image, masks, captions[index], "human")


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


# --- any MVTec-layout tree ("custom") ---------------------------------------------------------------


def natural_key(path: Path) -> tuple:
    """img_2 before img_10: digit runs compare as numbers."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.stem))


def _images(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if is_image_file(p)), key=natural_key)
    stems: dict[str, Path] = {}
    for file in files:
        if file.stem in stems:
            raise MVTecCaptionError(f"Images {stems[file.stem]} and {file} share the stem {file.stem!r}")
        stems[file.stem] = file
    return files


def _is_category(folder: Path) -> bool:
    return any((folder / part).is_dir() for part in ("train", "test", "ground_truth"))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))), key=natural_key
    )


def find_custom_root(path: str | Path) -> Path:
    """The folder whose sub-folders are categories: `path`, or its one sub-folder (an archive's top folder)."""
    path = Path(path)
    if not path.is_dir():
        raise MVTecCaptionError(f"data_dir {path} is not a folder nor a .tar.xz archive")
    subfolders = _subfolders(path)
    if any(_is_category(p) for p in subfolders):
        return path
    if len(subfolders) == 1 and any(_is_category(p) for p in _subfolders(subfolders[0])):
        return subfolders[0]
    raise MVTecCaptionError(
        f"data_dir {path} holds no category folder (<category>/train/good, <category>/test/<defect>, "
        "<category>/ground_truth/<defect>)"
    )


def custom_categories(root: Path, categories: Sequence[str] | None, captions: CustomCaptions) -> list[str]:
    found = [p.name for p in _subfolders(root)]
    unknown = [c for c in (categories or ()) if c not in found]
    if unknown:
        raise MVTecCaptionError(f"Unknown categories {unknown}; {root} holds {', '.join(found)}")
    uncaptioned = [c for c in captions if c not in found]
    if uncaptioned:
        raise MVTecCaptionError(
            f"The captions file names categories {uncaptioned} that {root} does not hold (it holds {', '.join(found)})"
        )
    return list(dict.fromkeys(categories)) if categories else found


def _custom_masks(gt: Path, category: str, defect: str, images: list[Path]) -> dict[str, tuple[Path, ...]]:
    """{image stem: mask files}; every image needs one, every mask needs its image."""
    masks: dict[str, tuple[Path, ...]] = {}
    for entry in sorted(gt.iterdir(), key=natural_key):
        if entry.is_dir():
            stem, files = (
                entry.name,
                tuple(sorted((p for p in entry.iterdir() if is_image_file(p)), key=natural_key)),
            )
        elif is_image_file(entry):
            stem = entry.stem[: -len("_mask")] if entry.stem.endswith("_mask") else entry.stem
            files = (entry,)
        else:
            continue
        if stem in masks:
            raise MVTecCaptionError(
                f"{category}/{defect}: masks {masks[stem][0]} and {entry} both belong to image {stem!r}"
            )
        masks[stem] = files
    stems = {image.stem for image in images}
    orphans = [(stem, files) for stem, files in masks.items() if stem not in stems]
    if orphans:
        stem, files = orphans[0]
        raise MVTecCaptionError(
            f"{category}/{defect}: mask {files[0] if files else gt / stem} has no image named {stem}.* in test/{defect}"
        )
    for i, image in enumerate(images):
        if not masks.get(image.stem):
            raise MVTecCaptionError(
                f"{category}/{defect} image {image} ({i + 1} of {len(images)}): mask is missing "
                f"(looked for {gt / (image.stem + '_mask.png')}, {gt / (image.stem + '.png')} or other image suffixes)"
            )
    return masks


def _custom_captions(
    category: str, defect: str, folder: Path, images: list[Path], captions: CustomCaptions, source: str
) -> tuple[list[str], str]:
    if category not in captions:
        return [template_caption(category, defect)] * len(images), "template"
    given = captions[category].get(defect)
    if given is None:
        raise MVTecCaptionError(
            f"{category}/{defect}: {len(images)} images in {folder} but the captions file {source} has no captions "
            f"for this defect type (leave the whole category out of the file to use template captions)"
        )
    if isinstance(given, list):
        if len(given) != len(images):
            raise MVTecCaptionError(
                f"{category}/{defect}: {len(given)} captions but {len(images)} images in {folder}; "
                "caption i belongs to image i in natural file order, so the counts must agree"
            )
        return list(given), "human"
    by_name = {}
    for key, caption in given.items():
        name = Path(key).name
        match = next((im for im in images if im.name == name), None)
        if match is None or (
            len(Path(key).parts) > 1 and not match.as_posix().endswith(Path(key).as_posix())
        ):
            raise MVTecCaptionError(
                f"{category}/{defect}: the captions file {source} names {key!r}, which is not an image in {folder}"
            )
        by_name[match.name] = caption
    missing = [im for im in images if im.name not in by_name]
    if missing:
        raise MVTecCaptionError(
            f"{category}/{defect}: image {missing[0]} has no caption in the captions file {source}"
        )
    return [by_name[im.name] for im in images], "human"


def _custom_normals(root: Path, split: str, category: str, required: bool) -> Iterator[Record]:
    folder = root / category / split / NORMAL
    if not folder.is_dir():
        if required:
            raise MVTecCaptionError(
                f"Category {category!r} has no {split}/{NORMAL} folder ({folder}); every category needs its "
                f"normal training images there"
            )
        return
    files = _images(folder)
    if required and not files:
        raise MVTecCaptionError(f"Category {category!r}: {folder} holds no images")
    for index, file in enumerate(files):
        yield Record(split, category, NORMAL, index, len(files), file, (), "")


def iter_custom_records(
    root: Path, captions: CustomCaptions, categories: Sequence[str], split: str, source: str
) -> Iterator[Record]:
    """Records of one split of any MVTec-layout tree; raises naming the folder or file on any mismatch."""
    for category in categories:
        yield from _custom_normals(root, split, category, required=split == "train")
        if split != "test":
            continue
        test = root / category / "test"
        defects = [p.name for p in _subfolders(test) if p.name != NORMAL] if test.is_dir() else []
        unknown = [d for d in captions.get(category, {}) if d not in defects]
        if unknown:
            raise MVTecCaptionError(
                f"{category}/{unknown[0]}: the captions file {source} has captions for it but {test / unknown[0]} is missing"
            )
        for defect in defects:
            folder = test / defect
            images = _images(folder)
            if not images:
                raise MVTecCaptionError(f"{category}/{defect}: {folder} holds no images")
            gt = root / category / "ground_truth" / defect
            if not gt.is_dir():
                raise MVTecCaptionError(
                    f"{category}/{defect}: mask folder {gt} is missing ({len(images)} images in {folder})"
                )
            masks = _custom_masks(gt, category, defect, images)
            texts, caption_source = _custom_captions(category, defect, folder, images, captions, source)
            for index, image in enumerate(images):
                yield Record(
                    "test",
                    category,
                    defect,
                    index,
                    len(images),
                    image,
                    masks[image.stem],
                    texts[index],
                    caption_source,
                )


def has_validation(root: Path, categories: Sequence[str]) -> bool:
    return any((root / c / "validation" / NORMAL).is_dir() for c in categories)
