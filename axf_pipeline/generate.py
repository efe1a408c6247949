"""`axf generate`: batch anomaly synthesis from folders of normal images and masks.

Each image is paired with the mask of the same file stem (``000.png`` ↔ ``000.png`` or ``000_mask.png``);
a missing or extra mask, an unreadable file or a mask of another size is an error naming the file. For
every pair and every sample the command writes ``<stem>_<k>.png`` (the image) and ``<stem>_<k>_mask.png``
(the binary mask it was made with) to the output folder, plus one line per sample in ``metadata.jsonl``.

A thin front-end over :mod:`axf_pipeline.synthesis.core` (the engine of ``axf synthesize`` too): every
input is checked before anything is written; each file is written atomically; a rerun with the same
settings, the same model weights and the same input files resumes (finished samples are skipped), while a
rerun with other settings, or with weights or inputs changed since, into the same folder is refused, so the
folder never mixes two runs. Sample k of image ``<stem>`` is seeded from ``(seed, stem, k)`` alone (the core's
:func:`~axf_pipeline.synthesis.core.item_seed`), so adding or removing other images changes no sample.
"""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
COMMAND = "axf generate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument(
        "--model", required=True, help="trained pipeline: Hub id or folder (save_pretrained layout)"
    )
    parser.add_argument("--images", required=True, type=Path, help="a normal image or a folder of them")
    parser.add_argument("--masks", required=True, type=Path, help="a mask or a folder of masks (same stems)")
    parser.add_argument("--prompt", required=True, help="defect description used for every image")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument(
        "--reference-image", type=Path, default=None, help="a real defect guiding the texture"
    )
    parser.add_argument(
        "--reference-mask", type=Path, default=None, help="its defect mask (default: whole image)"
    )
    parser.add_argument("--output", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--num-per-image", type=int, default=1, help="samples per image")
    parser.add_argument("--steps", type=int, default=50)
    from .synthesis.core import add_guidance_arguments, add_padding_mask_crop_argument

    add_guidance_arguments(parser)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    add_padding_mask_crop_argument(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    parser.add_argument(
        "--seed", type=int, default=0, help="sample k of image <stem> is seeded from (seed, stem, k) alone"
    )
    parser.add_argument("--device", default=None, help="default: accelerate's device (cuda if available)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--lora", default=None, help="UNet LoRA weights (folder or Hub id) to load")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _files(path: Path, what: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--{what}: {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--{what}: no images in {path}")
    return files


def pair_images_and_masks(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """Image ↔ mask by file stem (a ``_mask`` suffix on the mask is allowed); mismatches are errors."""
    image_files, mask_files = _files(images, "images"), _files(masks, "masks")
    if len(image_files) == 1 and len(mask_files) == 1 and images.is_file():
        return [(image_files[0], mask_files[0])]
    by_stem: dict[str, Path] = {}
    for m in mask_files:
        stem = m.stem[: -len("_mask")] if m.stem.endswith("_mask") else m.stem
        if stem in by_stem:
            raise ValueError(f"two masks for image stem {stem!r}: {by_stem[stem]} and {m}")
        by_stem[stem] = m
    pairs = []
    for img in image_files:
        if img.stem not in by_stem:
            raise FileNotFoundError(f"no mask for image {img} in {masks}")
        pairs.append((img, by_stem.pop(img.stem)))
    if by_stem:
        raise ValueError(f"masks without an image in {images}: {sorted(str(p) for p in by_stem.values())}")
    return pairs


def _check_pairs(pairs: list[tuple[Path, Path]]) -> list[tuple[int, int]]:
    """Every file readable and every mask the size of its image; returns the sizes (no pixels decoded)."""
    from .synthesis.core import SynthesisError, image_size

    sizes = []
    for image, mask in pairs:
        size, mask_size = image_size(image), image_size(mask)
        if size != mask_size:
            raise SynthesisError(
                f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is {size[0]}x{size[1]}"
            )
        sizes.append(size)
    return sizes


def _items(args: argparse.Namespace, pairs, sizes):
    import numpy as np
    import PIL.Image

    from mvtec_caption.masks import binarize

    from .synthesis.core import Item, Prepared, item_seed

    reference = reference_mask = None
    if args.reference_image:
        reference = PIL.Image.open(args.reference_image).convert("RGB")
        if args.reference_mask:
            reference_mask = PIL.Image.open(args.reference_mask).convert("L")

    def prepare(image: Path, mask: Path):
        def load() -> Prepared:
            binary = binarize(np.asarray(PIL.Image.open(mask).convert("L")))
            return Prepared(
                PIL.Image.open(image).convert("RGB"), PIL.Image.fromarray(binary, mode="L"),
                args.prompt, reference, reference_mask,
            )  # fmt: skip

        return load

    n, items = args.num_per_image, []
    for (image, mask), size in zip(pairs, sizes, strict=True):
        for k in range(n):
            name = f"{image.stem}_{k}"
            record = {
                "file_name": f"{name}.png",
                "mask": f"{name}_mask.png",
                "prompt": args.prompt,
                "source_image": str(image),
                "source_mask": str(mask),
                "seed": item_seed(args.seed, image.stem, k),
            }
            items.append(
                Item(f"{name}.png", f"{name}_mask.png", record["seed"], size, prepare(image, mask), record)
            )
    return items


def _settings(args: argparse.Namespace, pairs: list[tuple[Path, Path]]) -> dict:
    """Everything that decides the output's bytes: the flags, and the model, LoRA, inputs and reference by
    content (``"content"``: {flag: fingerprint}), never by path."""
    from .synthesis.fingerprint import files_fingerprint, model_fingerprint

    keys = ("prompt", "negative_prompt", "num_per_image", "steps", "guidance_scale", "reference_guidance_scale",
            "strength", "height", "width", "padding_mask_crop", "batch_size", "seed", "dtype")  # fmt: skip
    inputs = [(f"{i.stem}:image", i) for i, _ in pairs] + [(f"{i.stem}:mask", m) for i, m in pairs]
    content = {"--model": model_fingerprint(args.model), "--images/--masks": files_fingerprint(inputs)}
    if args.lora:
        content["--lora"] = model_fingerprint(args.lora, "--lora")
    for flag, path in (
        ("--reference-image", args.reference_image),
        ("--reference-mask", args.reference_mask),
    ):
        if path is not None:
            content[flag] = files_fingerprint([("reference", path)])
    return {k: getattr(args, k) for k in keys} | {"content": content}


def run(args: argparse.Namespace) -> int:
    from .synthesis.core import SynthesisError, report_input_error

    try:
        return _run(args)
    except (SynthesisError, FileNotFoundError, ValueError, OSError) as err:
        return report_input_error(COMMAND, err)


def _run(args: argparse.Namespace) -> int:
    import json

    from .synthesis.core import (
        SynthesisError,
        atomic_write,
        check_model,
        check_output,
        check_padding_mask_crop,
        claim_output,
        load_pipeline,
        run_items,
    )

    # 1. Check everything before writing anything
    if args.num_per_image < 1 or args.batch_size < 1:
        raise SynthesisError("--num-per-image and --batch-size must be at least 1")
    for flag, path in (
        ("--reference-image", args.reference_image),
        ("--reference-mask", args.reference_mask),
    ):
        if path is not None and not path.is_file():
            raise SynthesisError(f"{flag} {path} does not exist")
    if args.reference_mask and not args.reference_image:
        raise SynthesisError("--reference-mask needs --reference-image")
    check_padding_mask_crop(args.padding_mask_crop)
    pairs = pair_images_and_masks(args.images, args.masks)
    sizes = _check_pairs(pairs)
    check_model(args.model)
    items = _items(args, pairs, sizes)
    settings = _settings(args, pairs)
    expected = {"metadata.jsonl"} | {p for item in items for p in (item.image_path, item.mask_path)}
    check_output(args.output, COMMAND, settings, expected)
    pipe = load_pipeline(args.model, args.dtype, args.device, args.lora)

    # 2. Claim the folder, make what is missing, then the metadata of every sample
    claim_output(args.output, COMMAND, settings)
    summary = run_items(
        pipe, items, args.output, args.batch_size,
        dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
             guidance_scale=args.guidance_scale, reference_guidance_scale=args.reference_guidance_scale,
             strength=args.strength, height=args.height,
             width=args.width, padding_mask_crop=args.padding_mask_crop),
        desc=COMMAND, progress=not args.no_progress,
    )  # fmt: skip
    text = "".join(json.dumps(item.record) + "\n" for item in items)
    atomic_write(args.output / "metadata.jsonl", lambda tmp: tmp.write_text(text))
    print(summary.line(COMMAND))
    print(f"wrote {len(items)} images and masks to {args.output}")
    return 0
