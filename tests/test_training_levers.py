"""train.py's levers from diffusers' training examples: --use_ema, --snr_gamma, --noise_offset."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from training_setup import make_training_setup, training_argv

from axf_pipeline.tiny import build_tiny_components
from axf_pipeline.training import TrainingInputError, parse_args
from axf_pipeline.training.checkpointing import WEIGHTS_FILE
from axf_pipeline.training.data import (
    AnomalyTrainingDataset,
    collate,
    load_mvtec_caption,
    select_training_data,
)
from axf_pipeline.training.loop import train
from axf_pipeline.training.loss import min_snr_weights, noise_prediction_loss
from axf_pipeline.training.model import BatchEncoder, step_generator

EMA_FILE = (
    "custom_checkpoint_1.pkl"  # accelerate's name for the 2nd registered object (the 1st: lr scheduler)
)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_training_setup(tmp_path_factory.mktemp("levers"))


argv = training_argv


def _ema(checkpoint):
    return torch.load(checkpoint / EMA_FILE, weights_only=False)


def test_ema_is_saved_resumed_exactly_and_exported(fx):
    from axf_pipeline import AnomalyXFusionPipeline

    flags = ["--use_ema", "--ema_decay", "0.9", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    run_a = fx["root"] / "ema_a"
    train(parse_args(argv(fx, run_a, *flags)))
    ema = _ema(run_a / "checkpoint-4")
    assert ema["optimization_step"] == 4
    raw = load_file(run_a / "checkpoint-4" / WEIGHTS_FILE)
    shadow = ema["shadow_params"]
    assert len(shadow) == len(raw)
    # The exported pipeline carries the average, not the last raw weights.
    exported = AnomalyXFusionPipeline.from_pretrained(run_a).mif.state_dict()["location_fc.weight"]
    assert not torch.equal(exported, raw["mif.location_fc.weight"])
    assert any(s.shape == exported.shape and torch.equal(s, exported) for s in shadow)

    # A run resumed from step 2 ends with the same average as the uninterrupted run.
    run_b = fx["root"] / "ema_b"
    train(parse_args(argv(fx, run_b, *flags, "--resume_from_checkpoint", str(run_a / "checkpoint-2"))))
    resumed = _ema(run_b / "checkpoint-4")
    assert resumed["optimization_step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(resumed["shadow_params"], shadow, strict=True))


def test_min_snr_weights_follow_the_paper_and_weight_the_loss_per_example():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([1, 50, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    weights = min_snr_weights(scheduler, timesteps, 5.0)
    torch.testing.assert_close(weights, torch.clamp(snr, max=5.0) / snr)
    assert weights[0] < 0.01 and weights[-1] == pytest.approx(1.0)  # easy low-noise steps count less
    v_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    torch.testing.assert_close(
        min_snr_weights(v_scheduler, timesteps, 5.0), torch.clamp(snr, max=5.0) / (snr + 1)
    )

    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    per_example = (pred - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(
        noise_prediction_loss(pred, target, None, 0.0, weights), (per_example * weights).mean()
    )
    torch.testing.assert_close(noise_prediction_loss(pred, target, None, 0.0), per_example.mean())
    mask = torch.zeros(4, 1, 64, 64)
    mask[:, :, 8:40, 8:40] = 1
    unweighted = noise_prediction_loss(pred, target, mask, 1.0)
    only_last = noise_prediction_loss(pred, target, mask, 1.0, torch.tensor([0.0, 0.0, 0.0, 4.0]))
    last = noise_prediction_loss(pred[3:], target[3:], mask[3:], 1.0)
    torch.testing.assert_close(only_last, last)
    assert not torch.allclose(only_last, unweighted)


def _batch_and_encoder(fx, **kwargs):
    data = select_training_data(load_mvtec_caption(str(fx["dataset"]), "ad", str(fx["cache"])))
    dataset = AnomalyTrainingDataset(
        data.train,
        32,
        crop_jitter=0,
        random_flip=False,
        reference_drop_prob=0,
        caption_drop_prob=0,
        joint_drop_prob=0,
    )
    c = build_tiny_components(scheduler="ddpm")
    names = ("vae", "text_encoder", "tokenizer", "image_encoder", "feature_extractor", "scheduler")
    return collate([dataset[i] for i in range(2)]), BatchEncoder(*(c[n] for n in names), **kwargs)


def test_encoder_adds_the_noise_offset_per_channel_and_the_snr_weights(fx):
    batch, plain = _batch_and_encoder(fx)
    _, shifted = _batch_and_encoder(fx, noise_offset=0.5, snr_gamma=5.0)
    a = plain(batch, step_generator(0, 0, 0))
    b = shifted(batch, step_generator(0, 0, 0))
    assert a.loss_weights is None
    torch.testing.assert_close(b.loss_weights, min_snr_weights(shifted.scheduler, b.timesteps, 5.0))
    assert torch.equal(a.timesteps, b.timesteps)
    # noisy = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) (ε + offset): the difference is one constant per example and channel.
    scale = (1 - plain.scheduler.alphas_cumprod[a.timesteps]).sqrt()[:, None, None, None]
    offset = (b.noisy_latents - a.noisy_latents) / scale
    torch.testing.assert_close(offset, offset.mean((2, 3), keepdim=True).expand_as(offset), atol=1e-4, rtol=0)
    assert offset.abs().mean() > 0.05
    torch.testing.assert_close(b.target - a.target, offset, atol=1e-4, rtol=0)  # ε target includes the shift
    # Off by default: the same step inputs as before the flag existed.
    again = plain(batch, step_generator(0, 0, 0))
    assert torch.equal(again.noisy_latents, a.noisy_latents)


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--snr_gamma", "0"], "--snr_gamma"),
        (["--noise_offset", "-0.1"], "--noise_offset"),
        (["--ema_decay", "1"], "--ema_decay"),
    ],
)
def test_bad_lever_values_are_refused_naming_the_flag(fx, tmp_path, extra, flag):
    with pytest.raises(TrainingInputError, match=flag):
        parse_args(argv(fx, tmp_path / "out", *extra))
