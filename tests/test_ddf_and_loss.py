"""DDF's residual form and the loss's defaults and latent factor (details the larger tests leave open)."""

import pytest
import torch

from axf_pipeline import DynamicDifFusion
from axf_pipeline.training.loss import noise_prediction_loss


def test_ddf_adds_its_mlp_output_to_the_x_embedding():
    ddf = DynamicDifFusion(cross_attention_dim=8, timestep_channels=4)
    with torch.no_grad():
        ddf.mlp[-1].bias.fill_(0.5)  # output layer: weights still zero, so the MLP outputs its bias
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(ddf(x, 10), x + 0.5)
    torch.testing.assert_close(ddf(x, [3, 700]), x + 0.5)  # timesteps as a list: one per example


def test_loss_defaults_to_the_mask_only_weight_and_pools_the_mask_by_the_latent_factor():
    pred, target = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)
    pred[..., 1, 3] = 2.0  # error 4 in latent cell (1, 3), 0 elsewhere
    mask = torch.zeros(1, 1, 16, 32)  # latent factor 8 on both sides of a non-square image
    mask[..., 8:16, 24:32] = 1  # exactly that cell
    assert noise_prediction_loss(pred, target, mask).item() == pytest.approx(4.0)  # w = 1 by default
    mask = torch.zeros(1, 1, 16, 32)
    mask[..., 0:8, 0:8] = 1  # cell (0, 0): error 0 there
    assert noise_prediction_loss(pred, target, mask).item() == 0.0
    assert noise_prediction_loss(pred, target, mask, 0.0).item() == pytest.approx(4.0 / 8)


def test_loss_and_ddf_keep_the_precision_they_work_in():
    """float64 weights or masks do not turn the float32 loss into float64; a float64 (or half) DDF takes the
    float32 sinusoidal timestep embedding in its own precision."""
    pred, target = torch.randn(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.float64)
    weights = torch.ones(2, dtype=torch.float64)
    assert noise_prediction_loss(pred, target, mask, 1.0).dtype == torch.float32
    assert noise_prediction_loss(pred, target, None, 0.0, weights).dtype == torch.float32
    ddf = DynamicDifFusion(cross_attention_dim=8, timestep_channels=4).to(torch.float64)
    assert ddf(torch.randn(1, 2, 8, dtype=torch.float64), 5).dtype == torch.float64
