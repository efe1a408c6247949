"""How the UNet is conditioned (paper eqs. 1–5, 14–15), in one place for sampling and training.

The cross-attention sequence is ``concat(prompt tokens, e_t)`` with ``e_t = DDF(e_X, t)`` (or
``e_X`` when DDF is ablated). Without the text condition (``mif.config.use_semantic=False``) the
prompt tokens are left out as well, so "no text" means the UNet never sees the caption.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token states ``(B, L, d)`` for cross-attention and the pooled embedding ``(B, d_text)`` for e_sem."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    out = text_encoder(ids)
    return out.last_hidden_state, out.pooler_output


@torch.no_grad()
def encode_reference(image_encoder, feature_extractor, reference: torch.Tensor, reference_mask: torch.Tensor):
    """CLIP image embedding of ``reference ⊙ reference_mask`` (eq. 3).

    ``reference``: ``(B, 3, H, W)`` in [0, 1]; ``reference_mask``: ``(B, 1, H, W)`` in {0, 1}.
    """
    if reference.shape[0] != reference_mask.shape[0] or reference.shape[-2:] != reference_mask.shape[-2:]:
        raise ValueError(
            f"reference_image {tuple(reference.shape)} and reference_mask {tuple(reference_mask.shape)} "
            "must have the same batch size and height/width"
        )
    masked = (reference * reference_mask).float().clamp(0, 1)
    pixels = feature_extractor(images=masked, return_tensors="pt", do_rescale=False).pixel_values
    param = next(image_encoder.parameters())
    return image_encoder(pixels.to(device=param.device, dtype=param.dtype)).image_embeds


def x_embedding(mif, mask: torch.Tensor, pooled_text: torch.Tensor | None, image_embeds: torch.Tensor | None):
    """e_X from the MIF module (eqs. 1–5)."""
    return mif(mask, text_embeds=pooled_text, image_embeds=image_embeds)


def cross_attention_states(
    prompt_embeds: torch.Tensor | None, x_embeds: torch.Tensor, timestep, ddf=None, use_text: bool = True
) -> torch.Tensor:
    """The UNet's ``encoder_hidden_states`` at ``timestep`` (eq. 15)."""
    e_t = ddf(x_embeds, timestep) if ddf is not None else x_embeds
    if not use_text:
        return e_t
    if prompt_embeds is None:
        raise ValueError("cross_attention_states: prompt_embeds are required when the text condition is on")
    if prompt_embeds.shape[0] != e_t.shape[0]:
        raise ValueError(f"{prompt_embeds.shape[0]} prompt embeddings for {e_t.shape[0]} X-embeddings")
    return torch.cat([prompt_embeds.to(e_t.dtype), e_t], dim=1)
