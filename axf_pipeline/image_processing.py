"""Input checks for images and masks: the one home for them (pipeline, batch command and training).

Conventions (documented in the README and tested):

* An **image** becomes a float32 tensor ``(3, H, W)`` in ``[0, 1]``. Accepted: PIL images in mode
  ``RGB``, ``L``/``1`` (grayscale, replicated to RGB, as for MVTec grid/screw/zipper) and ``P`` without
  transparency; ``uint8`` or ``[0, 1]`` float NumPy arrays ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)``; float
  tensors in ``[0, 1]`` ``(1|3, H, W)``. Rejected with a ``ValueError`` naming the argument: alpha
  channels (RGBA, LA, transparent palettes), 16-bit or 32-bit integer images and other colour modes,
  values outside ``[0, 1]``.
* A **mask** becomes a float32 tensor ``(1, H, W)`` with values in ``{0, 1}``. It must be
  single-channel (PIL ``L``/``1``/``P``, arrays ``(H, W)``/``(H, W, 1)``, tensors ``(H, W)``/``(1, H, W)``).
  Binarisation rule: **every non-zero pixel is defect**. So a soft or anti-aliased mask is
  widened rather than shrunk and a LOCO region mask stored with a value below 255 is kept whole.
  An all-zero mask is an error: there would be nothing to synthesise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

# The generation window when none is asked for: ``None`` is the window training crops show a defect in
# (:func:`mask_crop_region`: native scale, shrunk only when the defect does not fit), so a defect is generated
# at the scale the model learned. An int is diffusers' padded box instead. The one default of the pipeline's
# ``padding_mask_crop``, of ``axf synthesize`` / ``axf generate --padding-mask-crop`` and of the demo.
DEFAULT_PADDING_MASK_CROP: int | None = None

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _describe(name: str, index: int | None) -> str:
    return name if index is None else f"{name}[{index}]"


def _pil_to_array(image: PIL.Image.Image, what: str, *, mask: bool) -> np.ndarray:
    mode = image.mode
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        raise ValueError(
            f"{what} has an alpha channel (PIL mode {mode!r}); flatten it first, e.g. image.convert('RGB')"
        )
    if mode in _WIDE_MODES:
        raise ValueError(
            f"{what} is a 16/32-bit image (PIL mode {mode!r}); only 8-bit images are supported — "
            "rescale it to 8 bits first"
        )
    if mask:
        if mode in ("1", "L", "P"):
            return np.asarray(image.convert("L"))
        raise ValueError(f"{what} must be single-channel (PIL mode 'L' or '1'), got mode {mode!r}")
    if mode in ("RGB", "L", "1", "P"):
        return np.asarray(image.convert("RGB"))
    raise ValueError(f"{what} has unsupported PIL mode {mode!r}; convert it to 'RGB' first")


def _array_to_float(array: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    """uint8 → /255; bool → {0, 1}; floats must already lie in [0, 1]."""
    tensor = torch.from_numpy(np.array(array)) if isinstance(array, np.ndarray) else array
    if tensor.dtype == torch.bool:
        return tensor.float()
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if tensor.is_floating_point():
        tensor = tensor.float()
        if tensor.numel() and (not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1):
            raise ValueError(
                f"{what}: float values must lie in [0, 1], got range [{tensor.min().item():.3g}, "
                f"{tensor.max().item():.3g}] (for [-1, 1] data pass (x + 1) / 2)"
            )
        return tensor
    raise ValueError(
        f"{what} has dtype {tensor.dtype}; only 8-bit (uint8), bool or [0, 1] float data are supported "
        "(16-bit images must be rescaled to 8 bits first)"
    )


def to_rgb_tensor(image, name: str = "image", index: int | None = None) -> torch.Tensor:
    """One image → float32 ``(3, H, W)`` in [0, 1] (see the module docstring for what is accepted)."""
    what = _describe(name, index)
    if isinstance(image, PIL.Image.Image):
        return _array_to_float(_pil_to_array(image, what, mask=False), what).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{what}: expected an array (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
        if image.shape[-1] == 4:
            raise ValueError(f"{what} has an alpha channel (shape {image.shape}); drop it first")
        tensor = _array_to_float(image, what).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(f"{what}: expected a tensor (3, H, W) or (1, H, W), got {tuple(image.shape)}")
        if image.shape[0] == 4:
            raise ValueError(f"{what} has an alpha channel (shape {tuple(image.shape)}); drop it first")
        tensor = _array_to_float(image.detach().cpu(), what)
    else:
        raise ValueError(
            f"{what}: expected a PIL image, NumPy array or torch tensor, got {type(image).__name__}"
        )
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor.contiguous()


def to_mask_tensor(mask, name: str = "mask_image", index: int | None = None) -> torch.Tensor:
    """One mask → float32 ``(1, H, W)`` in {0, 1}; every non-zero pixel is defect. Errors if all zero."""
    what = _describe(name, index)
    if isinstance(mask, PIL.Image.Image):
        tensor = _array_to_float(_pil_to_array(mask, what, mask=True), what)[None]
    elif isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim != 2:
            raise ValueError(
                f"{what} must be single-channel: expected shape (H, W) or (H, W, 1), got {mask.shape}"
            )
        tensor = _array_to_float(mask, what)[None]
    elif isinstance(mask, torch.Tensor):
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3 or mask.shape[0] != 1:
            raise ValueError(
                f"{what} must be single-channel: expected shape (H, W) or (1, H, W), got {tuple(mask.shape)}"
            )
        tensor = _array_to_float(mask.detach().cpu(), what)
    else:
        raise ValueError(
            f"{what}: expected a PIL image, NumPy array or torch tensor, got {type(mask).__name__}"
        )
    binary = binarize_mask(tensor)
    if not binary.any():
        raise ValueError(f"{what} is empty (all zero): there is no region to synthesise a defect in")
    return binary


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """The project's one binarisation rule: any non-zero value is defect (1.0), zero is normal (0.0)."""
    return (mask > 0).to(torch.float32)


