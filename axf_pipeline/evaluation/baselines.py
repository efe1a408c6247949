"""A classical anomaly generator to compare against: DRAEM-style Perlin-noise blending.

DRAEM (Zavrtanik et al., 2021) thresholds Perlin noise into a mask and blends a foreign texture into a
normal image inside it: ``I' = (1 - M) ⊙ I + (1 - β) M ⊙ A + β M ⊙ I``. DRAEM takes ``A`` from the DTD
texture set; offline we take it from the real anomalies of the generator fold of the defect type (the
same images every generator may learn from), randomly flipped and rotated, so the baseline is defect-type
aware and can feed the classifier too. No maintained PyPI package implements this, so it is written here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .data import Sample, group_by
from .images import resize_rgb

__all__ = ["perlin_mask", "perlin_noise", "perlin_anomalies"]


def perlin_noise(shape: tuple[int, int], periods: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1] with ``periods`` lattice cells along each axis."""
    h, w = shape
    py, px = periods
    angles = rng.uniform(0, 2 * np.pi, (py + 1, px + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], -1)
    y = np.linspace(0, py, h, endpoint=False)
    x = np.linspace(0, px, w, endpoint=False)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = yy - y0, xx - x0

    def dot(dy, dx):
        g = grads[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(fx), fade(fy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return np.sqrt(2) * (top * (1 - v) + bottom * v)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5) -> np.ndarray:
    """DRAEM's mask: rotated Perlin noise at a random scale 2^[0, 6) thresholded at 0.5; never empty."""
    for _ in range(100):
        periods = (2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6)))
        noise = perlin_noise(shape, periods, rng)
        angle = float(rng.uniform(-90, 90))
        noise = np.asarray(Image.fromarray(noise.astype(np.float32)).rotate(angle, Image.BILINEAR))
        mask = noise > threshold
        if mask.any():
            return mask
    raise RuntimeError("Perlin mask stayed empty after 100 draws")  # pragma: no cover - vanishingly rare


def perlin_anomalies(
    normals: list[Sample],
    sources: list[Sample],
    *,
    per_defect_type: int,
    resolution: int = 256,
    seed: int = 0,
) -> list[Sample]:
    """``per_defect_type`` Perlin-blended anomalies for each defect type of ``sources`` on ``normals``."""
    if not normals:
        raise ValueError("perlin_anomalies needs normal images to draw anomalies on")
    if not sources:
        raise ValueError("perlin_anomalies needs real anomalies of the generator fold as texture sources")
    rng = np.random.default_rng(seed)
    out = []
    for defect_type, textures in group_by(sources, "defect_type").items():
        for k in range(per_defect_type):
            base = normals[int(rng.integers(len(normals)))]
            image = resize_rgb(base.load_image(), resolution).astype(np.float32)
            texture = resize_rgb(textures[int(rng.integers(len(textures)))].load_image(), resolution)
            texture = np.rot90(texture, int(rng.integers(4)))
            texture = texture[:, ::-1] if rng.random() < 0.5 else texture
            mask = perlin_mask((resolution, resolution), rng)
            beta = float(rng.uniform(0, 0.8))
            m = mask[..., None].astype(np.float32)
            blended = (1 - m) * image + m * ((1 - beta) * texture.astype(np.float32) + beta * image)
            out.append(
                Sample(
                    np.clip(blended, 0, 255).round().astype(np.uint8),
                    mask,
                    base.category,
                    defect_type,
                    f"perlin[{base.category}/{defect_type}/{k}]",
                )
            )
    return out
