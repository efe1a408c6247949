"""`axf generate`: batch anomaly synthesis from folders of normal images and masks.

Each image is paired with the mask of the same file stem (``000.png`` ↔ ``000.png`` or ``000_mask.png``);
a missing or extra mask is an error naming the file. For every pair and every sample the command
writes ``<stem>_<k>.png`` (the image) and ``<stem>_<k>_mask.png`` (the mask it was made with) to the
output folder, plus one line per sample in ``metadata.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument(
        "--padding-mask-crop", type=int, default=None, help="generate a padded box around the mask"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    parser.add_argument(
        "--seed", type=int, default=0, help="sample k of image i uses seed + i * num_per_image + k"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--lora", default=None, help="UNet LoRA weights (folder or Hub id) to load")


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


def run(args: argparse.Namespace) -> int:
    import PIL.Image
    import torch
    from tqdm.auto import tqdm

    from .pipeline_anomaly_x_fusion import AnomalyXFusionPipeline

    if args.num_per_image < 1 or args.batch_size < 1:
        raise ValueError("--num-per-image and --batch-size must be at least 1")
    pairs = pair_images_and_masks(args.images, args.masks)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    pipe = AnomalyXFusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    pipe.set_progress_bar_config(disable=True)
    reference = PIL.Image.open(args.reference_image) if args.reference_image else None
    reference_mask = PIL.Image.open(args.reference_mask) if args.reference_mask else None

    args.output.mkdir(parents=True, exist_ok=True)
    n = args.num_per_image
    with open(args.output / "metadata.jsonl", "w") as meta:
        for start in tqdm(range(0, len(pairs), args.batch_size), desc="axf generate", unit="batch"):
            chunk = pairs[start : start + args.batch_size]
            seeds = [args.seed + (start + i) * n + k for i in range(len(chunk)) for k in range(n)]
            out = pipe(
                prompt=args.prompt,
                image=[PIL.Image.open(img) for img, _ in chunk],
                mask_image=[PIL.Image.open(msk) for _, msk in chunk],
                reference_image=reference,
                reference_mask=reference_mask,
                negative_prompt=args.negative_prompt,
                num_images_per_prompt=n,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                strength=args.strength,
                height=args.height,
                width=args.width,
                padding_mask_crop=args.padding_mask_crop,
                generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds],
            )
            for j, (image, mask) in enumerate(zip(out.images, out.masks, strict=True)):
                src_image, src_mask = chunk[j // n]
                name = f"{src_image.stem}_{j % n}"
                image.save(args.output / f"{name}.png")
                mask.save(args.output / f"{name}_mask.png")
                record = {
                    "file_name": f"{name}.png",
                    "mask": f"{name}_mask.png",
                    "prompt": args.prompt,
                    "source_image": str(src_image),
                    "source_mask": str(src_mask),
                    "seed": seeds[j],
                }
                meta.write(json.dumps(record) + "\n")
    print(f"wrote {len(pairs) * n} images and masks to {args.output}")
    return 0