def _split_batch(value, name: str, *, mask: bool) -> list:
    """A single item or a list/batched array/tensor → list of single items (no conversion yet)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} is an empty list")
        return list(value)
    if isinstance(value, torch.Tensor) and value.ndim == 4:
        if mask and value.shape[1] != 1:
            raise ValueError(
                f"{name} must be single-channel: expected a batch (B, 1, H, W), got {tuple(value.shape)}"
            )
        return list(value)
    if isinstance(value, np.ndarray) and value.ndim == 4:
        if mask and value.shape[-1] != 1:
            raise ValueError(
                f"{name} must be single-channel: expected a batch (B, H, W, 1), got {value.shape}"
            )
        return list(value)
    return [value]


def images_to_tensors(images, name: str = "image") -> list[torch.Tensor]:
    """An image, a list of images or a batched array/tensor → list of ``(3, H, W)`` tensors in [0, 1]."""
    items = _split_batch(images, name, mask=False)
    many = len(items) > 1 or isinstance(images, (list, tuple))
    return [to_rgb_tensor(x, name, i if many else None) for i, x in enumerate(items)]


def masks_to_tensors(masks, name: str = "mask_image") -> list[torch.Tensor]:
    """A mask, a list of masks or a batched array/tensor → list of binary ``(1, H, W)`` tensors."""
    items = _split_batch(masks, name, mask=True)
    many = len(items) > 1 or isinstance(masks, (list, tuple))
    return [to_mask_tensor(x, name, i if many else None) for i, x in enumerate(items)]


def check_same_sizes(
    images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], image_name="image", mask_name="mask_image"
):
    """Each mask must have its image's height and width (after broadcasting a single item)."""
    n = resolve_batch_size(**{image_name: len(images), mask_name: len(masks)})
    for i in range(n):
        img = images[i if len(images) > 1 else 0]
        msk = masks[i if len(masks) > 1 else 0]
        if img.shape[-2:] != msk.shape[-2:]:
            raise ValueError(
                f"{mask_name}{f'[{i}]' if n > 1 else ''} is {msk.shape[-1]}x{msk.shape[-2]} (WxH) but "
                f"{image_name}{f'[{i}]' if n > 1 else ''} is {img.shape[-1]}x{img.shape[-2]}: they must match"
            )


