"""Reads a generated defect's colour and shape straight from the pixels inside its mask.

Defect pixels are the mask pixels that are saturated (the toy background is grey) and differ from the
normal input. Colour: nearest palette colour to their mean. Shape: a round spot fills most of the
square mask (π/4 ≈ 0.79), a thin scratch a quarter of it; the boundary is the midpoint, 0.5.
Nothing here was fitted to a model's outputs.
"""

from __future__ import annotations

import numpy as np

from .toy_data import COLOURS

MIN_CHROMA = 60  # max - min channel; the grey texture stays far below
MIN_DIFF = 40  # from the normal image, any channel
MIN_DEFECT_FRACTION = 0.05
ROUND_FRACTION = 0.5


def read_defect(generated: np.ndarray, normal: np.ndarray, mask: np.ndarray) -> tuple[str, str, float]:
    """(colour or "none", "round" / "thin" / "none", defect fraction of the mask) for uint8 HxWx3 images."""
    inside = mask > 0  # the pipeline's rule: every non-zero mask pixel is defect
    gen = generated.astype(np.int16)
    chroma = gen.max(axis=2) - gen.min(axis=2)
    diff = np.abs(gen - normal.astype(np.int16)).max(axis=2)
    defect = inside & (chroma >= MIN_CHROMA) & (diff >= MIN_DIFF)
    fraction = float(defect.sum()) / max(int(inside.sum()), 1)
    if fraction < MIN_DEFECT_FRACTION:
        return "none", "none", fraction
    mean = gen[defect].mean(axis=0)
    names = list(COLOURS)
    dists = [np.linalg.norm(mean - np.array(COLOURS[n])) for n in names]
    colour = names[int(np.argmin(dists))]
    shape = "round" if fraction >= ROUND_FRACTION else "thin"
    return colour, shape, fraction


def outside_mask_change(generated: np.ndarray, normal: np.ndarray, mask: np.ndarray) -> int:
    """Largest absolute pixel difference outside the mask (0 means the background was kept exactly)."""
    outside = mask == 0
    if not outside.any():
        return 0
    return int(np.abs(generated.astype(np.int16) - normal.astype(np.int16))[outside].max())
