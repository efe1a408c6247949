"""A toy captioned-defect set in MVTec AD layout, where the caption alone names what is inside the mask.

Normal images are a fine grey texture. A defect sits inside a square mask; its colour and shape
are the caption's words ("a red round spot", "a blue thin scratch"). The mask is the same square for
every shape, so a model can only get the shape — and the colour — from the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 230), "yellow": (235, 215, 40)}
SHAPES = {"round": "spot", "thin": "scratch"}
CATEGORY = "tile"  # an MVTec AD texture category name, so the real builder takes the toy tree


def caption_for(colour: str, shape: str) -> str:
    return f"a {colour} {shape} {SHAPES[shape]}"


def defect_type(colour: str, shape: str) -> str:
    return f"{colour}_{shape}"


def vocabulary() -> list[str]:
    return sorted({"a", *COLOURS, *SHAPES, *SHAPES.values()})


def normal_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey with a faint diagonal weave and pixel noise: texture to keep, not flat colour."""
    yy, xx = np.mgrid[0:size, 0:size]
    weave = 12 * np.sin((xx + yy) * 0.9 + rng.uniform(0, 6.28))
    base = rng.uniform(120, 150) + weave + rng.normal(0, 6, (size, size))
    return np.repeat(np.clip(base, 0, 255)[..., None], 3, axis=2).astype(np.uint8)


def square_mask(rng: np.random.Generator, size: int, side: int) -> np.ndarray:
    y, x = rng.integers(1, size - side - 1, size=2)
    mask = np.zeros((size, size), np.uint8)
    mask[y : y + side, x : x + side] = 255
    return mask


def paint_defect(image: np.ndarray, mask: np.ndarray, colour: str, shape: str, rng) -> np.ndarray:
    """Round: a disk filling the square. Thin: a 2-px diagonal stroke across it."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = y1 - y0
    yy, xx = np.mgrid[0:side, 0:side]
    c = (side - 1) / 2
    if shape == "round":
        region = (yy - c) ** 2 + (xx - c) ** 2 <= (side / 2) ** 2
    else:
        region = np.abs(yy - (xx if rng.random() < 0.5 else side - 1 - xx)) <= 1
    out = image.copy()
    patch = out[y0:y1, x0:x1]
    jitter = rng.normal(0, 8, (side, side, 3))
    patch[region] = np.clip(np.array(COLOURS[colour]) + jitter[region], 0, 255).astype(np.uint8)
    return out


@dataclass
class ToyTree:
    root: Path
    captions_path: Path
    held_out_normals: list[Path]
    validation_normals: list[Path]


def make_toy_tree(
    root: str | Path,
    *,
    size: int = 32,
    mask_side: int = 12,
    anomalies_per_type: int = 24,
    train_normals: int = 16,
    test_normals: int = 4,
    held_out_normals: int = 16,
    validation_normals: int = 8,
    seed: int = 0,
) -> ToyTree:
    """Writes ``root/tile/{train,test,ground_truth}`` plus ``captions.json``, held-out normal images (what
    is reported) and validation normal images (what choices are tuned on; no image in common)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    cat = root / CATEGORY
    captions: dict[str, list[str]] = {}
    for i in range(train_normals):
        _save(normal_image(rng, size), cat / "train" / "good" / f"{i:03d}.png")
    for i in range(test_normals):
        _save(normal_image(rng, size), cat / "test" / "good" / f"{i:03d}.png")
    for colour in COLOURS:
        for shape in SHAPES:
            name = defect_type(colour, shape)
            captions[name] = []
            for i in range(anomalies_per_type):
                mask = square_mask(rng, size, mask_side)
                image = paint_defect(normal_image(rng, size), mask, colour, shape, rng)
                _save(image, cat / "test" / name / f"{i:03d}.png")
                _save(mask, cat / "ground_truth" / name / f"{i:03d}_mask.png")
                captions[name].append(caption_for(colour, shape))
    held = []
    for i in range(held_out_normals):
        path = root / "held_out" / f"{i:03d}.png"
        _save(normal_image(rng, size), path)
        held.append(path)
    validation = []
    for i in range(validation_normals):
        path = root / "validation" / f"{i:03d}.png"
        _save(normal_image(rng, size), path)
        validation.append(path)
    captions_path = root / "captions.json"
    captions_path.write_text(json.dumps({CATEGORY: captions}, indent=1))
    return ToyTree(root, captions_path, held, validation)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
