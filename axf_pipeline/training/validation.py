"""The validation grid: one row per example, ``normal | mask | generated``, logged to the trackers and saved.

Each row puts a training defect's mask, caption and texture (as the reference) on a normal image of the
same category, so the grid shows whether the defect lands in the mask and looks like its caption.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)


def validation_examples(train, normals, count: int) -> list[dict]:
    """``count`` (canvas, mask, caption, reference, reference mask) tuples; a normal canvas of the defect's
    category when there is one, else the defect image itself."""
    categories = train["category"] if isinstance(train["category"], list) else list(train["category"])
    normal_categories = list(normals["category"]) if len(normals) else []
    examples = []
    for i in range(min(count, len(train))):
        row = train[i]
        mask = row["mask"].convert("L")
        canvas = row["image"]
        if categories[i] in normal_categories:
            canvas = normals[normal_categories.index(categories[i])]["image"]
        canvas = canvas.convert("RGB")
        examples.append(
            {
                "image": canvas,
                "mask_image": mask.resize(canvas.size, Image.NEAREST),
                "prompt": row["caption"],
                "reference_image": row["image"].convert("RGB"),
                "reference_mask": mask,
            }
        )
    return examples


def make_grid(rows: list[list[Image.Image]], size: int) -> Image.Image:
    grid = Image.new("RGB", (size * len(rows[0]), size * len(rows)))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((size, size), Image.BICUBIC), (c * size, r * size))
    return grid


@torch.no_grad()
def log_validation(accelerator, pipe, train, normals, args, step: int) -> Path:
    """Samples the grid with the weights being trained, logs it to every tracker and saves it as PNG."""
    examples = validation_examples(train, normals, args.num_validation_images)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for i, example in enumerate(examples):
        generator = torch.Generator(device="cpu").manual_seed(args.seed + i)
        with accelerator.autocast():
            out = pipe(
                **example,
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.validation_inference_steps,
                generator=generator,
                output_type="pil",
            )
        rows.append([example["image"], example["mask_image"], out.images[0]])
    grid = make_grid(rows, min(args.resolution, 256))
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid, caption="normal | mask | generated")}, step=step)
    logger.info("Validation grid (normal | mask | generated): %s", path)
    return path
