"""Dynamic Dif-Fusion (DDF, paper §4.3, eq. 14): the X-embedding adjusted per diffusion timestep."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class DynamicDifFusion(ModelMixin, ConfigMixin):
    r"""``e_t = f_φ(e_X, t)``: a sinusoidal timestep embedding lifted to the token width (``e_tim``),
    concatenated with every X-embedding token and passed through a conditioned MLP.

    The MLP's output layer starts at zero and is added to ``e_X``, so an untrained DDF is the
    identity and training starts from the MIF-only model rather than from noise.
    """

    @register_to_config
    def __init__(self, cross_attention_dim: int = 768, timestep_channels: int = 320, mlp_ratio: int = 2):
        super().__init__()
        d = cross_attention_dim
        self.time_proj = Timesteps(timestep_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(timestep_channels, d)
        self.mlp = nn.Sequential(nn.Linear(2 * d, mlp_ratio * d), nn.SiLU(), nn.Linear(mlp_ratio * d, d))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x_embeds: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """``x_embeds``: ``(B, n, d)``; ``timestep``: a scalar or ``(B,)``. Returns ``(B, n, d)``."""
        batch, n, _ = x_embeds.shape
        t = torch.as_tensor(timestep, device=x_embeds.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape[0] != batch:
            raise ValueError(f"DynamicDifFusion: {t.shape[0]} timesteps for a batch of {batch}")
        e_tim = self.time_embedding(self.time_proj(t).to(x_embeds.dtype))
        joined = torch.cat([x_embeds, e_tim.unsqueeze(1).expand(-1, n, -1)], dim=-1)
        return x_embeds + self.mlp(joined)
