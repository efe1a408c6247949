"""AnomalyXFusionPipeline on tiny components (no network): diffusers' PipelineTesterMixin checks that run
on a CPU, plus what this pipeline promises (exact background, masks returned, 4/9-channel UNets, reload)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch

from axf_pipeline import AnomalyXFusionPipeline, AnomalyXFusionPipelineOutput
from axf_pipeline.tiny import build_tiny_components, stable_diffusion_pipeline

STEPS = 2


def make_pipe(**kwargs) -> AnomalyXFusionPipeline:
    pipe = AnomalyXFusionPipeline(**build_tiny_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


@pytest.fixture(scope="module")
def pipe9():
    return make_pipe(unet_in_channels=9)


def image_and_mask(h=32, w=32, seed=0, box=(8, 20, 10, 22)):
    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = np.zeros((h, w), np.uint8)
    y1, y2, x1, x2 = box
    mask[y1:y2, x1:x2] = 255
    return image, PIL.Image.fromarray(mask)


def inputs(seed=0, **overrides):
    image, mask = image_and_mask()
    args = dict(
        prompt="a scratch",
        image=image,
        mask_image=mask,
        num_inference_steps=STEPS,
        guidance_scale=1.0,  # no guidance unless a test asks: half the UNet work on 2 shared cores
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    args.update(overrides)
    return args


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=-1)


# ---------------------------------------------------------------- the promise: exact background, masks out
def test_outside_mask_is_exactly_the_input_and_inside_changes(pipe):
    image, mask = image_and_mask()
    out = pipe(**inputs(output_type="pil"))
    assert isinstance(out, AnomalyXFusionPipelineOutput)
    result, src, m = np.array(out.images[0]), np.array(image), np.array(mask) > 0
    assert out.images[0].size == image.size
    assert not changed(result, src)[~m].any()
    assert changed(result, src)[m].mean() > 0.9
    assert out.masks[0].mode == "L" and np.array_equal(np.array(out.masks[0]) > 0, m)


def test_padding_mask_crop_on_a_non_square_image_keeps_size_and_background(pipe):
    image, mask = image_and_mask(48, 80, box=(30, 36, 60, 70))
    out = pipe(**inputs(image=image, mask_image=mask, padding_mask_crop=4, output_type="pil"))
    result, src, m = np.array(out.images[0]), np.array(image), np.array(mask) > 0
    assert result.shape == src.shape
    assert not changed(result, src)[~m].any()
    assert changed(result, src)[m].mean() > 0.9


def test_np_output_keeps_float_input_exactly(pipe):
    rng = np.random.default_rng(3)
    image = rng.random((32, 32, 3)).astype(np.float32)
    _, mask = image_and_mask()
    out = pipe(**inputs(image=image, mask_image=mask))
    m = np.array(mask) > 0
    assert np.array_equal(out.images[0][~m], image[~m])
    assert out.masks.shape == (1, 32, 32, 1)


def test_same_seed_same_result_other_seed_differs(pipe):
    a = pipe(**inputs(seed=1)).images
    b = pipe(**inputs(seed=1)).images
    c = pipe(**inputs(seed=2)).images
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_inpainting_unet_9_channels(pipe9):
    image, mask = image_and_mask()
    out = pipe9(**inputs(output_type="pil"))
    m = np.array(mask) > 0
    result = np.array(out.images[0])
    assert not changed(result, np.array(image))[~m].any()
    assert changed(result, np.array(image))[m].mean() > 0.9


def test_strength_below_one_starts_from_the_image(pipe):
    out = pipe(**inputs(strength=0.5, num_inference_steps=4))
    assert out.images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="strength"):
        pipe(**inputs(strength=1.5))


# ---------------------------------------------------------------- PipelineTesterMixin-style checks
def test_dict_and_tuple_outputs_match(pipe):
    as_dict = pipe(**inputs())
    images, masks = pipe(**inputs(), return_dict=False)
    assert np.array_equal(as_dict.images, images) and np.array_equal(as_dict.masks, masks)


def test_batch_equals_single_calls(pipe):
    (image, mask), (image2, mask2) = image_and_mask(), image_and_mask(seed=1, box=(2, 12, 4, 30))
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    batched = pipe(
        **inputs(
            prompt=["a scratch", "a hole"], image=[image, image2], mask_image=[mask, mask2], generator=gens
        )
    )
    single = pipe(
        **inputs(prompt="a hole", image=image2, mask_image=mask2, generator=torch.Generator().manual_seed(6))
    )
    assert batched.images.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(batched.images[1], single.images[0], atol=1e-3)
    assert np.array_equal(batched.masks[1, ..., 0] > 0, np.array(mask2) > 0)


def test_num_images_per_prompt_is_input_major(pipe):
    image2, mask2 = image_and_mask(seed=1, box=(2, 12, 4, 30))
    image, mask = image_and_mask()
    out = pipe(
        **inputs(prompt=["a", "b"], image=[image, image2], mask_image=[mask, mask2], num_images_per_prompt=3)
    )
    assert out.images.shape == (6, 32, 32, 3) and out.masks.shape == (6, 32, 32, 1)
    for j in range(6):
        expected = np.array([mask, mask2][j // 3]) > 0
        assert np.array_equal(out.masks[j, ..., 0] > 0, expected)
    assert not np.array_equal(out.images[0], out.images[1])  # different noise per sample


def test_classifier_free_guidance_is_one_batched_unet_call_per_step(pipe):
    calls = {"unet": [], "ddf": 0, "mif": 0}
    hooks = [
        pipe.unet.register_forward_hook(lambda m, a, k: calls["unet"].append(a[0].shape[0])),
        pipe.ddf.register_forward_hook(lambda *a: calls.__setitem__("ddf", calls["ddf"] + 1)),
        pipe.mif.register_forward_hook(lambda *a: calls.__setitem__("mif", calls["mif"] + 1)),
    ]
    try:
        guided = pipe(**inputs(guidance_scale=7.5))
        assert calls == {"unet": [2] * STEPS, "ddf": STEPS, "mif": 1}
        calls.update(unet=[], ddf=0, mif=0)
        plain = pipe(**inputs(guidance_scale=1.0))
        assert calls == {"unet": [1] * STEPS, "ddf": STEPS, "mif": 1}
    finally:
        for h in hooks:
            h.remove()
    assert not np.array_equal(guided.images, plain.images)
    other_negative = pipe(**inputs(guidance_scale=7.5, negative_prompt="dust"))
    assert not np.array_equal(guided.images, other_negative.images)


def test_encode_prompt_in_isolation_gives_the_same_result(pipe):
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt("a scratch", torch.device("cpu"), 1, True)
    assert embeds.shape[0] == pooled.shape[0] == 1 and neg.shape == embeds.shape
    from_text = pipe(**inputs(guidance_scale=5.0))
    from_embeds = pipe(
        **inputs(prompt=None, guidance_scale=5.0),
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=neg,
        negative_pooled_prompt_embeds=neg_pooled,
    )
    np.testing.assert_allclose(from_text.images, from_embeds.images, atol=1e-5)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        pipe(**inputs(prompt=None), prompt_embeds=embeds)


def test_callbacks_subset_all_modify_and_unknown(pipe):
    seen = []

    def subset(p, i, t, kwargs):
        seen.append(sorted(kwargs))
        return kwargs

    pipe(**inputs(), callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["latents", "x_embeds"])
    assert seen == [["latents", "x_embeds"]] * STEPS

    seen.clear()
    everything = list(pipe._callback_tensor_inputs)
    pipe(**inputs(), callback_on_step_end=subset, callback_on_step_end_tensor_inputs=everything)
    assert seen == [sorted(everything)] * STEPS

    def zero_last(p, i, t, kwargs):
        if i == p.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    out = pipe(**inputs(output_type="latent"), callback_on_step_end=zero_last)
    assert out.images.abs().sum() == 0
    assert out.masks.shape[-2:] == (32 // pipe.vae_scale_factor,) * 2

    with pytest.raises(ValueError, match="unknown"):
        pipe(**inputs(), callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["latents", "noise"])


def test_reference_image_changes_output_and_needs_an_encoder(pipe):
    rng = np.random.default_rng(7)
    reference = PIL.Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))
    ref_mask = np.zeros((40, 24), np.uint8)
    ref_mask[5:30, 4:20] = 1
    without = pipe(**inputs()).images
    with_ref = pipe(**inputs(reference_image=reference, reference_mask=ref_mask)).images
    assert not np.array_equal(without, with_ref)
    with pytest.raises(ValueError, match="reference_mask"):
        pipe(**inputs(reference_mask=ref_mask))


def test_dtype_move(pipe):
    moved = AnomalyXFusionPipeline(**pipe.components)
    moved.to(dtype=torch.float16)
    dtypes = {name: c.dtype for name, c in moved.components.items() if isinstance(c, torch.nn.Module)}
    assert set(dtypes) >= {"unet", "vae", "text_encoder", "image_encoder", "mif", "ddf"}
    assert set(dtypes.values()) == {torch.float16}
    pipe.to(dtype=torch.float32)  # shared modules: move back for the other tests
    assert pipe.unet.dtype == torch.float32


def test_cpu_offload_order_declares_every_model(pipe):
    order = pipe.model_cpu_offload_seq.split("->")
    modules = {n for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert modules <= set(order)
    assert order.index("mif") < order.index("unet") and order.index("ddf") < order.index("unet")


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip_and_model_index(pipe, tmp_path):
    before = pipe(**inputs()).images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    # The remote-code layout (tests/test_remote_code.py): the folder's own files, read back as the package's classes.
    assert index["mif"] == ["multimodal_in_fusion", "MultiModalInFusion"]
    assert index["ddf"] == ["dynamic_dif_fusion", "DynamicDifFusion"]
    assert not list(tmp_path.rglob("*.bin")) and list((tmp_path / "mif").glob("*.safetensors"))
    loaded = AnomalyXFusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(loaded(**inputs()).images, before, atol=1e-4)
    with pytest.raises(ValueError, match="safetensors"):
        AnomalyXFusionPipeline.from_pretrained(tmp_path, use_safetensors=False)

    # A fresh process (no trust_remote_code, nothing imported beforehand) loads it and gets the same result.
    np.save(tmp_path / "expected.npy", before)
    image, mask = image_and_mask()
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    script = textwrap.dedent(
        f"""
        import numpy as np, torch, PIL.Image
        from axf_pipeline import AnomalyXFusionPipeline
        pipe = AnomalyXFusionPipeline.from_pretrained({str(tmp_path)!r})
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a scratch", image=PIL.Image.open({str(tmp_path / "image.png")!r}),
                   mask_image=PIL.Image.open({str(tmp_path / "mask.png")!r}), num_inference_steps={STEPS},
                   guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np")
        np.testing.assert_allclose(out.images, np.load({str(tmp_path / "expected.npy")!r}), atol=1e-4)
        print("OK")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


