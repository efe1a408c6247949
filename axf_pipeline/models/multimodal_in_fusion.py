"""Multi-modal In-Fusion (MIF, paper §4.2): text, mask and texture fused into the X-embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class MaskEncoder(nn.Module):
    """E_mask: a small strided CNN over the binary location mask (trained from scratch)."""

    def __init__(self, channels: tuple[int, ...], grid_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1
        for out_ch in channels:
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1), nn.SiLU()]
            in_ch = out_ch
        self.net = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(grid_size)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.net(mask))


class MultiModalInFusion(ModelMixin, ConfigMixin):
    r"""Builds the X-embedding ``e_X = concat(e_sem, e_loc, e_tex)`` refined by ``e_X + MLP(SelfAttn(e_X))``.

    * semantic (eq. 1): the pooled CLIP text embedding, projected to ``d`` by a learned linear layer,
      L2-normalised, then scaled by a learned per-channel gain (initialised to ``sqrt(d)``), repeated
      ``k`` times. The gain is ours, not the paper's: a unit-norm token beside LayerNorm'd tokens of norm
      about ``sqrt(d)`` (the texture tokens, CLIP's own prompt tokens) barely moves cross-attention, so the
      text reached the UNet only through the prompt tokens and learning it was left to the seed;
    * location (eq. 2): mask encoder + one conv (channels → ``k``) + one linear (grid → ``d``);
    * textural (eq. 3): the CLIP image embedding of ``reference ⊙ reference_mask`` projected to ``k × d``.
      Without a reference the projection sees a zero embedding, which training also shows it
      (``--reference_drop_prob``), so "no reference" is a learned, documented state.

    The ablations of paper table 6 are the switches ``use_semantic`` (text condition) and
    ``use_aggregator`` (MIF refinement); DDF is ablated by leaving the pipeline's ``ddf`` out.
    """

    @register_to_config
    def __init__(
        self,
        cross_attention_dim: int = 768,
        text_embed_dim: int = 768,
        image_embed_dim: int = 768,
        num_tokens: int = 4,
        mask_size: int = 64,
        mask_encoder_channels: tuple[int, ...] = (16, 32, 64, 128),
        mask_grid_size: int = 8,
        num_attention_heads: int = 8,
        use_semantic: bool = True,
        use_aggregator: bool = True,
    ):
        super().__init__()
        d, k = cross_attention_dim, num_tokens
        if d % num_attention_heads:
            raise ValueError(
                f"cross_attention_dim={d} must be divisible by num_attention_heads={num_attention_heads}"
            )
        self.semantic_proj = nn.Linear(text_embed_dim, d)
        self.semantic_gain = nn.Parameter(torch.full((d,), float(d) ** 0.5))
        self.mask_encoder = MaskEncoder(tuple(mask_encoder_channels), mask_grid_size)
        self.location_conv = nn.Conv2d(mask_encoder_channels[-1], k, kernel_size=1)
        self.location_fc = nn.Linear(mask_grid_size * mask_grid_size, d)
        self.texture_proj = nn.Linear(image_embed_dim, k * d)
        self.texture_norm = nn.LayerNorm(d)
        if use_aggregator:
            self.aggregator_norm = nn.LayerNorm(d)
            self.aggregator_attn = nn.MultiheadAttention(d, num_attention_heads, batch_first=True)
            self.aggregator_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    @property
    def num_output_tokens(self) -> int:
        return self.config.num_tokens * (3 if self.config.use_semantic else 2)

    def semantic_tokens(self, text_embeds: torch.Tensor) -> torch.Tensor:
        e = F.normalize(self.semantic_proj(text_embeds), dim=-1) * self.semantic_gain  # eq. 1, then the gain
        return e.unsqueeze(1).expand(-1, self.config.num_tokens, -1)

    def location_tokens(self, mask: torch.Tensor) -> torch.Tensor:
        size = self.config.mask_size
        mask = F.interpolate(mask.to(self.dtype), size=(size, size), mode="area")
        feat = self.location_conv(self.mask_encoder(mask))  # (B, k, g, g)
        return self.location_fc(feat.flatten(2))

    def texture_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        b = image_embeds.shape[0]
        e = self.texture_proj(image_embeds).view(b, self.config.num_tokens, self.config.cross_attention_dim)
        return self.texture_norm(e)

    def forward(
        self,
        mask: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns the X-embedding ``(B, num_output_tokens, cross_attention_dim)``.

        ``mask``: ``(B, 1, H, W)`` in [0, 1]; ``text_embeds``: pooled CLIP text ``(B, text_embed_dim)``
        (required when ``use_semantic``); ``image_embeds``: CLIP image ``(B, image_embed_dim)`` or None.
        """
        batch = mask.shape[0]
        if image_embeds is None:
            image_embeds = torch.zeros(
                batch, self.config.image_embed_dim, device=mask.device, dtype=self.dtype
            )
        parts: dict[str, torch.Tensor] = {}  # by modality: errors name the right one in every ablation
        if self.config.use_semantic:
            if text_embeds is None:
                raise ValueError("MultiModalInFusion(use_semantic=True) needs `text_embeds`.")
            parts["semantic"] = self.semantic_tokens(text_embeds.to(self.dtype))
        parts["location"] = self.location_tokens(mask)
        parts["texture"] = self.texture_tokens(image_embeds.to(self.dtype))
        for name, p in parts.items():
            if p.shape[0] != batch:
                raise ValueError(f"MultiModalInFusion: {name} batch {p.shape[0]} != mask batch {batch}")
        e_x = torch.cat(list(parts.values()), dim=1)
        if self.config.use_aggregator:
            h = self.aggregator_norm(e_x)
            h, _ = self.aggregator_attn(h, h, h, need_weights=False)
            e_x = e_x + self.aggregator_mlp(h)
        return e_x
