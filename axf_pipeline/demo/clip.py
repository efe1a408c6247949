"""Contrastive pre-training for the tiny CLIP towers: what CLIP's own pre-training gives a real model.

The pipeline freezes its text and image towers (paper §4.2); a real Stable Diffusion user has CLIP's,
which separate "red" from "blue" and a red spot from a blue scratch. Randomly initialised 32-wide towers
do not: their pooled outputs barely depend on the input (mean pairwise cosine of different captions 0.49–0.93
by seed; ``benchmarks/bench_demo_base.py``), so whether the demo's generator could read the caption or the reference at all was
left to the seed. Like the VAE, the towers are therefore pre-trained here, with CLIP's objective, on the
data a base model would have seen: the captions and masked defects of the generator fold.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .pretraining import CosineAdamW


def masked_pixels(feature_extractor, images: list[np.ndarray], masks: list[np.ndarray]) -> torch.Tensor:
    """The image tower's input for each defect: ``image ⊙ mask`` (eq. 3), through the feature extractor."""
    masked = [
        img.astype(np.float32) / 255 * (m[..., None] > 127) for img, m in zip(images, masks, strict=True)
    ]
    return feature_extractor(images=masked, return_tensors="pt", do_rescale=False).pixel_values


def pretrain_clip(
    text_encoder,
    tokenizer,
    image_encoder,
    feature_extractor,
    captions: list[str],
    images: list[np.ndarray],
    masks: list[np.ndarray],
    *,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 1e-3,
    temperature: float = 0.1,
    seed: int = 0,
) -> list[float]:
    """Trains both towers in place so that the pooled text of a caption and the image embedding of its
    masked defect (``image ⊙ mask``, as eq. 3 feeds the image tower) match; returns the loss curve.

    CLIP's symmetric InfoNCE over the batch, with repeated captions treated as one class (the toy has
    few distinct captions): each image is classified among the batch's distinct captions and each
    distinct caption among the batch's images of it. A linear text projection is trained alongside and
    then dropped: the pipeline reads the text tower's own states.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pixels = masked_pixels(feature_extractor, images, masks)
    distinct = sorted(set(captions))
    labels = torch.tensor([distinct.index(c) for c in captions])
    ids = tokenizer(distinct, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    width = text_encoder.config.hidden_size
    text_projection = torch.nn.Linear(width, image_encoder.config.projection_dim, bias=False)
    params = [*text_encoder.parameters(), *image_encoder.parameters(), *text_projection.parameters()]
    text_encoder.train().requires_grad_(True)
    image_encoder.train().requires_grad_(True)
    loop = CosineAdamW(params, steps, lr, "CLIP pre-training")
    for _ in loop:
        idx = torch.randint(0, len(pixels), (batch_size,), generator=gen)
        x = pixels[idx]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        present = labels[idx].unique()
        target = (labels[idx][:, None] == present[None]).float()  # (images, distinct captions in batch)
        text = F.normalize(text_projection(text_encoder(ids[present]).pooler_output), dim=-1)
        image = F.normalize(image_encoder(x).image_embeds, dim=-1)
        logits = image @ text.T / temperature
        loss = 0.5 * (
            F.cross_entropy(logits, target.argmax(1))
            + (-(target.T * F.log_softmax(logits.T, dim=1)).sum(1) / target.T.sum(1)).mean()
        )
        loop.step(loss)
    text_encoder.eval().requires_grad_(False)
    image_encoder.eval().requires_grad_(False)
    return loop.losses