def test_optional_components_none_round_trip(tmp_path):
    pipe = make_pipe(use_ddf=False)
    pipe.image_encoder = pipe.feature_extractor = None
    pipe.register_modules(image_encoder=None, feature_extractor=None)
    before = pipe(**inputs()).images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["ddf"] == [None, None] and index["image_encoder"] == [None, None]
    loaded = AnomalyXFusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.ddf is None and loaded.image_encoder is None
    np.testing.assert_allclose(loaded(**inputs()).images, before, atol=1e-4)
    with pytest.raises(ValueError, match="image_encoder"):
        loaded(**inputs(reference_image=image_and_mask()[0]))


def test_push_to_hub_uploads_the_saved_folder(pipe, monkeypatch):
    """diffusers' own push_to_hub, with the three network calls replaced (no network in tests)."""
    from pathlib import Path

    from diffusers.utils import hub_utils
    from huggingface_hub import ModelCard

    uploaded = {}

    def fake_upload(self, working_dir, repo_id, **kwargs):
        uploaded["repo"] = repo_id
        uploaded["files"] = {
            str(p.relative_to(working_dir)) for p in Path(working_dir).rglob("*") if p.is_file()
        }

    monkeypatch.setattr(
        hub_utils, "create_repo", lambda repo_id, **kw: type("Repo", (), {"repo_id": repo_id})()
    )
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda repo_id, **kw: ModelCard("---\n---\n"))
    monkeypatch.setattr(hub_utils.PushToHubMixin, "_upload_folder", fake_upload)
    pipe.push_to_hub("someone/axf-tiny", token="x")
    assert uploaded["repo"] == "someone/axf-tiny"
    assert {
        "model_index.json",
        "mif/diffusion_pytorch_model.safetensors",
        "ddf/config.json",
        "pipeline_anomaly_x_fusion.py",
        "mif/multimodal_in_fusion.py",
        "ddf/dynamic_dif_fusion.py",
    } <= uploaded["files"]


