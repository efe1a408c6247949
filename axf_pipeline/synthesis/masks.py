"""New defect masks from a few real ones: randomly transformed copies, placed where the object is.

A sample is one real mask of the defect type, cropped to its bounding box, then

1. transformed: rotation (any angle), horizontal/vertical flip, scale 0.75-1.25 (relative to the real
   mask, after resizing it to the canvas), and a mild elastic warp (a smooth random displacement of at
   most ``ELASTIC`` of the mask's extent);
2. placed: its centre goes on a random foreground pixel of the normal image (object categories) or on
   any pixel (texture categories);
3. accepted only if it is not empty, at most ``max_cut_off`` (default 10 %) of it falls outside the image,
   and its area (as a fraction of the image) lies within ``[min / (1 + area_margin), max * (1 + area_margin)]``
   of the real masks' areas (default margin 50 %). After ``max_tries`` rejections the untransformed real
   mask is placed at its own position, which always passes (:meth:`MaskSampler.is_fallback` tells such a
   mask; `axf synthesize` marks it in its ``mask_fallback`` column).

Foreground rule (object categories): the background colour is the per-channel median of a frame of
``border`` (default 4 %) of the image's side; a pixel is foreground when any channel differs from it by
more than ``threshold`` (default 25 of 255). When that leaves under 1 % of the image (a uniform image,
or an object filling the frame), the whole image counts as foreground. The rule runs on a grid of at most
128 pixels per side (every k-th pixel), once per normal image.

Everything is NumPy, drawn from the ``numpy.random.Generator`` the caller passes, so a sample is a pure
function of (real masks, normal image, seed).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

__all__ = ["MaskSampler", "TEXTURE_CATEGORIES", "contact_sheet", "estimate_foreground"]

# MVTec AD's texture categories: defects may go anywhere. Every other category is an object. The default of
# `axf synthesize --texture-categories`, which names a dataset's own.
TEXTURE_CATEGORIES = frozenset({"carpet", "grid", "leather", "tile", "wood"})
SCALE_RANGE = (0.75, 1.25)
ELASTIC = 0.06  # largest elastic displacement, as a fraction of the transformed mask's extent
_ELASTIC_GRID = 4  # control points per side of the displacement field


def estimate_foreground(
    image: np.ndarray,
    border: float = 0.04,
    threshold: float = 25.0,
    min_fraction: float = 0.01,
    max_side: int = 128,
) -> np.ndarray:
    """Boolean foreground of an RGB or gray uint8 image (rule in the module docstring), on a grid of at
    most ``max_side`` pixels per side (every ``ceil(side / max_side)``-th pixel) to stay cheap."""
    pixels = np.asarray(image)
    step = -(-max(pixels.shape[:2]) // max_side)
    pixels = pixels[::step, ::step]
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    h, w = pixels.shape[:2]
    b = max(1, round(border * min(h, w)))
    frame = np.concatenate(
        [pixels[:b].reshape(-1, pixels.shape[2]), pixels[-b:].reshape(-1, pixels.shape[2]),
         pixels[:, :b].reshape(-1, pixels.shape[2]), pixels[:, -b:].reshape(-1, pixels.shape[2])]
    )  # fmt: skip
    background = np.median(frame, axis=0)
    foreground = (np.abs(pixels.astype(np.float32) - background).max(axis=2)) > threshold
    if foreground.mean() < min_fraction:
        return np.ones((h, w), dtype=bool)
    return foreground


def _crop(mask: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """The mask cut to its bounding box, and the box centre (y, x) in the mask's own pixels."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return mask[y0:y1, x0:x1], ((y0 + y1) / 2, (x0 + x1) / 2)