def resolve_batch_size(**counts: int | None) -> int:
    """The common batch size of named inputs; each count must be 1 (broadcast) or that size."""
    given = {k: v for k, v in counts.items() if v is not None}
    batch = max(given.values(), default=1)
    bad = {k: v for k, v in given.items() if v not in (1, batch)}
    if bad:
        listing = ", ".join(f"{k}: {v}" for k, v in given.items())
        raise ValueError(f"mismatched batch sizes ({listing}); each must be 1 or the same number")
    return batch


def broadcast(items: list, batch_size: int) -> list:
    return items * batch_size if len(items) == 1 else list(items)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary mask ``(B, 1, H, W)`` resized so that every output pixel touching the defect is defect."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    # "area" is an adaptive average pool: any overlap with the defect gives a non-zero value.
    return binarize_mask(F.interpolate(mask.float(), size=tuple(size), mode="area"))


def latent_mask(mask: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Pixel mask → latent-resolution mask: a latent cell is masked if any of its pixels is (max-pool)."""
    return F.max_pool2d(mask.float(), kernel_size=scale_factor, stride=scale_factor, ceil_mode=True)


# ---------------------------------------------------------------------------- the window around a defect
def mask_box(mask: np.ndarray | torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` of a mask's non-zero pixels (exclusive end); None when it is empty."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    array = array.reshape(array.shape[-2:])
    ys, xs = np.nonzero(array)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def crop_window(
    width: int,
    height: int,
    box: tuple[int, int, int, int] | None,
    size: tuple[int, int],
    shift: tuple[float, float] = (0.0, 0.0),
) -> tuple[int, int, int, int]:
    """Where a defect is seen at the model's size, for training crops and sampling alike.

    The image is first resized to ``(new_w, new_h)`` and then cut at ``(x0, y0)`` to ``size = (h, w)``.
    The image keeps its native detail unless it is smaller than the window (upscaled to cover it) or
    the defect ``box`` is larger than the window (downscaled until it fits, never below covering the
    window). The window is centred on the defect; ``shift`` in ``[-1, 1]`` moves it by that fraction
    of the room that keeps the defect's centre inside (training's jitter). Returns ``(new_w, new_h, x0, y0)``.
    """
    out_h, out_w = size
    box = box or (0, 0, width, height)
    cover = max(out_w / width, out_h / height)
    scale = max(cover, 1.0)
    fit = max((box[2] - box[0]) * scale / out_w, (box[3] - box[1]) * scale / out_h)
    if fit > 1:
        scale = max(scale / fit, cover)
    new_w, new_h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
    sx, sy = new_w / width, new_h / height
    cx, cy = (box[0] + box[2]) / 2 * sx, (box[1] + box[3]) / 2 * sy
    x0 = min(max(cx - out_w / 2, 0), new_w - out_w)
    y0 = min(max(cy - out_h / 2, 0), new_h - out_h)
    room_x = min(out_w / 2, x0, new_w - out_w - x0)
    room_y = min(out_h / 2, y0, new_h - out_h - y0)
    x0, y0 = round(x0 + shift[0] * room_x), round(y0 + shift[1] * room_y)
    return new_w, new_h, min(max(x0, 0), new_w - out_w), min(max(y0, 0), new_h - out_h)


def mask_crop_region(mask: torch.Tensor, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The :func:`crop_window` of a ``(1, H, W)`` mask (centred, no shift) in the mask's own pixels:
    ``(x1, y1, x2, y2)``. Cropping there and resizing to ``size`` shows the defect at the scale training
    crops show it."""
    height, width = mask.shape[-2:]
    new_w, new_h, x0, y0 = crop_window(width, height, mask_box(mask), size)
    out_h, out_w = size
    sx, sy = new_w / width, new_h / height
    x1, y1 = int(np.floor(x0 / sx)), int(np.floor(y0 / sy))
    x2, y2 = int(np.ceil((x0 + out_w) / sx)), int(np.ceil((y0 + out_h) / sy))
    return max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
