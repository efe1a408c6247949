"""The bookkeeping the demo base's two pre-trainings (VAE, CLIP towers) share: one home for their loop."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


class CosineAdamW:
    """AdamW with cosine decay over ``steps``, a progress bar named ``desc`` and the loss curve.

    ``for _ in loop: ... loop.step(loss)`` runs ``steps`` optimisation steps; ``loop.losses`` is the curve."""

    def __init__(self, params, steps: int, lr: float, desc: str):
        self.opt = torch.optim.AdamW(params, lr=lr)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, steps)
        self.bar = tqdm(range(steps), desc=desc)
        self.losses: list[float] = []

    def __iter__(self):
        return iter(self.bar)

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.losses.append(loss.item())
        self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}")
