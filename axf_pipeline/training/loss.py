"""Eq. 17, ``||ε − ε_θ(x_t, e_t, t)||²`` (or the v target of a v-prediction base), optionally weighted
by the defect mask: per-pixel weight ``(1 − w) + w · mask`` with ``w = --loss_mask_weight``.

The default ``w`` depends on the UNet (:func:`default_loss_mask_weight`):

* 4-channel UNet: ``w = 1``, the loss counts only latent pixels under the (max-pooled) mask, as the
  authors' reference code does. Sampling (eq. 16) replaces everything outside the mask with the noised
  original at every step, so the model's predictions there are never used; spending gradient on them
  would pull the few trained parameters (MIF, DDF, LoRA) towards re-predicting the normal background
  the frozen UNet already handles.
* 9-channel inpainting UNet: ``w = 0``, plain eq. 17. There is no eq. 16 blending: the UNet's
  predictions outside the mask are kept from step to step and shape the defect through its receptive
  field, so a LoRA must stay supervised there too.

Lower ``w`` also when a UNet is trained from scratch (``--train_unet full``) and must learn whole images.
"""

from __future__ import annotations

import torch

from ..image_processing import latent_mask


def default_loss_mask_weight(unet_in_channels: int) -> float:
    """``--loss_mask_weight`` when not given: 1 for a 4-channel UNet (eq. 16 blending makes outside-mask
    predictions unused), 0 for a 9-channel inpainting UNet (they are used)."""
    return 0.0 if unet_in_channels == 9 else 1.0


def noise_prediction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_weight: float = 1.0,
    example_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error with per-pixel weight ``(1 − w) + w · mask`` (normalised per example), each
    example's error then scaled by ``example_weights`` (min-SNR weighting; None = 1).

    An example whose weights sum to zero (an empty mask with ``w = 1``) falls back to uniform weights
    rather than contributing NaN.
    """
    err = (pred.float() - target.float()).pow(2)
    if mask is None or mask_weight == 0:
        return _weighted_mean(err.flatten(1).mean(1), example_weights)
    m = latent_mask(mask, mask.shape[-1] // err.shape[-1]).to(err.dtype)  # max-pool: thin scratches survive
    weight = (1.0 - mask_weight) + mask_weight * m
    empty = weight.flatten(1).sum(1) == 0
    if empty.any():
        weight = torch.where(empty[:, None, None, None], torch.ones_like(weight), weight)
    per_example = (err * weight).flatten(1).sum(1) / (weight.flatten(1).sum(1) * err.shape[1])
    return _weighted_mean(per_example, example_weights)


def _weighted_mean(per_example: torch.Tensor, example_weights: torch.Tensor | None) -> torch.Tensor:
    if example_weights is None:
        return per_example.mean()
    return (per_example * example_weights.to(per_example)).mean()


def min_snr_weights(scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights as in diffusers' training examples: ``min(SNR, γ) / SNR`` for an ε target,
    ``min(SNR, γ) / (SNR + 1)`` for a v target. Down-weights the easy, low-noise timesteps."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr
