"""AnomalyXFusionPipeline's inputs, encoders and step helpers on tiny components: each bad input gets its
one-line error naming the argument, prompts and references are encoded as diffusers and CLIP expect, the
output types, strength and scheduler kwargs behave as in diffusers. Fast: most tests never run the UNet."""

from __future__ import annotations

import copy
import logging

import numpy as np
import PIL.Image
import pytest
import torch

from axf_pipeline import AnomalyXFusionPipeline
from axf_pipeline.pipeline_anomaly_x_fusion import (
    _vae_latents,
    blend_known,
    combine_guidance,
    guidance_branches,
)
from axf_pipeline.tiny import build_tiny_components

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipe():
    pipe = AnomalyXFusionPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def variant(pipe, **components) -> AnomalyXFusionPipeline:
    """The same tiny pipeline with some components swapped (no new weights but those given)."""
    other = AnomalyXFusionPipeline(**{**pipe.components, **components})
    other.set_progress_bar_config(disable=True)
    return other


def image_and_mask(h=32, w=32, seed=0, box=(8, 20, 10, 22)):
    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = np.zeros((h, w), np.uint8)
    y1, y2, x1, x2 = box
    mask[y1:y2, x1:x2] = 255
    return image, PIL.Image.fromarray(mask)


def inputs(**overrides) -> dict:
    image, mask = image_and_mask()
    args = dict(
        prompt="a scratch",
        image=image,
        mask_image=mask,
        num_inference_steps=1,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    args.update(overrides)
    return args


def check(pipe, **overrides) -> None:
    """``check_inputs`` with valid defaults, by name."""
    image, mask = image_and_mask()
    args = dict(
        prompt="a scratch", image=image, mask_image=mask, height=None, width=None, strength=1.0,
        num_inference_steps=2, num_images_per_prompt=1, output_type="pil", negative_prompt=None,
        prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None, reference_image=None,
        reference_mask=None, padding_mask_crop=None, callback_on_step_end_tensor_inputs=None,
    )  # fmt: skip
    args.update(overrides)
    pipe.check_inputs(**args)


def error(call, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


def reference_and_mask(h=40, w=24, seed=7, box=(5, 30, 4, 20)):
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    y1, y2, x1, x2 = box
    mask[y1:y2, x1:x2] = 1
    return reference, mask


# ---------------------------------------------------------------- check_inputs: one line, naming the argument
def test_each_bad_argument_gets_its_own_one_line_error(pipe):
    p = pipe.mif.config.image_embed_dim
    s = pipe.vae_scale_factor
    embeds = torch.zeros(1, 32, 32)
    reference, ref_mask = reference_and_mask()
    cases = [
        (dict(guidance_scale=-2.0), "guidance_scale must be >= 0, got -2.0 (values <= 1 mean no guidance)"),
        (dict(strength=1.5), "strength must be in [0, 1], got 1.5"),
        (dict(strength=-0.25), "strength must be in [0, 1], got -0.25"),
        (dict(num_inference_steps=0), "num_inference_steps must be at least 1, got 0"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be at least 1, got 0"),
        (dict(output_type="jpg"), "output_type must be 'pil', 'np', 'pt' or 'latent', got 'jpg'"),
        (dict(height=s * 4 + 1), f"height must be a positive multiple of {s}, got {s * 4 + 1}"),
        (dict(height=0), f"height must be a positive multiple of {s}, got 0"),
        (dict(width=s * 4 + 1), f"width must be a positive multiple of {s}, got {s * 4 + 1}"),
        (dict(width=-s), f"width must be a positive multiple of {s}, got {-s}"),
        (dict(padding_mask_crop=-1), "padding_mask_crop must be a non-negative int, got -1"),
        (dict(padding_mask_crop=2.5), "padding_mask_crop must be a non-negative int, got 2.5"),
        (
            dict(image=None),
            "`image` (the normal image) and `mask_image` (where the defect goes) are required",
        ),
        (
            dict(mask_image=None),
            "`image` (the normal image) and `mask_image` (where the defect goes) are required",
        ),
        (dict(prompt_embeds=embeds), "pass either `prompt` or `prompt_embeds`, not both"),
        (
            dict(prompt=None),
            "a `prompt` (or `prompt_embeds`) is required: this pipeline's text condition is on",
        ),
        (dict(prompt=3), "prompt must be a str or a list of str, got int"),
        (
            dict(negative_prompt="dust", negative_prompt_embeds=embeds),
            "pass either `negative_prompt` or `negative_prompt_embeds`, not both",
        ),
        (
            dict(prompt=None, prompt_embeds=embeds),
            "`prompt_embeds` need `pooled_prompt_embeds` too (e_sem is built from the pooled text)",
        ),
        (dict(reference_mask=ref_mask), "`reference_mask` given without `reference_image`"),
        (
            dict(reference_image=reference, reference_image_embeds=torch.zeros(1, p)),
            "pass either `reference_image` or `reference_image_embeds`, not both",
        ),
        (
            dict(reference_image_embeds=[[0.0] * p]),
            f"reference_image_embeds must be a (batch, {p}) tensor as returned by encode_reference_image, got list",
        ),
        (
            dict(reference_image_embeds=torch.zeros(1, p - 1)),
            f"reference_image_embeds must be a (batch, {p}) tensor as returned by encode_reference_image, "
            f"got (1, {p - 1})",
        ),
        (
            dict(reference_image_embeds=torch.zeros(p)),
            f"reference_image_embeds must be a (batch, {p}) tensor as returned by encode_reference_image, "
            f"got ({p},)",
        ),
        # the reference is converted with its own names in the messages
        (
            dict(reference_image=PIL.Image.new("RGBA", (24, 40))),
            "reference_image has an alpha channel (PIL mode 'RGBA'); flatten it first, e.g. image.convert('RGB')",
        ),
        (
            dict(reference_image=reference, reference_mask=np.zeros((40, 24), np.uint8)),
            "reference_mask is empty (all zero): there is no region to synthesise a defect in",
        ),
        (
            dict(reference_image=reference, reference_mask=np.ones((32, 32), np.uint8)),
            "reference_mask is 32x32 (WxH) but reference_image is 24x40: they must match",
        ),
        # strength 0 passes the range check; the call then says why nothing would be generated
        (dict(strength=0.0, num_inference_steps=3), "strength=0.0 leaves no denoising step out of 3"),
    ]
    for overrides, message in cases:
        assert error(pipe, **inputs(**overrides)) == message, overrides
    no_encoder = variant(pipe, image_encoder=None, feature_extractor=None)
    assert (
        error(no_encoder, **inputs(reference_image=reference))
        == "`reference_image` given but this pipeline has no image_encoder"
    )
    assert (
        error(no_encoder.encode_reference_image, reference)
        == "reference_image given but this pipeline has no image_encoder"
    )


def test_the_edges_of_each_valid_range_are_accepted(pipe):
    for scale in (0.0, 0.5):  # diffusers: any scale <= 1 means no guidance, not an error
        check(pipe, guidance_scale=scale, reference_guidance_scale=scale)
    check(pipe, strength=0.0)
    check(pipe, strength=1.0)
    check(pipe, height=pipe.vae_scale_factor, width=4 * pipe.vae_scale_factor)
    check(pipe, padding_mask_crop=0)
    for output_type in ("pil", "np", "pt", "latent"):
        check(pipe, output_type=output_type)
    # "a positive multiple of the VAE's scale factor": with a VAE that does not downsample, 1 pixel is one
    from diffusers import AutoencoderKL

    flat_vae = AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), norm_num_groups=8, latent_channels=4,
    )  # fmt: skip
    unscaled = variant(pipe, vae=flat_vae)
    assert unscaled.vae_scale_factor == 1
    check(unscaled, height=1, width=3)


# ---------------------------------------------------------------- encode_prompt, as diffusers' does
def test_encode_prompt_defaults_to_one_image_with_guidance_and_an_empty_negative(pipe):
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt("a scratch", CPU)
    assert embeds.shape[0] == pooled.shape[0] == 1
    assert neg is not None and neg.shape == embeds.shape and neg_pooled.shape == pooled.shape
    empty, empty_pooled = pipe.encode_prompt("", CPU, do_classifier_free_guidance=False)[::2]
    torch.testing.assert_close(neg, empty)
    torch.testing.assert_close(neg_pooled, empty_pooled)


def test_negative_prompts_pair_with_their_prompts_and_repeat_input_major(pipe):
    single = {w: pipe.encode_prompt(w, CPU, do_classifier_free_guidance=False) for w in ("x", "y")}
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        ["a scratch", "a hole"], CPU, 2, True, negative_prompt=["x", "y"]
    )
    assert embeds.shape[0] == neg.shape[0] == pooled.shape[0] == neg_pooled.shape[0] == 4
    assert neg.shape == embeds.shape and neg_pooled.shape == pooled.shape
    for j, word in enumerate("xxyy"):
        torch.testing.assert_close(neg[j], single[word][0][0])
        torch.testing.assert_close(neg_pooled[j], single[word][2][0])
    torch.testing.assert_close(embeds[0], embeds[1])
    assert not torch.allclose(embeds[1], embeds[2])
    assert (
        error(pipe.encode_prompt, ["a", "b"], CPU, negative_prompt=["x"] * 3)
        == "3 negative prompts for 2 prompts"
    )