# ---------------------------------------------------------------- from_base
@pytest.mark.parametrize("channels", [4, 9])
def test_from_base_local_folders(tmp_path, channels):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    c = build_tiny_components(unet_in_channels=channels)
    base = stable_diffusion_pipeline(c, feature_extractor=False)  # CLIP folder without a processor too
    assert isinstance(base, StableDiffusionPipeline if channels == 4 else StableDiffusionInpaintPipeline)
    base.save_pretrained(tmp_path / "sd")
    c["image_encoder"].save_pretrained(tmp_path / "clip")
    pipe = AnomalyXFusionPipeline.from_base(
        str(tmp_path / "sd"),
        image_encoder=str(tmp_path / "clip"),
        num_tokens=3,
        use_aggregator=False,
        use_ddf=channels == 4,
        mif_kwargs={"num_attention_heads": 4, "mask_encoder_channels": (8, 16)},
    )
    assert pipe.unet.config.in_channels == channels
    assert pipe.mif.config.cross_attention_dim == pipe.unet.config.cross_attention_dim
    assert pipe.mif.config.text_embed_dim == pipe.text_encoder.config.hidden_size
    assert pipe.mif.config.image_embed_dim == pipe.image_encoder.config.projection_dim
    assert pipe.mif.num_output_tokens == 9 and not pipe.mif.config.use_aggregator
    assert (pipe.ddf is not None) == (channels == 4)
    assert type(pipe.scheduler).__name__ == type(c["scheduler"]).__name__
    torch.testing.assert_close(
        pipe.unet.state_dict()["conv_in.weight"], c["unet"].state_dict()["conv_in.weight"]
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**inputs(num_inference_steps=1))
    assert out.images.shape == (1, 32, 32, 3)