@functools.lru_cache(maxsize=512)
def _linear_weights(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation from ``n_in`` evenly spaced control points."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(pos.astype(int), n_in - 2)
    frac = pos - lo
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    weights[np.arange(n_out), lo] = 1 - frac
    weights[np.arange(n_out), lo + 1] = frac
    return weights


class MaskSampler:
    """Seeded sampler of new masks of one defect type.

    Args:
        masks: the real masks of the type (any size, any non-zero pixel is defect); none may be empty.
        texture: place anywhere (texture category) instead of on the foreground.
        max_cut_off: largest fraction of a sampled mask allowed to fall outside the image.
        area_margin: relative margin around the real masks' area range.
        max_tries: rejected draws before falling back to the real mask at its own position.
    """

    def __init__(
        self,
        masks: Sequence[np.ndarray],
        texture: bool = False,
        max_cut_off: float = 0.1,
        area_margin: float = 0.5,
        max_tries: int = 20,
    ):
        if not masks:
            raise ValueError("MaskSampler needs at least one real mask")
        self.masks = [np.asarray(m) > 0 for m in masks]
        for i, m in enumerate(self.masks):
            if m.ndim != 2 or not m.any():
                raise ValueError(f"real mask {i} is empty or not single-channel (shape {m.shape})")
        self.crops = [_crop(m) for m in self.masks]
        self.padded = [np.pad(c, 1).ravel() for c, _ in self.crops]  # flat, zero border: see _draw
        areas = [m.mean() for m in self.masks]
        self.area_range = (min(areas) / (1 + area_margin), max(areas) * (1 + area_margin))
        self.texture = texture
        self.max_cut_off = max_cut_off
        self.max_tries = max_tries

    def sample(
        self,
        rng: np.random.Generator,
        size: tuple[int, int],
        foreground: np.ndarray | None = None,
        source: int | None = None,
    ) -> tuple[np.ndarray, int]:
        """A new boolean (H, W) mask for an image of ``size`` = (H, W), and the index of its real source.

        ``foreground``: :func:`estimate_foreground` of the normal image (any resolution; object categories
        only; compute it once per image). ``None`` or a texture sampler places anywhere. ``source``: which
        real mask to transform (default: drawn from ``rng``).
        """
        h, w = size
        if source is None:
            source = int(rng.integers(len(self.masks)))
        allowed = None
        if not self.texture and foreground is not None:
            allowed = self._foreground_pixels(foreground, h, w)
        for _ in range(self.max_tries):
            mask = self._draw(rng, source, h, w, allowed)
            if mask is not None:
                return mask, source
        return self._fallback(source, h, w), source

    # -------------------------------------------------------------- helpers
    def _foreground_pixels(self, foreground: np.ndarray, h: int, w: int):
        """Foreground cell centres in canvas pixels (the map may be coarser); cached for the last map."""
        key = (id(foreground), h, w)
        if getattr(self, "_cache_key", None) != key or self._cache_map is not foreground:
            fy, fx = np.nonzero(foreground)
            self._cache_key, self._cache_map = key, foreground
            self._cache_pixels = (
                ((fy + 0.5) * h / foreground.shape[0]).astype(np.intp),
                ((fx + 0.5) * w / foreground.shape[1]).astype(np.intp),
            )
        return self._cache_pixels

    def _draw(self, rng, source: int, h: int, w: int, allowed) -> np.ndarray | None:
        crop, _ = self.crops[source]
        src_h, src_w = self.masks[source].shape
        resize = np.sqrt((h * w) / (src_h * src_w))  # canvas / real image, keeping area fractions
        scale = float(rng.uniform(*SCALE_RANGE) * resize)
        angle = rng.uniform(0, 2 * np.pi)
        flip_y, flip_x = (int(f) * 2 - 1 for f in rng.integers(0, 2, size=2))
        # 1. output crop big enough for any rotation of the scaled box, plus the elastic slack
        ch, cw = crop.shape
        radius = 0.5 * np.hypot(ch, cw) * scale
        extent = 2 * radius
        slack = ELASTIC * extent
        half = int(np.ceil(radius + slack)) + 1
        side = 2 * half + 1
        # 2. elastic displacement: random control points, linearly interpolated (smooth, mild)
        weights = _linear_weights(side, _ELASTIC_GRID)
        dy = (
            weights
            @ rng.uniform(-slack, slack, (_ELASTIC_GRID, _ELASTIC_GRID)).astype(np.float32)
            @ weights.T
        )
        dx = (
            weights
            @ rng.uniform(-slack, slack, (_ELASTIC_GRID, _ELASTIC_GRID)).astype(np.float32)
            @ weights.T
        )
        # 3. inverse map each output pixel to the crop: undo elastic, rotation, flip and scale; the crop has
        #    a zero border, so every coordinate outside it (clipped) reads "no defect"
        grid = np.arange(side, dtype=np.float32) - half
        oy, ox = grid[:, None] + dy, grid[None, :] + dx
        cos, sin = float(np.cos(angle)) / scale, float(np.sin(angle)) / scale
        sy = (cos * flip_y) * oy - (sin * flip_y) * ox + (ch / 2 + 1)
        sx = (sin * flip_x) * oy + (cos * flip_x) * ox + (cw / 2 + 1)
        iy = np.clip(sy.astype(np.intp), 0, ch + 1)
        ix = np.clip(sx.astype(np.intp), 0, cw + 1)
        shape = self.padded[source].take(iy * (cw + 2) + ix)
        total = int(shape.sum())
        if total == 0:
            return None
        # 4. placement: centre on a foreground pixel (objects) or anywhere (textures)
        if allowed is None:
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
        else:
            pick = int(rng.integers(len(allowed[0])))
            cy, cx = int(allowed[0][pick]), int(allowed[1][pick])
        y0, x0 = cy - half, cx - half
        ys0, xs0 = max(0, -y0), max(0, -x0)
        ys1, xs1 = min(side, h - y0), min(side, w - x0)
        if ys1 <= ys0 or xs1 <= xs0:
            return None
        kept = shape[ys0:ys1, xs0:xs1]
        kept_total = int(kept.sum())
        if kept_total == 0 or (total - kept_total) > self.max_cut_off * total:
            return None
        area = kept_total / (h * w)
        if not self.area_range[0] <= area <= self.area_range[1]:
            return None
        mask = np.zeros((h, w), dtype=bool)
        mask[y0 + ys0 : y0 + ys1, x0 + xs0 : x0 + xs1] = kept
        return mask

    def is_fallback(self, mask: np.ndarray, source: int) -> bool:
        """Whether ``mask`` is the fallback of real mask ``source`` (that mask resized, not a new shape):
        provenance marks such items, since they repeat a real defect's shape and place."""
        mask = np.asarray(mask) > 0
        return bool(np.array_equal(mask, self._fallback(source, *mask.shape)))

    def _fallback(self, source: int, h: int, w: int) -> np.ndarray:
        """The real mask resized (nearest) to the canvas: always inside, never empty, area in range."""
        real = self.masks[source]
        ys = (np.arange(h) * real.shape[0] / h).astype(np.intp)
        xs = (np.arange(w) * real.shape[1] / w).astype(np.intp)
        mask = real[ys[:, None], xs[None, :]]
        if not mask.any():  # a mask thinner than one canvas pixel: keep its centre pixel
            _, (cy, cx) = self.crops[source]
            mask[min(h - 1, int(cy * h / real.shape[0])), min(w - 1, int(cx * w / real.shape[1]))] = True
        return mask


def contact_sheet(normals: Sequence[np.ndarray], masks: Sequence[np.ndarray], columns: int = 4):
    """A PIL picture of sampled masks over their normals (mask pixels tinted red), ``columns`` per row:
    the way to look at what the sampler does."""
    import PIL.Image

    tiles = []
    for normal, mask in zip(normals, masks, strict=True):
        rgb = np.asarray(normal)
        rgb = np.repeat(rgb[..., None], 3, axis=2) if rgb.ndim == 2 else rgb[..., :3]
        tile = rgb.astype(np.float32)
        tile[mask] = 0.4 * tile[mask] + 0.6 * np.array([255, 0, 0], dtype=np.float32)
        tiles.append(tile.astype(np.uint8))
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * h, min(columns, len(tiles)) * w, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * h : r * h + tile.shape[0], c * w : c * w + tile.shape[1]] = tile
    return PIL.Image.fromarray(sheet)
