"""Reconstruction pre-training for a tiny from-scratch VAE: a random VAE cannot reconstruct, and the
diffusion model trains in its latent space, so the demo teaches it first (no pretrained weights here)."""

from __future__ import annotations

import numpy as np
import torch

from .pretraining import CosineAdamW


def pretrain_vae(
    vae,
    images: list[np.ndarray],
    masks: list[np.ndarray] | None = None,
    *,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-3,
    defect_weight: float = 10.0,
    interpolation_weight: float = 1.0,
    seed: int = 0,
) -> list[float]:
    """Trains ``vae`` in place on uint8 HxWx3 ``images`` as a plain autoencoder; returns the loss curve.

    * Defects are a small share of the pixels, so an unweighted loss learns the grey background and
      washes their colours out: pixels inside ``masks`` weigh ``1 + defect_weight``.
    * It decodes the posterior mean, then fixes the posterior variance to (almost) zero: a few hundred
      steps cannot teach a KL-VAE a small variance, and training samples the posterior, so a wide one
      would bury the latents in noise.
    * ``interpolation_weight``: the decoder also learns that a code part-way between two images' codes
      decodes to the same mix of their pixels. A diffusion model commits to a defect gradually, and a
      plain autoencoder's decoder is arbitrary between the codes it was trained on: at seed 2 a red
      defect's code halfway from the background's decoded green, and the generator trained on that VAE
      never drew red, from caption or reference, at any training seed. SD's VAE has smooth latents; this
      gives ours the same property. (Gaussian noise on the codes, as a KL-VAE's posterior sampling adds,
      was tried for the same fault and moved it to yellow.)
    * ``scaling_factor`` is set so that latents have unit variance, as Stable Diffusion's 0.18215 does
      for its own VAE (the default is meaningless for a VAE trained here)."""
    gen = torch.Generator().manual_seed(seed)
    vae.requires_grad_(True)  # a further round trains a VAE the last one froze
    data = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    weights = torch.ones_like(data[:, :1])
    if masks is not None:
        weights = weights + defect_weight * (torch.from_numpy(np.stack(masks))[:, None] > 127).float()
    vae.train()
    loop = CosineAdamW(vae.parameters(), steps, lr, "VAE pre-training")
    for _ in loop:
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x, w = data[idx], weights[idx]
        if torch.rand((), generator=gen) < 0.5:
            x, w = x.flip(-1), w.flip(-1)
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        loss = (w * (recon - x).abs()).mean() / w.mean()
        if interpolation_weight:
            perm = torch.randperm(len(x), generator=gen)
            a = torch.rand(len(x), 1, 1, 1, generator=gen)
            mixed = vae.decode(z + a * (z[perm] - z)).sample
            wm = torch.maximum(w, w[perm])
            target = x + a * (x[perm] - x)
            loss = loss + interpolation_weight * (wm * (mixed - target).abs()).mean() / wm.mean()
        loop.step(loss)
    vae.eval()
    vae.requires_grad_(False)
    _fix_posterior_variance(vae)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in data.split(64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return loop.losses


def pretrain_vae_to_ceiling(
    vae,
    images,
    masks,
    ceiling_of,
    *,
    steps: int,
    seed: int,
    min_ceiling: float,
    extra_rounds: int = 3,
    log=print,
) -> tuple[list[float], float]:
    """``pretrain_vae``, then up to ``extra_rounds`` further rounds of ``steps // 2`` while ``ceiling_of(vae)``
    (the share of defects that survive the round trip) is below ``min_ceiling``; returns (losses, ceiling).

    A real base's VAE (Stable Diffusion's) reconstructs every colour; one trained from scratch for a fixed
    number of steps did not at every seed (400 plain steps lost half of seed 3's red defects; a lost
    colour caps text controllability whatever the generator learns; ``benchmarks/bench_demo_base.py``)."""
    losses = pretrain_vae(vae, images, masks, steps=steps, seed=seed)
    ceiling = ceiling_of(vae)
    for extra in range(1, extra_rounds + 1):
        if ceiling >= min_ceiling:
            break
        log(f"VAE round trip keeps colour and shape of {ceiling:.0%} of the defects; {steps // 2} more steps")
        losses += pretrain_vae(vae, images, masks, steps=steps // 2, seed=seed + extra)
        ceiling = ceiling_of(vae)
    return losses, ceiling


@torch.no_grad()
def _fix_posterior_variance(vae, logvar: float = -30.0) -> None:
    """The log-variance half of ``quant_conv`` outputs a constant (diffusers clamps it at -30)."""
    conv = vae.quant_conv
    if conv is None:
        raise ValueError("pretrain_vae needs an AutoencoderKL with quant_conv (use_quant_conv=True)")
    half = conv.out_channels // 2
    conv.weight[half:] = 0
    conv.bias[half:] = logvar


def to_model_input(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> a (1, 3, H, W) batch in [-1, 1], what the VAE takes."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """The first image of a VAE output batch, back to uint8 HxWx3."""
    return ((x[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


@torch.no_grad()
def reconstruction_accuracy(
    vae, images: list[np.ndarray], masks: list[np.ndarray], truth: list[tuple[str, str]]
) -> float:
    """Share of defects whose colour and shape the demo's pixel reader still finds after a VAE round trip:
    the ceiling of every controllability figure (a VAE that loses every red defect caps it at 3/4)."""
    from .measure import read_defect

    vae.eval()
    ok = 0
    for image, mask, expected in zip(images, masks, truth, strict=True):
        recon = to_uint8(vae.decode(vae.encode(to_model_input(image)).latent_dist.mode()).sample)
        background = image.copy()
        background[mask > 0] = 128  # the reader compares with a normal image; grey inside the mask
        ok += read_defect(recon, background, mask)[:2] == tuple(expected)
    return ok / max(len(truth), 1)
