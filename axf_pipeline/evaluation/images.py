"""One way to turn whatever a user hands us (paths, PIL images, arrays, tensors) into RGB pixels.

Every metric of this subpackage reads images through :func:`to_rgb_uint8`, so generated images and real
references are always converted the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["load_mask", "to_rgb_uint8", "resize_rgb"]


def _read(path: str | os.PathLike, mode: str, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with Image.open(path) as im:
        return im.convert(mode)


def to_rgb_uint8(image, *, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 from a path, PIL image, (H, W[, C]) array or (C, H, W) tensor.

    Float inputs must lie in [0, 1]; grayscale is replicated to three channels, alpha is dropped.
    """
    if isinstance(image, str | os.PathLike):
        image = _read(image, "RGB", f"{name}: image file")
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected an (H, W), (H, W, C) or (C, H, W) image; got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ValueError(
                f"{name}: float images must lie in [0, 1]; got range [{arr.min():g}, {arr.max():g}]"
            )
        arr = np.round(arr * 255).astype(np.uint8)
    arr = arr[..., :3]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def resize_rgb(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W, 3) uint8 image to ``size`` (int → square; tuple → (H, W))."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def load_mask(mask, *, size: tuple[int, int] | None = None, name: str = "mask") -> np.ndarray:
    """(H, W) bool from a mask path / PIL image / array; nearest-neighbour resize keeps it binary."""
    from .localization import binary_mask

    if isinstance(mask, str | os.PathLike):
        mask = _read(mask, "L", f"{name}: mask file")
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    arr = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
    arr = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) else arr
    arr = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a single-channel mask; got shape {arr.shape}")
    out = binary_mask(arr, name=name)
    if size is not None and out.shape != tuple(size):
        out = np.asarray(Image.fromarray(out.astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)) > 0
    return out