def test_without_guidance_the_negative_prompt_is_neither_encoded_nor_returned(pipe):
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            "a scratch", CPU, 1, False, negative_prompt=["dust", "rust", "oil"]
        )
    finally:
        hook.remove()
    assert calls == [1]
    assert neg is None and neg_pooled is None
    assert embeds.shape[0] == pooled.shape[0] == 1


def test_precomputed_prompt_embeddings_are_checked_with_one_line_errors(pipe):
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(["a", "b"], CPU, 1, True)
    assert (
        error(pipe.encode_prompt, None, CPU, prompt_embeds=embeds)
        == "`prompt_embeds` need `pooled_prompt_embeds` too (e_sem is built from the pooled text)"
    )
    assert (
        error(pipe.encode_prompt, None, CPU, prompt_embeds=embeds, pooled_prompt_embeds=pooled[:1])
        == "pooled_prompt_embeds has batch 1, prompt_embeds has 2"
    )
    given = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    assert (
        error(pipe.encode_prompt, None, CPU, negative_prompt_embeds=neg, **given)
        == "`negative_prompt_embeds` need `negative_pooled_prompt_embeds` too"
    )
    shape = tuple(embeds.shape)
    assert error(
        pipe.encode_prompt, None, CPU, negative_prompt_embeds=neg[:1], negative_pooled_prompt_embeds=neg_pooled,
        **given,
    ) == f"negative_prompt_embeds {(1, *shape[1:])} must have the shape of prompt_embeds {shape}"  # fmt: skip


