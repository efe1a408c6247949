"""Image files of a tree: which suffixes count, their size, and a check that each one is whole.

A truncated or foreign file must stop the build with its name, not a data loader months later.
PNGs (every MVTec file) are checked by walking their chunks and CRCs, which catches truncation and
corruption at a small fraction of a full decode; other formats (JPEG, BMP, TIFF) are decoded.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import MVTecCaptionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_PIL_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _unreadable(path: Path | str, err: Exception) -> MVTecCaptionError:
    return MVTecCaptionError(
        f"{path} is not a readable image (truncated, damaged or not an image: {err or type(err).__name__})"
    )


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except _PIL_ERRORS as err:
        raise _unreadable(path, err) from err


def check_image_bytes(data: bytes, path: Path | str) -> None:
    """Raises naming `path` unless `data` is a whole image (PNG: chunks and CRCs; others: decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "PNG":
                image.verify()
            else:
                image.load()
    except _PIL_ERRORS as err:
        raise _unreadable(path, err) from err


def decode(data: bytes, path: Path | str) -> Image.Image:
    """Fully decoded image from bytes, or an error naming `path`."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except _PIL_ERRORS as err:
        raise _unreadable(path, err) from err