# ---------------------------------------------------------------- LoRA
def test_lora_weights_load_and_change_the_output(pipe, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = build_tiny_components()["unet"]
    donor.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(donor))
    AnomalyXFusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, safe_serialization=True)

    fresh = AnomalyXFusionPipeline(**build_tiny_components())
    fresh.set_progress_bar_config(disable=True)
    before = fresh(**inputs()).images
    fresh.load_lora_weights(tmp_path)
    after = fresh(**inputs()).images
    assert not np.allclose(before, after, atol=1e-3)
    m = np.array(image_and_mask()[1]) > 0
    assert np.array_equal(before[0][~m], after[0][~m])  # still only inside the mask


# ---------------------------------------------------------------- bad input: clear errors
def test_bad_inputs_get_clear_errors(pipe):
    image, mask = image_and_mask()
    cases = [
        (dict(mask_image=PIL.Image.new("L", (16, 32), 255)), "must match"),
        (dict(mask_image=PIL.Image.new("L", (32, 32), 0)), "empty"),
        (dict(mask_image=PIL.Image.new("RGB", (32, 32), (255, 255, 255))), "single-channel"),
        (dict(mask_image=np.ones((32, 32, 3), np.uint8)), "single-channel"),
        (dict(image=image.convert("RGBA")), "alpha"),
        (dict(image=np.zeros((32, 32, 4), np.uint8)), "alpha"),
        (dict(image=PIL.Image.fromarray(np.zeros((32, 32), np.uint16) + 300)), "16/32-bit"),
        (dict(image=np.zeros((32, 32, 3), np.uint16)), "8-bit"),
        (dict(image=torch.full((3, 32, 32), -1.0)), r"\[0, 1\]"),
        (dict(prompt=["a", "b"], image=[image] * 3, mask_image=mask), "mismatched batch sizes"),
        (dict(image=[image, image], mask_image=[mask] * 3), "mismatched batch sizes"),
        (dict(height=31), "multiple of"),
        (dict(padding_mask_crop=-1), "padding_mask_crop"),
        (dict(output_type="jpg"), "output_type"),
        (dict(image=None), "required"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), "latents must have shape"),
        (dict(generator=[torch.Generator(), torch.Generator()]), "generators"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(**inputs(**overrides))


def test_soft_masks_are_binarised_any_nonzero_pixel_is_defect(pipe):
    image, _ = image_and_mask()
    soft = np.zeros((32, 32), np.uint8)
    soft[8:20, 10:22] = 31  # e.g. a LOCO region mask stored with a value below 255
    soft[8:20, 22] = 1  # an anti-aliased edge
    out = pipe(**inputs(image=image, mask_image=soft, output_type="pil"))
    returned = np.array(out.masks[0]) > 0
    assert np.array_equal(returned, soft > 0)
    assert not changed(np.array(out.images[0]), np.array(image))[~returned].any()


def test_grayscale_input_is_replicated_to_rgb(pipe):
    gray = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8), mode="L")
    _, mask = image_and_mask()
    out = pipe(**inputs(image=gray, mask_image=mask, output_type="pil"))
    result, m = np.array(out.images[0]), np.array(mask) > 0
    assert np.array_equal(result[~m], np.array(gray.convert("RGB"))[~m])