def test_prompt_embeddings_come_back_in_the_text_encoders_dtype_or_else_the_unets(pipe):
    """diffusers' rule: the text encoder's dtype, or the UNet's when there is no text encoder."""
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt("a scratch", CPU, 1, True)
    given = dict(
        prompt_embeds=embeds, pooled_prompt_embeds=pooled,
        negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled,
    )  # fmt: skip
    wide = variant(pipe, text_encoder=copy.deepcopy(pipe.text_encoder).to(torch.float64))
    out = wide.encode_prompt(None, CPU, 1, True, **given)
    assert [x.dtype for x in out] == [torch.float64] * 4
    torch.testing.assert_close(out[0].float(), embeds)
    no_text_encoder = variant(pipe, text_encoder=None)
    given64 = {k: v.double() for k, v in given.items()}
    out = no_text_encoder.encode_prompt(None, CPU, 1, True, **given64)
    assert [x.dtype for x in out] == [pipe.unet.dtype] * 4


def test_encode_prompt_runs_the_text_encoder_and_returns_on_the_given_device(pipe):
    """A GPU's case on a CPU: the "meta" device stands in for the device the text encoder lives on."""
    meta = torch.device("meta")
    seen = []
    text_encoder = copy.deepcopy(pipe.text_encoder).to(meta)
    text_encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].device))
    out = variant(pipe, text_encoder=text_encoder).encode_prompt("a scratch", meta, 2, True)
    assert seen == [meta, meta]  # prompt and negative prompt token ids
    assert [x.device for x in out] == [meta] * 4
    assert [x.shape[0] for x in out] == [2] * 4
    # embeddings precomputed elsewhere (here on the CPU) are moved there too
    names = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    given = dict(zip(names, pipe.encode_prompt("a scratch", CPU, 1, True), strict=True))
    assert [x.device for x in pipe.encode_prompt(None, meta, 1, True, **given)] == [meta] * 4


