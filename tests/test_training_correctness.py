"""Training maths against the paper and diffusers' training scripts (tiny components, CPU): the noise
schedule of the forward process, the prediction target, the loss weighting and its default, and the
crop window shared with sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from axf_pipeline.training.loss import default_loss_mask_weight, noise_prediction_loss
from axf_pipeline.training.model import BatchEncoder, step_generator


# ---------------------------------------------------------------- forward process and target (eq. 17)
def deterministic_vae(components):
    """A VAE whose posterior has (numerically) no variance, so x_0 is known: the mean times the scale."""
    vae = components["vae"]
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = -40.0  # log-variance: std = exp(-20)
    return vae


def toy_batch(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 8:20, 10:24] = 1
    return {
        "pixel_values": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        "mask": mask,
        "reference": torch.rand(n, 3, size, size, generator=g),
        "reference_mask": mask.clone(),
        "has_reference": torch.ones(n, dtype=torch.bool),
        "caption": ["a scratch"] * n,
        "key": [(i,) for i in range(n)],
    }


@pytest.mark.parametrize(
    "scheduler_class, prediction_type",
    [
        ("DDPMScheduler", "epsilon"),
        ("EulerDiscreteScheduler", "epsilon"),  # sigma space: add_noise would give std ~ 14.6 at t = 999
        ("EulerDiscreteScheduler", "v_prediction"),
        ("DDIMScheduler", "v_prediction"),
    ],
)
def test_training_noise_is_the_ddpm_forward_process_whatever_the_base_scheduler(
    scheduler_class, prediction_type
):
    import diffusers

    from axf_pipeline.tiny import build_tiny_components

    c = build_tiny_components(scheduler="ddpm")
    base_scheduler = getattr(diffusers, scheduler_class).from_config(
        c["scheduler"].config, prediction_type=prediction_type
    )
    vae = deterministic_vae(c)
    encoder = BatchEncoder(
        vae, c["text_encoder"], c["tokenizer"], c["image_encoder"], c["feature_extractor"], base_scheduler
    )
    batch = toy_batch()
    inputs = encoder(batch, step_generator(0, 0, 0))

    with torch.no_grad():
        x0 = vae.encode(batch["pixel_values"]).latent_dist.mean * vae.config.scaling_factor
    # q(x_t | x_0) of the DDPM paper with the base's betas, computed here from the config alone.
    cfg = base_scheduler.config
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    a = alphas_cumprod[inputs.timesteps].sqrt()[:, None, None, None]
    s = (1 - alphas_cumprod[inputs.timesteps]).sqrt()[:, None, None, None]
    noise = (inputs.noisy_latents - a * x0) / s
    if prediction_type == "epsilon":
        torch.testing.assert_close(inputs.target, noise, atol=2e-3, rtol=1e-3)
    else:
        torch.testing.assert_close(inputs.target, a * noise - s * x0, atol=2e-3, rtol=1e-3)
    assert 0.8 < noise.std().item() < 1.2  # unit-variance noise, not sigma-scaled
    assert inputs.noisy_latents.std().item() < 2.0


# ---------------------------------------------------------------- loss weighting
def test_loss_mask_weight_counts_what_it_says():
    target = torch.zeros(1, 2, 4, 4)
    pred = torch.ones(1, 2, 4, 4)  # squared error 1 outside the defect ...
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:16, 8:16] = 1  # ... the defect is exactly latent cell (1, 1) (factor 8)
    pred[..., 1, 1] = 3.0  # ... and 9 inside it
    # w = 1: only the defect cell counts
    assert noise_prediction_loss(pred, target, mask, 1.0).item() == pytest.approx(9.0)
    # w = 0: the plain mean over 16 cells
    assert noise_prediction_loss(pred, target, mask, 0.0).item() == pytest.approx((15 + 9) / 16)
    # w = 0.5: weights 0.5 outside, 1 inside, normalised
    assert noise_prediction_loss(pred, target, mask, 0.5).item() == pytest.approx(
        (15 * 0.5 + 9) / (15 * 0.5 + 1)
    )
    # no mask: plain mean
    assert noise_prediction_loss(pred, target, None, 1.0).item() == pytest.approx((15 + 9) / 16)


def test_loss_mask_keeps_thin_scratches_weights_examples_equally_and_survives_empty_masks():
    target = torch.zeros(2, 1, 4, 4)
    pred = torch.zeros(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 10, :] = 1  # a one-pixel scratch: latent row 1 (max-pool, not average)
    pred[0, :, 1, :] = 2.0  # error 4 on that row
    mask[1, :, :, :] = 1  # a mask over everything
    pred[1] = 1.0  # error 1 everywhere
    # per-example mean of the masked cells, then the batch mean: (4 + 1) / 2
    assert noise_prediction_loss(pred, target, mask, 1.0).item() == pytest.approx(2.5)
    empty = torch.zeros(1, 1, 32, 32)
    value = noise_prediction_loss(torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), empty, 1.0)
    assert value.item() == pytest.approx(1.0)  # uniform weights, not NaN


def test_default_loss_mask_weight_follows_the_unet():
    from axf_pipeline.training import parse_args

    args = parse_args(
        ["--pretrained_model_name_or_path", "x", "--image_encoder", "y", "--dataset_name", "z"]
        + ["--output_dir", "o"]
    )
    assert args.loss_mask_weight is None  # auto
    assert default_loss_mask_weight(4) == 1.0  # eq. 16 replaces the outside at every step
    assert default_loss_mask_weight(9) == 0.0  # an inpainting UNet's outside predictions are used


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from mvtec_caption import export_dataset, make_sample_tree

    root = tmp_path_factory.mktemp("correctness")
    tree = make_sample_tree(root / "tree", "ad", captions_path=root / "captions.json", scale=0.04)
    export_dataset(
        "ad", tree.root, root / "export", captions=root / "captions.json", cache_dir=root / "cache"
    )
    return root


@pytest.mark.parametrize("channels, given, expected", [(9, None, 0.0), (4, None, 1.0), (9, "0.25", 0.25)])
def test_train_uses_the_loss_mask_weight_of_its_unet(tiny_data, monkeypatch, channels, given, expected):
    from axf_pipeline.tiny import build_tiny_components, save_tiny_base
    from axf_pipeline.training import loop, parse_args

    base, encoder = save_tiny_base(
        tiny_data / f"base{channels}", build_tiny_components(unet_in_channels=channels)
    )
    seen = []

    class Seen(Exception):
        pass

    def spy(denoiser, inputs, weight):
        seen.append(weight)
        raise Seen

    monkeypatch.setattr(loop, "compute_loss", spy)
    argv = [
        "--pretrained_model_name_or_path", str(base), "--image_encoder", str(encoder),
        "--dataset_name", str(tiny_data / "export"), "--dataset_config", "ad",
        "--cache_dir", str(tiny_data / "cache"), "--output_dir", str(tiny_data / f"out{channels}{given}"),
        "--resolution", "32", "--train_batch_size", "1", "--validation_steps", "0", "--report_to", "none",
    ]  # fmt: skip
    if given is not None:
        argv += ["--loss_mask_weight", given]
    with pytest.raises(Seen):
        loop.train(parse_args(argv))
    assert seen == [expected]


# ---------------------------------------------------------------- one crop window for training and sampling
def test_training_crop_is_the_shared_window():
    from PIL import Image

    from axf_pipeline.image_processing import crop_window, mask_box, mask_crop_region
    from axf_pipeline.training.data import crop_around_mask

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
    mask = np.zeros((120, 200), np.uint8)
    mask[5:15, 180:195] = 255  # near a corner
    image_crop, mask_crop, (w, h, x0, y0, side, flipped) = crop_around_mask(
        Image.fromarray(pixels), Image.fromarray(mask), 32, rng, jitter=0
    )
    assert (w, h, side, flipped) == (200, 120, 32, False)
    assert (w, h, x0, y0) == crop_window(200, 120, mask_box(mask), (32, 32))
    x1, y1, x2, y2 = mask_crop_region(torch.from_numpy(mask > 0)[None].float(), (32, 32))
    assert (x1, y1, x2, y2) == (x0, y0, x0 + 32, y0 + 32)  # what the pipeline generates in
    assert np.array_equal(np.asarray(image_crop), pixels[y1:y2, x1:x2])
    assert np.asarray(mask_crop).sum() == mask.sum()  # the whole defect, at native scale