# ---------------------------------------------------------------- `axf generate`
def test_generate_command_writes_image_mask_pairs(pipe, tmp_path):
    from axf_pipeline.cli import main

    pipe.save_pretrained(tmp_path / "model")
    (tmp_path / "good").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(2):
        image, mask = image_and_mask(seed=i)
        image.save(tmp_path / "good" / f"{i:03d}.png")
        mask.save(tmp_path / "masks" / f"{i:03d}_mask.png")
    argv = ["generate", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "good")]
    argv += ["--masks", str(tmp_path / "masks"), "--prompt", "a scratch", "--output", str(tmp_path / "out")]
    argv += ["--steps", "1", "--guidance-scale", "1", "--num-per-image", "2", "--batch-size", "2"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == ["000_0.png", "000_1.png", "001_0.png", "001_1.png"]
    for r in records:
        source = np.array(PIL.Image.open(r["source_image"]))
        result = np.array(PIL.Image.open(tmp_path / "out" / r["file_name"]))
        mask = np.array(PIL.Image.open(tmp_path / "out" / r["mask"])) > 0
        assert np.array_equal(mask, np.array(PIL.Image.open(r["source_mask"])) > 0)
        assert not changed(result, source)[~mask].any()

    (tmp_path / "masks" / "001_mask.png").unlink()
    assert main(argv) == 2  # refused in one line naming 001.png (tests/test_synthesis_generate.py)


# ---------------------------------------------------------------- eq. 16, DDF, eq. 3: tests that can fail
def image_latents_of(pipe, image):
    pixels = pipe.image_processor.normalize(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None] / 255.0)
    with torch.no_grad():
        return pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor


def test_each_step_keeps_the_noised_original_outside_the_mask(pipe):
    """Eq. 16 on the latents themselves (the final pixel paste alone would hide a broken blend)."""
    from axf_pipeline.image_processing import latent_mask

    image, mask = image_and_mask()
    size = 32 // pipe.vae_scale_factor
    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(3))
    known = image_latents_of(pipe, image)
    outside = (
        latent_mask(torch.from_numpy(np.array(mask) > 0).float()[None, None], pipe.vae_scale_factor) == 0
    )
    outside = outside.expand_as(noise)
    steps = []

    def record(p, i, t, kwargs):
        steps.append((i, kwargs["latents"].clone(), p.scheduler.timesteps.clone()))
        return kwargs

    pipe(**inputs(num_inference_steps=3, latents=noise, output_type="latent"), callback_on_step_end=record)
    assert [i for i, *_ in steps] == [0, 1, 2]
    for i, latents, timesteps in steps:
        expected = known if i == 2 else pipe.scheduler.add_noise(known, noise, timesteps[i + 1 : i + 2])
        torch.testing.assert_close(latents[outside], expected[outside], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(latents[~outside], expected[~outside], atol=1e-3)  # the defect is free


def test_ddf_changes_the_conditioning_with_the_step():
    """A trained (non-zero) DDF: the e_t tokens the UNet sees are DDF(e_X, t) at each step's t."""
    pipe = make_pipe()
    torch.manual_seed(0)
    torch.nn.init.normal_(pipe.ddf.mlp[-1].weight, std=0.5)
    seen, x_embeds = [], []

    def grab(module, args, kwargs):
        seen.append((args[1], kwargs["encoder_hidden_states"].clone()))

    hook = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(
            **inputs(num_inference_steps=3),
            callback_on_step_end=lambda p, i, t, kw: x_embeds.append(kw["x_embeds"]) or kw,
            callback_on_step_end_tensor_inputs=["x_embeds"],
        )
    finally:
        hook.remove()
    n = pipe.mif.num_output_tokens
    assert len(seen) == 3 and len({float(t) for t, _ in seen}) == 3
    for (t, states), e_x in zip(seen, x_embeds, strict=True):
        torch.testing.assert_close(states[:, -n:], pipe.ddf(e_x, t))
    assert not torch.allclose(seen[0][1][:, -n:], seen[2][1][:, -n:], atol=1e-3)  # e_t moves with t
    torch.testing.assert_close(seen[0][1][:, :-n], seen[2][1][:, :-n])  # the prompt tokens do not


def clip_inputs(pipe, **kwargs):
    seen = []
    hook = pipe.image_encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        out = pipe(**inputs(**kwargs))
    finally:
        hook.remove()
    return seen, out


def test_a_defect_at_the_edge_of_a_non_square_reference_reaches_clip(pipe):
    """CLIP's processor centre-crops; the pipeline cuts the reference around its mask first."""
    black = np.zeros((64, 32, 3), np.uint8)
    reference, ref_mask = black.copy(), np.zeros((64, 32), np.uint8)
    reference[0:6, 8:24] = 255  # a defect in the top rows
    ref_mask[0:6, 8:24] = 1
    (with_defect,), _ = clip_inputs(pipe, reference_image=reference, reference_mask=ref_mask)
    (all_black,), _ = clip_inputs(pipe, reference_image=black, reference_mask=ref_mask)
    assert not torch.allclose(with_defect, all_black)
    # what CLIP sees is the training crop (window around the mask) of reference ⊙ mask
    from PIL import Image

    from axf_pipeline.training.data import crop_around_mask

    crop, crop_mask, _ = crop_around_mask(
        Image.fromarray(reference), Image.fromarray(ref_mask * 255), 32, np.random.default_rng(0), jitter=0
    )
    masked = np.asarray(crop) * (np.asarray(crop_mask)[..., None] > 0)
    expected = pipe.feature_extractor(images=masked, return_tensors="pt").pixel_values
    torch.testing.assert_close(with_defect, expected, atol=1e-4, rtol=1e-4)


def test_the_reference_is_masked_before_clip(pipe):
    """Eq. 3: only reference ⊙ reference_mask matters."""
    rng = np.random.default_rng(7)
    reference = rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)
    ref_mask = np.zeros((40, 24), np.uint8)
    ref_mask[5:30, 4:20] = 1
    base = pipe(**inputs(reference_image=reference, reference_mask=ref_mask)).images
    outside_changed = reference.copy()
    outside_changed[ref_mask == 0] = 255 - outside_changed[ref_mask == 0]
    inside_changed = reference.copy()
    inside_changed[ref_mask > 0] = 255 - inside_changed[ref_mask > 0]
    assert np.array_equal(
        base, pipe(**inputs(reference_image=outside_changed, reference_mask=ref_mask)).images
    )
    assert not np.array_equal(
        base, pipe(**inputs(reference_image=inside_changed, reference_mask=ref_mask)).images
    )
    assert not np.array_equal(base, pipe(**inputs(reference_image=reference)).images)  # whole image


