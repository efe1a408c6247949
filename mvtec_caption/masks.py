"""Masks as PNG bytes in mode `L` with values 0/255, checked against their image's size."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import MVTecCaptionError
from .images import decode, image_size
from .layout import Record


def binarize(array: np.ndarray) -> np.ndarray:
    """Any non-zero pixel is defect: LOCO region files use values below 255 (see defects_config.json)."""
    return np.where(array > 0, 255, 0).astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@functools.lru_cache(maxsize=32)
def zero_mask_png(size: tuple[int, int]) -> bytes:
    """The all-zero mask of a normal image; shared by every normal image of that size."""
    width, height = size
    return encode_png(np.zeros((height, width), dtype=np.uint8))


def _check_size(record: Record, mask: Path, mask_size: tuple[int, int], size: tuple[int, int]) -> None:
    if mask_size != size:
        raise MVTecCaptionError(
            f"{record.category}/{record.defect_type}: mask {mask} is {mask_size[0]}x{mask_size[1]} but image "
            f"{record.image} is {size[0]}x{size[1]} (image {record.index + 1} of {record.count})"
        )


def check_mask_sizes(record: Record) -> tuple[int, int]:
    """The image's size, after a header-only check of every mask file, so a mismatch stops the build
    before anything is written."""
    size = image_size(record.image)
    for mask in record.masks:
        _check_size(record, mask, image_size(mask), size)
    return size


def _read_mask(path: Path, size: tuple[int, int], record: Record) -> tuple[np.ndarray, str, bytes]:
    data = path.read_bytes()
    with decode(data, path) as mask:  # decoded in full: a truncated mask stops the build here, named
        _check_size(record, path, mask.size, size)
        return np.asarray(mask.convert("L")), mask.mode, data


def mask_png(record: Record, size: tuple[int, int]) -> bytes:
    """The record's mask: the union of its region files (one file for AD), binarised to 0/255.

    An anomaly whose mask is empty would teach the model a defect with no location: refused."""
    if not record.masks:
        return zero_mask_png(size)
    first, mode, data = _read_mask(record.masks[0], size, record)
    union = first > 0
    for path in record.masks[1:]:
        union |= _read_mask(path, size, record)[0] > 0
    if not union.any():
        names = ", ".join(str(p) for p in record.masks)
        raise MVTecCaptionError(
            f"{record.category}/{record.defect_type}: the mask of anomaly {record.image} is all zero ({names}); "
            "an anomaly needs its defect region marked"
        )
    is_png = data[:8] == b"\x89PNG\r\n\x1a\n"
    if len(record.masks) == 1 and is_png and mode == "L" and not ((first != 0) & (first != 255)).any():
        return data  # already what we store (MVTec AD): no re-encoding
    return encode_png(binarize(union))
