"""Small MVTec-shaped trees (AD and LOCO layouts) for the tests, the benchmark and the sample build.

They carry the real trees' traps: grayscale AD categories (grid, screw, zipper), non-square LOCO
images, several LOCO region files per image with pixel values below 255, `defects_config.json`.
Every image is stamped with its (index, category, defect) in its first pixels, so a test can check
that a caption landed on the right image from the pixels alone.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .captions import Captions, write_captions_json
from .layout import CATEGORIES, GRAYSCALE_CATEGORIES, NORMAL

# (width, height) of the real images.
REAL_SIZES = {
    "bottle": (900, 900), "cable": (1024, 1024), "capsule": (1000, 1000), "carpet": (1024, 1024),
    "grid": (1024, 1024), "hazelnut": (1024, 1024), "leather": (1024, 1024), "metal_nut": (700, 700),
    "pill": (800, 800), "screw": (1024, 1024), "tile": (840, 840), "toothbrush": (1024, 1024),
    "transistor": (1024, 1024), "wood": (1024, 1024), "zipper": (1024, 1024),
    "breakfast_box": (1600, 1280), "juice_bottle": (800, 1600), "pushpins": (1700, 1000),
    "screw_bag": (1600, 1100), "splicing_connectors": (1700, 850),
}  # fmt: skip

# LOCO region values: several below the 245 threshold a naive union would use.
LOCO_REGION_VALUES = (254, 200, 120)
SYNTHETIC_PREFIX = "Synthetic sample:"

SAMPLE_DEFECTS = {
    "ad": {
        "bottle": ("broken_large", "contamination"),
        "grid": ("bent", "broken"),
        "screw": ("scratch_head",),
    },
    "loco": {
        "breakfast_box": ("logical_anomalies", "structural_anomalies"),
        "juice_bottle": ("logical_anomalies",),
    },
}


@dataclass
class SampleTree:
    root: Path
    captions: Captions
    captions_path: Path | None


def synthetic_captions(layout: str, per_defect: Sequence[int] = (4, 5, 3)) -> Captions:
    """Made-up captions for a made-up tree: never mistaken for the authors'."""
    captions: Captions = {}
    counts = iter(per_defect * 8)
    for category, defects in SAMPLE_DEFECTS[layout].items():
        captions[category] = {
            defect: [
                f"{SYNTHETIC_PREFIX} {category} with {defect.replace('_', ' ')} number {i}." for i in range(n)
            ]
            for defect, n in zip(defects, counts, strict=False)
        }
    return captions


def sample_size(category: str, scale: float, min_side: int = 16) -> tuple[int, int]:
    width, height = REAL_SIZES[category]
    return max(min_side, round(width * scale)), max(min_side, round(height * scale))


def stamp_of(image: Image.Image) -> tuple[int, int, int]:
    """(index, category id, defect id) stamped into an image by this module."""
    row = np.asarray(image.convert("L"))[0, :4].astype(int)
    return int(row[0] + 256 * row[1]), int(row[2]), int(row[3])