def test_strength_below_one_starts_from_the_noised_image_at_the_right_step(pipe):
    from diffusers.utils.torch_utils import randn_tensor

    image, _ = image_and_mask()
    first = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: first.append((a[0].clone(), a[1])))
    try:
        pipe(**inputs(strength=0.5, num_inference_steps=4))
    finally:
        hook.remove()
    timesteps = pipe.scheduler.timesteps
    assert [float(t) for _, t in first] == [float(t) for t in timesteps[2:]]  # 2 of 4 steps, the late ones
    size = 32 // pipe.vae_scale_factor
    noise = randn_tensor((1, 4, size, size), generator=torch.Generator().manual_seed(0))
    expected = pipe.scheduler.add_noise(image_latents_of(pipe, image), noise, timesteps[2:3])
    torch.testing.assert_close(first[0][0], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the generation window (training scale)
def test_a_large_image_is_generated_in_the_training_window_around_its_mask(pipe):
    from axf_pipeline.training.data import crop_around_mask

    image, mask = image_and_mask(96, 128, box=(70, 76, 100, 106))  # 6 x 6 defect, model size 32
    seen = []
    hook = pipe.mif.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        out = pipe(**inputs(image=image, mask_image=mask, output_type="pil"))
    finally:
        hook.remove()
    _, train_mask, _ = crop_around_mask(image, mask, 32, np.random.default_rng(0), jitter=0)
    assert np.array_equal(seen[0][0, 0].numpy() > 0, np.asarray(train_mask) > 0)  # native scale, as trained
    assert (seen[0] > 0).sum() == 36
    result, src, m = np.array(out.images[0]), np.array(image), np.array(mask) > 0
    assert result.shape == src.shape and not changed(result, src)[~m].any()
    assert changed(result, src)[m].mean() > 0.9
    # an image of the model's size is used whole
    seen.clear()
    hook = pipe.mif.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        pipe(**inputs())
    finally:
        hook.remove()
    assert np.array_equal(seen[0][0, 0].numpy() > 0, np.array(image_and_mask()[1]) > 0)


def _extent(mask) -> int:
    """Width of a mask's defect in its own pixels."""
    xs = np.nonzero(np.asarray(mask).reshape(np.asarray(mask).shape[-2:]).any(axis=0))[0]
    return int(xs.max() - xs.min() + 1)


def test_the_one_default_generates_a_real_sized_defect_at_the_training_scale():
    """A 1024 px image with a 60 px defect, a model trained at 256 px: by default (the pipeline's, and that of
    `axf synthesize`, `axf generate` and the demo) the defect covers as many latent pixels per image pixel as
    in a training crop; an explicit ``padding_mask_crop`` still generates diffusers' padded box instead."""
    import argparse
    import inspect

    from axf_pipeline import generate
    from axf_pipeline.demo import run as demo
    from axf_pipeline.image_processing import DEFAULT_PADDING_MASK_CROP
    from axf_pipeline.synthesis import cli as synthesize
    from axf_pipeline.training.data import crop_around_mask

    big = make_pipe(sample_size=256)
    size, vae = 256, big.vae_scale_factor
    image, mask = image_and_mask(1024, 1024, box=(500, 560, 300, 360))  # 60 x 60 px defect
    _, train_mask, _ = crop_around_mask(image, mask, size, np.random.default_rng(0), jitter=0)
    train_scale = _extent(train_mask) / 60 / vae  # latent pixels per image pixel in training
    assert train_scale == 1 / vae  # the defect fits the window: native scale

    def latent_scale(**kwargs):
        out = big(
            **inputs(image=image, mask_image=mask, num_inference_steps=1, output_type="latent", **kwargs)
        )
        assert out.images.shape[-2:] == (size // vae, size // vae)
        return _extent(out.masks[0]) / 60

    assert latent_scale() == pytest.approx(train_scale, abs=1 / 60)  # within one latent pixel
    padded = latent_scale(padding_mask_crop=32)  # a 124 px box upscaled to 256: about twice the scale
    assert padded == pytest.approx(size / (60 + 2 * 32) / vae, abs=1 / 60)
    result = big(**inputs(image=image, mask_image=mask, num_inference_steps=1, padding_mask_crop=32,
                          output_type="pil")).images[0]  # fmt: skip
    m = np.asarray(mask) > 0
    assert result.size == (1024, 1024) and not changed(np.asarray(result), np.asarray(image))[~m].any()

    # one default everywhere: the pipeline's signature, both commands' flags, the demo's call
    call = inspect.signature(AnomalyXFusionPipeline.__call__).parameters["padding_mask_crop"]
    assert call.default is DEFAULT_PADDING_MASK_CROP is None
    for module in (synthesize, generate):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert parser.get_default("padding_mask_crop") is DEFAULT_PADDING_MASK_CROP, module.__name__
    seen = {}

    def recording_pipe(**kwargs):
        seen.update(kwargs)
        return AnomalyXFusionPipelineOutput(images=kwargs["image"], masks=kwargs["mask_image"])

    recording_pipe.set_progress_bar_config = lambda **kw: None
    job = {"caption": "a scratch", "normal": np.asarray(image_and_mask()[0]), "mask": np.asarray(mask)[:32, :32],
           "reference": None, "reference_mask": None}  # fmt: skip
    demo.synthesise(recording_pipe, [job], 1, 1.0, 1, 0)
    assert "padding_mask_crop" in seen and seen["padding_mask_crop"] is DEFAULT_PADDING_MASK_CROP


# ---------------------------------------------------------------- prompts, text off, guidance
def test_a_one_element_prompt_list_is_broadcast_like_a_string(pipe):
    (image, mask), (image2, mask2) = image_and_mask(), image_and_mask(seed=1, box=(2, 12, 4, 30))
    common = dict(image=[image, image2], mask_image=[mask, mask2])
    as_list = pipe(**inputs(prompt=["a scratch"], **common)).images
    as_string = pipe(**inputs(prompt="a scratch", **common)).images
    assert as_list.shape == (2, 32, 32, 3) and np.array_equal(as_list, as_string)


@pytest.fixture(scope="module")
def pipe_no_text():
    return make_pipe(use_semantic=False, use_ddf=False)


def test_prompts_to_a_model_without_text_warn_once_and_keep_the_batch(pipe_no_text, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="axf_pipeline.pipeline_anomaly_x_fusion")
    pipe_no_text._warned_text_unused = False
    out = pipe_no_text(**inputs(prompt=["a", "b", "c"]))
    assert out.images.shape == (3, 32, 32, 3)
    warnings = [r for r in caplog.records if "no text condition" in r.getMessage()]
    assert len(warnings) == 1 and "not used" in warnings[0].getMessage()
    pipe_no_text(**inputs(prompt="a"))
    assert len([r for r in caplog.records if "no text condition" in r.getMessage()]) == 1  # once
    caplog.clear()
    pipe_no_text._warned_text_unused = False
    pipe_no_text(**inputs(prompt=None))
    assert not [r for r in caplog.records if "no text condition" in r.getMessage()]


def test_guidance_is_skipped_when_there_is_nothing_to_guide(pipe_no_text):
    calls = []
    hook = pipe_no_text.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        guided = pipe_no_text(**inputs(prompt=None, guidance_scale=7.5)).images
        assert calls == [1] * STEPS  # no text, no reference: one branch
        plain = pipe_no_text(**inputs(prompt=None, guidance_scale=1.0)).images
        calls.clear()
        reference = image_and_mask(seed=4)[0]
        pipe_no_text(**inputs(prompt=None, guidance_scale=7.5, reference_image=reference))
        assert calls == [2] * STEPS  # the reference is something to guide towards
    finally:
        hook.remove()
    assert np.array_equal(guided, plain)


def test_negative_guidance_scale_is_refused(pipe):
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        pipe(**inputs(guidance_scale=-2.0))


# ---------------------------------------------------------------- diffusers conventions
def test_encode_prompt_ends_with_a_plain_return_of_named_outputs():
    """diffusers' pipeline tests read encode_prompt's outputs by the names in its last return."""
    import ast
    import inspect

    source = textwrap.dedent(inspect.getsource(AnomalyXFusionPipeline.encode_prompt))
    func = ast.parse(source).body[0]
    nested = [n for n in ast.walk(func) if n is not func and isinstance(n, (ast.FunctionDef, ast.Lambda))]
    assert not nested
    returns = [n for n in ast.walk(func) if isinstance(n, ast.Return)]
    assert len(returns) == 1 and func.body[-1] is returns[0]
    assert isinstance(returns[0].value, ast.Tuple)
    assert [e.id for e in returns[0].value.elts] == [
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    ]


def test_pickle_weights_are_refused_at_save_and_named_at_load(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    with pytest.raises(ValueError, match="safetensors weights only"):
        pipe.save_pretrained(tmp_path / "refused", safe_serialization=False)
    assert not (tmp_path / "refused").exists()
    DiffusionPipeline.save_pretrained(pipe, tmp_path / "pickle", safe_serialization=False)  # another tool
    with pytest.raises(OSError, match="safetensors weights only"):
        AnomalyXFusionPipeline.from_pretrained(tmp_path / "pickle")


def test_model_cpu_offload_installs_the_hook_chain_and_a_call_runs():
    """What a CPU can check: the hooks follow model_cpu_offload_seq and the result is unchanged. Moving
    weights between a GPU and the CPU is not exercised here (no GPU in the tests)."""
    reference = make_pipe()(**inputs()).images
    offloaded = make_pipe()
    offloaded.enable_model_cpu_offload(device="cpu")
    modules = {id(c): n for n, c in offloaded.components.items() if isinstance(c, torch.nn.Module)}
    chain = [modules[id(h.model)] for h in offloaded._all_hooks]
    assert chain == offloaded.model_cpu_offload_seq.split("->")
    assert all(hasattr(offloaded.components[n], "_hf_hook") for n in chain)
    np.testing.assert_allclose(offloaded(**inputs()).images, reference, atol=1e-5)


def test_tiny_schedulers_use_steps_offset_1_no_deprecation_warning():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stable_diffusion_pipeline(build_tiny_components())
    assert not [w for w in caught if "steps_offset" in str(w.message)]


def test_precomputed_reference_embeds_give_the_same_result_as_the_reference(pipe):
    rng = np.random.default_rng(11)
    reference = PIL.Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))
    ref_mask = np.zeros((40, 24), np.uint8)
    ref_mask[5:30, 4:20] = 1
    two = dict(image=[image_and_mask()[0]] * 2, mask_image=[image_and_mask()[1]] * 2, guidance_scale=3.0)
    calls = []
    hook = pipe.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:  # one reference for a batch of two goes through the ViT once
        direct = pipe(**inputs(**two, reference_image=reference, reference_mask=ref_mask)).images
    finally:
        hook.remove()
    assert calls == [1]
    embeds = pipe.encode_reference_image(reference, ref_mask, height=32, width=32)
    assert embeds.shape == (1, pipe.mif.config.image_embed_dim)
    calls = []
    hook = pipe.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:  # one embedding for a batch of two, and the ViT is not run again
        cached = pipe(**inputs(**two, reference_image_embeds=embeds)).images
    finally:
        hook.remove()
    assert calls == []
    np.testing.assert_array_equal(cached, direct)
    assert not np.array_equal(cached, pipe(**inputs(**two)).images)  # the embedding is used, not dropped
    with pytest.raises(ValueError, match="either `reference_image` or `reference_image_embeds`"):
        pipe(**inputs(reference_image=reference, reference_image_embeds=embeds))
    with pytest.raises(ValueError, match="reference_image_embeds must be a"):
        pipe(**inputs(reference_image_embeds=embeds[:, :-1]))
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        pipe(**inputs(**two, reference_image_embeds=embeds.repeat(3, 1)))