# ---------------------------------------------------------------- references, as CLIP's processor expects
def clip_embeds(pipe, image: np.ndarray) -> torch.Tensor:
    """CLIP's own embedding of an RGB image in [0, 1] (H, W, 3), with no window or mask."""
    pixels = pipe.feature_extractor(
        images=torch.from_numpy(image).permute(2, 0, 1)[None].float(), return_tensors="pt", do_rescale=False
    ).pixel_values
    return pipe.image_encoder(pixels).image_embeds


def test_without_a_reference_mask_clip_sees_the_whole_reference(pipe):
    reference, _ = reference_and_mask()
    torch.testing.assert_close(
        pipe.encode_reference_image(reference), clip_embeds(pipe, reference / 255.0), atol=1e-5, rtol=1e-5
    )
    # a batch of mask-less references of one size, each as if alone, in one ViT call
    other, _ = reference_and_mask(seed=8)
    calls = []
    hook = pipe.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        both = pipe.encode_reference_image([reference, other])
    finally:
        hook.remove()
    assert calls == [1]
    torch.testing.assert_close(both[1:], clip_embeds(pipe, other / 255.0), atol=1e-5, rtol=1e-5)


def test_references_of_different_sizes_are_each_encoded_as_if_alone(pipe):
    small, _ = reference_and_mask()
    large, _ = reference_and_mask(48, 64, seed=9)
    embeds = pipe.encode_reference_image([small, large])
    assert embeds.shape == (2, pipe.mif.config.image_embed_dim)
    torch.testing.assert_close(embeds[:1], clip_embeds(pipe, small / 255.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds[1:], clip_embeds(pipe, large / 255.0), atol=1e-5, rtol=1e-5)


def test_one_reference_with_several_masks_or_several_references_with_one_mask(pipe):
    reference, mask = reference_and_mask()
    other, other_mask = reference_and_mask(seed=8, box=(20, 36, 2, 10))
    alone = {
        (i, j): pipe.encode_reference_image(r, m, height=32, width=32)
        for i, r in enumerate((reference, other))
        for j, m in enumerate((mask, other_mask))
    }
    two_masks = pipe.encode_reference_image(reference, [mask, other_mask], height=32, width=32)
    torch.testing.assert_close(two_masks, torch.cat([alone[0, 0], alone[0, 1]]))
    two_references = pipe.encode_reference_image([reference, other], mask, height=32, width=32)
    torch.testing.assert_close(two_references, torch.cat([alone[0, 0], alone[1, 0]]))
    # the generation size defaults to the model's, as in __call__
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    big, big_mask = reference_and_mask(96, 96, box=(60, 70, 60, 70))
    at_model_size = pipe.encode_reference_image(big, big_mask, height=size, width=size)
    torch.testing.assert_close(pipe.encode_reference_image(big, big_mask), at_model_size)
    for given in (dict(height=size // 2), dict(width=size // 2)):  # the other side defaults
        torch.testing.assert_close(pipe.encode_reference_image(big, big_mask, **given), at_model_size)
    assert not torch.allclose(
        pipe.encode_reference_image(big, big_mask),
        pipe.encode_reference_image(big, big_mask, height=2 * size, width=2 * size),
    )


def test_references_and_masks_of_different_counts_are_refused_not_truncated(pipe):
    a, mask = reference_and_mask()
    b, _ = reference_and_mask(seed=8)
    to_tensor = lambda x: torch.from_numpy(x).permute(2, 0, 1).float() / 255  # noqa: E731
    refs, masks = [to_tensor(a), to_tensor(b)], [torch.from_numpy(mask)[None].float()]
    with pytest.raises(ValueError):
        pipe.encode_reference_images(refs, masks, size=32)
    differently_sized = [refs[0], to_tensor(reference_and_mask(32, 32)[0])]
    with pytest.raises(ValueError):
        pipe.encode_reference_images(differently_sized, masks)


def test_a_reference_larger_than_the_window_is_downscaled_with_antialiasing_like_pil(pipe):
    """Stripes two pixels wide, halved: PIL's bilinear filter (and the pipeline's) averages them to grey,
    a plain bilinear sample would alias them to full-contrast stripes."""
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, np.arange(64) % 4 < 2] = 255
    seen = []
    hook = pipe.image_encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        pipe.encode_reference_image(stripes, np.ones((64, 64), np.uint8), height=32, width=32)
    finally:
        hook.remove()
    halved = np.asarray(PIL.Image.fromarray(stripes).resize((32, 32), PIL.Image.BILINEAR)) / 255.0
    expected = pipe.feature_extractor(
        images=torch.from_numpy(halved).permute(2, 0, 1)[None].float(), return_tensors="pt", do_rescale=False
    ).pixel_values
    std = torch.tensor(pipe.feature_extractor.image_std)[:, None, None]
    torch.testing.assert_close(seen[0] * std, expected * std, atol=2 / 255, rtol=0)


# ---------------------------------------------------------------- outputs
def test_pt_output_is_the_np_output_as_channels_first_tensors(pipe):
    as_np = pipe(**inputs())
    as_pt = pipe(**inputs(output_type="pt"))
    assert isinstance(as_pt.images, torch.Tensor) and isinstance(as_pt.masks, torch.Tensor)
    assert as_pt.images.shape == (1, 3, 32, 32) and as_pt.masks.shape == (1, 1, 32, 32)
    np.testing.assert_array_equal(as_pt.images.permute(0, 2, 3, 1).numpy(), as_np.images)
    np.testing.assert_array_equal(as_pt.masks.permute(0, 2, 3, 1).numpy(), as_np.masks)


def test_a_saturated_defect_pasted_at_another_size_stays_within_0_and_1(pipe, monkeypatch):
    """A VAE may decode beyond [-1, 1]; resized back to a 28 px image, white stays exactly 1.0."""
    scale = pipe.vae_scale_factor

    def white(latents, return_dict=False):
        return (torch.full((latents.shape[0], 3, *(scale * n for n in latents.shape[-2:])), 5.0),)

    monkeypatch.setattr(pipe.vae, "decode", white)
    image, mask = image_and_mask(28, 28, box=(0, 28, 0, 28))
    out = pipe(**inputs(image=image, mask_image=mask))
    inside = np.array(mask) > 0
    assert out.images.max() <= 1.0
    assert (out.images[0][inside] == 1.0).all()


# ---------------------------------------------------------------- a prompt to a model without text
def test_a_fresh_pipeline_without_text_warns_once_in_full(pipe, caplog):
    from axf_pipeline.models import MultiModalInFusion

    mif = MultiModalInFusion.from_config({**pipe.mif.config, "use_semantic": False})
    no_text = variant(pipe, mif=mif, ddf=None)
    caplog.set_level(logging.WARNING, logger="axf_pipeline.pipeline_anomaly_x_fusion")
    for _ in range(2):
        no_text(**inputs(prompt="a scratch", output_type="latent"))
    warned = [r.getMessage() for r in caplog.records if r.name == "axf_pipeline.pipeline_anomaly_x_fusion"]
    assert warned == [
        "This pipeline has no text condition (mif.config.use_semantic=False, trained without text): prompts "
        "and negative prompts are not used. Each prompt still counts as one sample of the batch, so outputs "
        "stay aligned with the inputs."
    ]


# ---------------------------------------------------------------- strength, scheduler kwargs, padded crops
def test_strength_keeps_the_last_steps_and_starts_the_scheduler_there(pipe):
    """diffusers' img2img rule: ``int(steps * strength)`` steps, from index ``t_start * order``, which a
    scheduler that tracks its position (Euler, Heun) is told as its begin index."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

    for cls in (DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler):
        p = variant(pipe, scheduler=cls.from_config(pipe.scheduler.config))
        order = p.scheduler.order
        for strength, kept in ((1.0, 4), (0.5, 2), (0.3, 1)):
            p.scheduler.set_timesteps(4)
            timesteps, steps = p.get_timesteps(4, strength, CPU)
            assert steps == kept, (cls.__name__, strength)
            torch.testing.assert_close(timesteps, p.scheduler.timesteps[(4 - kept) * order :])
            if hasattr(p.scheduler, "set_begin_index"):
                assert p.scheduler.begin_index == (4 - kept) * order, (cls.__name__, strength)


def test_eta_and_generator_go_only_to_schedulers_whose_step_takes_them(pipe):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    generator = torch.Generator()
    expected = {DDIMScheduler: {"eta": 0.3, "generator": generator},
                EulerDiscreteScheduler: {"generator": generator}, PNDMScheduler: {}}  # fmt: skip
    for cls, kwargs in expected.items():
        p = variant(pipe, scheduler=cls.from_config(pipe.scheduler.config))
        assert p.prepare_extra_step_kwargs(generator, 0.3) == kwargs, cls.__name__


def test_padding_mask_crop_pads_the_mask_box_by_that_many_pixels(pipe):
    mask = torch.zeros(1, 64, 64)
    mask[:, 24:32, 24:32] = 1
    assert pipe.crop_regions([mask], 32, 32, 0) == [(24, 24, 32, 32)]
    assert pipe.crop_regions([mask], 32, 32, 4) == [(20, 20, 36, 36)]


# ---------------------------------------------------------------- module-level helpers
def test_vae_latents_reads_a_posterior_mode_or_plain_latents():
    from diffusers import AutoencoderKL, AutoencoderTiny

    x = torch.rand(1, 3, 16, 16) * 2 - 1
    kl = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    posterior = kl.encode(x)
    torch.testing.assert_close(_vae_latents(posterior), posterior.latent_dist.mode())
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
    )  # fmt: skip
    encoded = tiny.encode(x)  # TAESD returns latents, no distribution
    assert _vae_latents(encoded) is encoded.latents
    with pytest.raises(AttributeError) as caught:
        _vae_latents(object())
    assert str(caught.value) == "could not read latents from the VAE encoder output"


def test_guidance_above_one_however_small_is_guidance():
    assert guidance_branches(True, False, 1.5, 1.5) == (("uncond", "full"), 1.5)
    assert guidance_branches(False, True, 7.0, 1.25) == (("uncond", "full"), 1.25)


def test_a_prediction_that_does_not_split_into_the_branches_is_refused():
    with pytest.raises(ValueError):
        combine_guidance(torch.zeros(1, 4, 2, 2), ("uncond", "full"), 3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        combine_guidance(torch.zeros(2, 4, 2, 2), ("uncond", "reference", "full"), 3.0, 2.0, 3.0)


def test_each_step_keeps_the_models_latents_inside_the_mask_and_the_noised_original_outside(pipe):
    """Eq. 16, one step: inside the mask exactly what the scheduler stepped to; outside, the original noised to
    the next timestep, and the clean original after the last step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps
    g = torch.Generator().manual_seed(0)
    latents, original, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:7] = 1
    inside = mask.expand_as(latents).bool()
    for i in range(len(timesteps)):
        out = blend_known(latents, original, noise, mask, scheduler, timesteps, i)
        last = i == len(timesteps) - 1
        known = original if last else scheduler.add_noise(original, noise, timesteps[i + 1 : i + 2])
        assert torch.equal(out[inside], latents[inside])
        assert torch.allclose(out[~inside], known[~inside])
        if not last:
            assert not torch.allclose(out[~inside], original[~inside])  # noised, not clean, before the end