def _texture(size: tuple[int, int], gray: bool, rng: np.random.Generator) -> np.ndarray:
    """A ramp with mild noise: compresses about like a real MVTec PNG."""
    width, height = size
    ramp = (
        np.linspace(40, 200, width, dtype=np.float32)[None, :]
        + np.linspace(0, 40, height, dtype=np.float32)[:, None]
    )
    channels = 1 if gray else 3
    pixels = ramp[..., None] + rng.normal(0, 6, (height, width, channels)).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _image(texture: np.ndarray, stamp: tuple[int, int, int]) -> Image.Image:
    """The category's texture, shifted per image, with (index, category, defect) in its first pixels."""
    index, category_id, defect_id = stamp
    pixels = np.roll(texture, shift=(7 * index + 13 * defect_id) % texture.shape[1], axis=1)
    pixels[0, :4] = np.array([index % 256, index // 256, category_id, defect_id], dtype=np.uint8)[:, None]
    gray = texture.shape[2] == 1
    return Image.fromarray(pixels[..., 0] if gray else pixels, mode="L" if gray else "RGB")


def _region(size: tuple[int, int], index: int, region: int, value: int) -> np.ndarray:
    """A rectangle that overlaps its neighbour region, so unions are not plain sums."""
    width, height = size
    mask = np.zeros((height, width), dtype=np.uint8)
    x0 = int(width * (0.1 + 0.2 * region))
    y0 = int(height * (0.1 + 0.15 * ((index + region) % 4)))
    mask[y0 : y0 + max(2, height // 4), x0 : x0 + max(2, int(width * 0.3))] = value
    return mask


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=1)


def make_sample_tree(
    root: str | Path,
    layout: str,
    captions: Captions | None = None,
    *,
    categories: Sequence[str] | None = None,
    scale: float = 0.015,
    n_train: int = 2,
    n_validation: int = 1,
    n_test_good: int = 1,
    captions_path: str | Path | None = None,
    seed: int = 0,
    progress: bool = False,
) -> SampleTree:
    """Write an MVTec-shaped tree with one test image (and mask) per caption of `captions`.

    `captions=None` makes synthetic captions (written to `captions_path` when given); pass the real
    captions to lay out the real counts. `scale` shrinks the real resolutions (1.0 = real size).
    """
    root = Path(root)
    captions = synthetic_captions(layout) if captions is None else captions
    chosen = list(categories) if categories is not None else list(captions)
    rng = np.random.default_rng(seed)
    total = sum(len(c) for cat in chosen for c in captions[cat].values())
    total += len(chosen) * (n_train + n_test_good + (n_validation if layout == "loco" else 0))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"Writing sample {layout} tree", unit=" images")
    for category in chosen:
        category_id = CATEGORIES[layout].index(category)
        gray = category in GRAYSCALE_CATEGORIES
        size = sample_size(category, scale)
        texture = _texture(size, gray, rng)
        normals = {"train": n_train, "test": n_test_good}
        if layout == "loco":
            normals["validation"] = n_validation
            config = [{"defect_name": f"region_{v}", "pixel_value": v, "saturation_threshold": 100,
                       "relative_saturation": True} for v in LOCO_REGION_VALUES]  # fmt: skip
            (root / category).mkdir(parents=True, exist_ok=True)
            (root / category / "defects_config.json").write_text(json.dumps(config, indent=1))
        for split, n in normals.items():
            for i in range(n):
                _save(
                    _image(texture, (i, category_id, 255)),
                    root / category / split / NORMAL / f"{i:03d}.png",
                )
                if bar is not None:
                    bar.update()
        for defect_id, (defect, defect_captions) in enumerate(captions[category].items()):
            gt = root / category / "ground_truth" / defect
            for i in range(len(defect_captions)):
                _save(
                    _image(texture, (i, category_id, defect_id)),
                    root / category / "test" / defect / f"{i:03d}.png",
                )
                if layout == "ad":
                    _save(Image.fromarray(_region(size, i, 0, 255), mode="L"), gt / f"{i:03d}_mask.png")
                else:
                    for region in range(1 + i % len(LOCO_REGION_VALUES)):
                        value = LOCO_REGION_VALUES[region]
                        _save(
                            Image.fromarray(_region(size, i, region, value), mode="L"),
                            gt / f"{i:03d}" / f"{region:03d}.png",
                        )
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    written = write_captions_json({c: captions[c] for c in chosen}, captions_path) if captions_path else None
    return SampleTree(root=root, captions={c: captions[c] for c in chosen}, captions_path=written)


def pack_tar_xz(folder: str | Path, archive: str | Path) -> Path:
    """Pack a tree the way MVTec ships it: one `.tar.xz` whose members sit under the category folders."""
    folder, archive = Path(folder), Path(archive)
    with tarfile.open(archive, "w:xz", preset=0) as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)
    return archive


# --- a made-up tree in the layout of MPDD / BTAD / converted VisA, for the `custom` config ----------------

CUSTOM_CATEGORIES = {
    # category: {defect type: (image suffix, mask naming, number of images)}; "flange_plate" is left
    # out of the captions file, so it gets template captions.
    "gizmo": {"dent": (".jpg", "{stem}_mask.png", 5), "burr-mark": (".jpg", "{stem}.png", 4)},
    "flange_plate": {"missing_bolt": (".jpg", "{stem}.png", 3), "Rust_Spot": (".png", "{stem}_mask.png", 3)},
}
CUSTOM_SIZES = {"gizmo": (40, 32), "flange_plate": (36, 36)}


def custom_caption(category: str, defect: str, stem: str) -> str:
    """The made-up human caption of image `stem`: it names its file, so a test can see the pairing."""
    return f"A {defect} on the {category}, file {stem}."


def make_custom_tree(
    root: str | Path,
    captions_path: str | Path | None = None,
    *,
    n_train: int = 4,
    n_test_good: int = 2,
    n_validation: int = 0,
    seed: int = 0,
) -> SampleTree:
    """A custom MVTec-layout tree: made-up categories and defect types, JPEG images named `<type>_<n>`
    (natural order: _2 before _10), masks `<stem>_mask.png` or `<stem>.png`, numbering from 1.

    Captions (written to `captions_path`) cover `gizmo` only: `dent` as a list in file order, `burr-mark`
    as {file name: caption}; `flange_plate` has none and is captioned from the template.
    `n_validation` > 0 adds <category>/validation/good (a validation split).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    captions: dict = {}
    for category, defects in CUSTOM_CATEGORIES.items():
        size = CUSTOM_SIZES[category]
        texture = _texture(size, False, rng)
        for split, n in (("train", n_train), ("test", n_test_good), ("validation", n_validation)):
            for i in range(n):
                path = root / category / split / NORMAL / f"{category}_{2 * i + 1}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                _image(texture, (i, 0, 255)).save(path, format="JPEG", quality=95)
        for defect_id, (defect, (suffix, mask_name, n)) in enumerate(defects.items()):
            stems = [f"{defect}_{k}" for k in (1, 2, 10, 11, 20, 3)[:n]]  # sorted naturally: 1, 2, 3, 10, ...
            for i, stem in enumerate(stems):
                image = _image(texture, (i, 0, defect_id))
                path = root / category / "test" / defect / f"{stem}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path, format="JPEG" if suffix == ".jpg" else "PNG")
                _save(Image.fromarray(_region(size, i, 0, 255), mode="L"),
                      root / category / "ground_truth" / defect / mask_name.format(stem=stem))  # fmt: skip
            if category == "gizmo":
                from .layout import natural_key

                ordered = sorted(stems, key=lambda s: natural_key(Path(s)))
                texts = [custom_caption(category, defect, s) for s in ordered]
                captions.setdefault(category, {})[defect] = (
                    texts
                    if defect == "dent"
                    else {f"{s}{suffix}": t for s, t in zip(ordered, texts, strict=True)}
                )
    written = None
    if captions_path is not None:
        written = Path(captions_path)
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_text(json.dumps(captions, indent=1))
    return SampleTree(root=root, captions=captions, captions_path=written)
