"""Reconstruction pre-training for a tiny from-scratch VAE: a random VAE cannot reconstruct, and the
diffusion model trains in its latent space, so the demo teaches it first (no pretrained weights here)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def pretrain_vae(
    vae,
    images: list[np.ndarray],
    *,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
) -> list[float]:
    """Trains ``vae`` in place on uint8 HxWx3 ``images`` (L1 + tiny KL); returns the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    bar = tqdm(range(steps), desc="VAE pre-training")
    for _ in bar:
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x = data[idx]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    vae.requires_grad_(False)
    return losses
