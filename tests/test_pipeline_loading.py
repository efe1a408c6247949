"""How AnomalyXFusionPipeline is built, saved and loaded: what ``from_base`` takes from a Stable Diffusion
checkpoint and a CLIP vision encoder (and with which options), what the constructor checks and sets up, and
what ``save_pretrained`` / ``from_pretrained`` / ``load_config`` / ``push_to_hub`` pass on. Tiny local
folders only (no network); each test takes well under two seconds."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from axf_pipeline import AnomalyXFusionPipeline
from axf_pipeline.models import MultiModalInFusion
from axf_pipeline.tiny import build_tiny_components, stable_diffusion_pipeline

BASE_PARTS = ("vae", "unet", "text_encoder")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def public_config(config) -> dict:
    """A config's own values as saved (JSON types), without diffusers' bookkeeping (``_name_or_path`` ...)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def reference_picture(h=40, w=60, seed=3) -> PIL.Image.Image:
    """Non-square, so a processor's resize and centre crop both matter."""
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def pixels(processor, picture=None) -> torch.Tensor:
    return processor(images=picture or reference_picture(), return_tensors="pt").pixel_values


@pytest.fixture(scope="module")
def components():
    return build_tiny_components()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Checkpoints laid out as on the Hub: a Stable Diffusion folder holding plain weights (seed 0) and an
    ``fp16`` variant of other weights (seed 1); a CLIP vision folder without an image processor; and an
    IP-Adapter-style repository with the encoder and its own processor in ``image_encoder/``."""
    root = tmp_path_factory.mktemp("checkpoints")
    plain, variant = build_tiny_components(seed=0), build_tiny_components(seed=1)
    stable_diffusion_pipeline(plain, feature_extractor=False).save_pretrained(root / "sd")
    stable_diffusion_pipeline(variant, feature_extractor=False).save_pretrained(root / "sd", variant="fp16")
    plain["image_encoder"].save_pretrained(root / "clip")
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    plain["image_encoder"].save_pretrained(root / "ip" / "image_encoder")
    processor.save_pretrained(root / "ip" / "image_encoder")
    return SimpleNamespace(
        root=root, sd=str(root / "sd"), clip=str(root / "clip"), ip=str(root / "ip"),
        plain=plain, variant=variant, processor=processor,
    )  # fmt: skip


# ---------------------------------------------------------------- from_base: folders
@pytest.mark.parametrize("variant", [None, "fp16"])
def test_from_base_reads_each_part_from_its_subfolder_and_the_variant_of_the_base_only(folders, variant):
    """The variant names the base checkpoint's weight files; the CLIP encoder (no variants on the Hub)
    loads its plain weights, from the subfolder given, with the processor that ships with it."""
    pipe = AnomalyXFusionPipeline.from_base(
        folders.sd, image_encoder=folders.ip, image_encoder_subfolder="image_encoder", variant=variant
    )
    expected = folders.variant if variant else folders.plain
    other = folders.plain if variant else folders.variant
    for name in BASE_PARTS:
        assert same_weights(getattr(pipe, name), expected[name]), name
        assert not same_weights(getattr(pipe, name), other[name]), name
    assert same_weights(pipe.image_encoder, folders.plain["image_encoder"])
    assert pipe.tokenizer.get_vocab() == folders.plain["tokenizer"].get_vocab()
    assert type(pipe.scheduler) is DDIMScheduler
    assert public_config(pipe.scheduler.config) == public_config(folders.plain["scheduler"].config)
    torch.testing.assert_close(pixels(pipe.feature_extractor), pixels(folders.processor), rtol=0, atol=0)


def test_from_base_loads_every_part_in_the_given_dtype(folders):
    pipe = AnomalyXFusionPipeline.from_base(
        folders.sd, image_encoder=folders.clip, torch_dtype=torch.bfloat16
    )
    for name in (*BASE_PARTS, "image_encoder", "mif", "ddf"):
        assert getattr(pipe, name).dtype == torch.bfloat16, name


def test_an_encoder_folder_without_a_processor_gets_clips_processor_for_its_image_size(folders):
    """Built from the encoder's ``image_size``: short side resized to it, then a centre crop to a square."""
    pipe = AnomalyXFusionPipeline.from_base(folders.sd, image_encoder=folders.clip)
    size = pipe.image_encoder.config.image_size
    out = pixels(pipe.feature_extractor)
    assert out.shape == (1, 3, size, size)
    torch.testing.assert_close(out, pixels(folders.plain["feature_extractor"]), rtol=0, atol=0)


def test_a_given_feature_extractor_is_kept(folders):
    """Over the encoder folder's own processor, and with an encoder passed as a model."""
    mine = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    from_folder = AnomalyXFusionPipeline.from_base(
        folders.sd, image_encoder=folders.ip, image_encoder_subfolder="image_encoder", feature_extractor=mine
    )
    assert from_folder.feature_extractor is mine
    base = stable_diffusion_pipeline(folders.plain)
    from_model = AnomalyXFusionPipeline.from_base(
        base, image_encoder=folders.plain["image_encoder"], feature_extractor=mine
    )
    assert from_model.feature_extractor is mine and from_model.image_encoder is folders.plain["image_encoder"]


def test_from_base_refuses_pickle_weights(folders, tmp_path):
    """Safetensors only, for the base and for the image encoder: a ``.bin`` is never unpickled."""
    stable_diffusion_pipeline(folders.plain).save_pretrained(tmp_path / "sd", safe_serialization=False)
    assert (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(OSError, match="safetensors"):
        AnomalyXFusionPipeline.from_base(str(tmp_path / "sd"))
    (tmp_path / "clip").mkdir()
    folders.plain["image_encoder"].config.to_json_file(tmp_path / "clip" / "config.json")
    torch.save(folders.plain["image_encoder"].state_dict(), tmp_path / "clip" / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        AnomalyXFusionPipeline.from_base(folders.sd, image_encoder=str(tmp_path / "clip"))


def test_from_base_passes_the_load_options_to_every_part(folders, monkeypatch, tmp_path):
    """``revision``, ``cache_dir``, ``token``, ``local_files_only`` ... must reach each ``from_pretrained``
    (a private or pinned checkpoint would otherwise be read from elsewhere, or not at all)."""
    seen: dict[str, list[dict]] = {}

    def spy(cls, method):
        original = getattr(cls, method)

        def record(*args, **kwargs):
            seen.setdefault(f"{cls.__name__}.{method}", []).append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, method, record)

    for cls in (AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer):
        spy(cls, "from_pretrained")
    for cls in (CLIPVisionModelWithProjection, CLIPImageProcessor):
        spy(cls, "from_pretrained")
    spy(DDIMScheduler, "load_config")
    options = dict(local_files_only=True, cache_dir=str(tmp_path / "cache"))
    AnomalyXFusionPipeline.from_base(
        folders.sd, image_encoder=folders.ip, image_encoder_subfolder="image_encoder", **options
    )
    assert len(seen) == 7, sorted(seen)
    for name, calls in seen.items():
        for kwargs in calls:
            assert options.items() <= kwargs.items(), (name, kwargs)


# ---------------------------------------------------------------- from_base: a loaded pipeline, the new modules
def test_from_base_keeps_the_parts_of_a_loaded_pipeline_and_a_given_scheduler(components, folders):
    base = stable_diffusion_pipeline(components)
    pipe = AnomalyXFusionPipeline.from_base(base)
    for name in (*BASE_PARTS, "tokenizer", "scheduler"):
        assert getattr(pipe, name) is getattr(base, name), name
    mine = DDPMScheduler.from_config(components["scheduler"].config)
    assert AnomalyXFusionPipeline.from_base(base, scheduler=mine).scheduler is mine
    assert AnomalyXFusionPipeline.from_base(folders.sd, scheduler=mine).scheduler is mine


def test_from_base_defaults_are_the_full_model_and_the_switches_reach_mif_and_ddf(components):
    """The defaults are the paper's full model (k = 4, all three modalities' paths, DDF); the ablation
    switches and the extra config values end up in the saved configs of MIF and DDF."""
    base = stable_diffusion_pipeline(components)
    full = AnomalyXFusionPipeline.from_base(base)
    assert full.mif.config.num_tokens == 4
    assert full.mif.config.use_semantic is True and full.mif.config.use_aggregator is True
    assert full.ddf is not None
    ablated = AnomalyXFusionPipeline.from_base(
        base,
        num_tokens=3,
        use_semantic=False,
        use_aggregator=False,
        mif_kwargs={"num_attention_heads": 2, "mask_grid_size": 4},
        ddf_kwargs={"timestep_channels": 16},
    )
    config = ablated.mif.config
    assert (config.num_tokens, config.use_semantic, config.use_aggregator) == (3, False, False)
    assert (config.num_attention_heads, config.mask_grid_size) == (2, 4)
    assert ablated.ddf.config.timestep_channels == 16
    assert AnomalyXFusionPipeline.from_base(base, use_ddf=False).ddf is None


def test_mif_takes_its_image_width_from_the_encoder_and_runs_without_one(components):
    """The textural branch projects the encoder's ``projection_dim``, which need not be the UNet's width."""
    base = stable_diffusion_pipeline(components)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=1,
            num_attention_heads=4, image_size=32, patch_size=8,
        )
    )  # fmt: skip
    pipe = AnomalyXFusionPipeline.from_base(base, image_encoder=encoder)
    assert base.unet.config.cross_attention_dim != 16
    assert pipe.mif.config.image_embed_dim == 16
    assert pipe.feature_extractor is not None
    without = AnomalyXFusionPipeline.from_base(base)
    assert without.image_encoder is None and without.feature_extractor is None
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    text = torch.zeros(1, without.text_encoder.config.hidden_size)
    x = without.mif(mask, text)
    assert x.shape == (1, without.mif.num_output_tokens, base.unet.config.cross_attention_dim)


def test_a_unet_with_per_block_cross_attention_widths_is_refused(components):
    base = stable_diffusion_pipeline({**components, "unet": UNet2DConditionModel.from_config(
        components["unet"].config, cross_attention_dim=(32, 32))})  # fmt: skip
    with pytest.raises(ValueError, match="cross_attention_dim must be a single int"):
        AnomalyXFusionPipeline.from_base(base)


# ---------------------------------------------------------------- the constructor
def test_the_unet_must_have_4_or_9_input_channels(components):
    unet = UNet2DConditionModel.from_config(components["unet"].config, in_channels=8)
    with pytest.raises(ValueError, match=r"4 \(blended sampling\) or 9 \(inpainting\) input channels, not 8"):
        AnomalyXFusionPipeline(**{**components, "unet": unet})


def test_an_image_encoder_needs_its_feature_extractor(components):
    with pytest.raises(
        ValueError, match=r"^an image_encoder needs its feature_extractor \(a CLIPImageProcessor\)$"
    ):
        AnomalyXFusionPipeline(**{**components, "feature_extractor": None})


@pytest.mark.parametrize("levels", [2, 4])
def test_vae_scale_factor_is_the_vaes_downsampling(components, levels):
    vae = AutoencoderKL.from_config(
        components["vae"].config,
        block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
    )
    pipe = AnomalyXFusionPipeline(**{**components, "vae": vae})
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert pipe.vae_scale_factor == 32 // latents.shape[-1]


def test_without_a_vae_the_scale_factor_is_stable_diffusions(components):
    """``from_pretrained(..., vae=None)`` (text or MIF work only) still gives SD's default sizes."""
    pipe = AnomalyXFusionPipeline(**{**components, "vae": None})
    assert pipe.vae is None and pipe.vae_scale_factor == 8


def test_image_and_mask_processors_follow_the_vae_and_diffusers_inpainting_conventions(components):
    """``pipe.image_processor`` / ``pipe.mask_processor`` prepare inputs as diffusers' inpainting pipelines
    do: sizes rounded to the VAE's multiple, images in [-1, 1], masks one channel of 0/1 split at half."""
    pipe = AnomalyXFusionPipeline(**components)
    assert pipe.vae_scale_factor == 2
    picture = PIL.Image.fromarray(np.full((34, 34, 3), 255, np.uint8))
    image = pipe.image_processor.preprocess(picture)
    assert image.shape == (1, 3, 34, 34) and image.min() == image.max() == 1.0
    mask = np.zeros((34, 34, 3), np.uint8)
    mask[:, 8:16], mask[:, 16:24], mask[:, 24:] = 100, 150, 255
    processed = pipe.mask_processor.preprocess(PIL.Image.fromarray(mask))
    assert processed.shape == (1, 1, 34, 34)
    expected = torch.zeros(34, 34)
    expected[:, 16:] = 1
    torch.testing.assert_close(processed[0, 0], expected, rtol=0, atol=0)


# ---------------------------------------------------------------- saving, loading, pushing
@pytest.fixture(scope="module")
def saved(components, tmp_path_factory):
    """A tiny pipeline saved as an ``fp16`` variant, in a ``pipe/`` subfolder of a repository."""
    root = tmp_path_factory.mktemp("saved")
    pipe = AnomalyXFusionPipeline(**components)
    pipe.save_pretrained(root / "pipe", variant="fp16")
    return SimpleNamespace(root=root, folder=root / "pipe", pipe=pipe)


def test_save_options_reach_the_files_and_the_pipeline_loads_back(saved):
    for name in ("unet", "vae", "mif", "ddf"):
        assert (saved.folder / name / "diffusion_pytorch_model.fp16.safetensors").is_file(), name
        assert not (saved.folder / name / "diffusion_pytorch_model.safetensors").exists(), name
    loaded = AnomalyXFusionPipeline.from_pretrained(saved.folder, variant="fp16", use_safetensors=True)
    for name in ("unet", "vae", "text_encoder", "image_encoder", "mif", "ddf"):
        assert same_weights(getattr(loaded, name), getattr(saved.pipe, name)), name
    assert public_config(loaded.mif.config) == public_config(saved.pipe.mif.config)


def test_from_pretrained_refuses_to_read_pickle_weights(tmp_path):
    with pytest.raises(ValueError, match=r"safetensors weights only .*use_safetensors=False refused"):
        AnomalyXFusionPipeline.from_pretrained(tmp_path, use_safetensors=False)


def test_load_config_takes_the_readers_options_and_reads_components_as_the_packages_classes(saved):
    """The saved index names MIF by its bundled file (``multimodal_in_fusion``); read back through the
    package, it names the package's class, with diffusers' options (subfolder, unused kwargs) honoured."""
    config, unused = AnomalyXFusionPipeline.load_config(
        saved.root, subfolder="pipe", return_unused_kwargs=True, unrelated=1
    )
    assert unused == {"unrelated": 1}
    module, name = config["mif"]
    assert getattr(importlib.import_module(module), name) is MultiModalInFusion


def test_push_to_hub_passes_the_commit_options(components, monkeypatch):
    """Token, commit message and pull-request choice reach the upload (network calls replaced)."""
    from diffusers.utils import hub_utils
    from huggingface_hub import ModelCard

    uploads = []
    monkeypatch.setattr(
        hub_utils, "create_repo", lambda repo_id, **kw: type("Repo", (), {"repo_id": repo_id})()
    )
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda repo_id, **kw: ModelCard("---\n---\n"))
    monkeypatch.setattr(hub_utils, "upload_folder", lambda **kwargs: uploads.append(kwargs))
    AnomalyXFusionPipeline(**components).push_to_hub(
        "someone/axf-tiny", token="secret", commit_message="tiny weights", create_pr=True
    )
    assert len(uploads) == 1
    sent = uploads[0]
    assert sent["repo_id"] == "someone/axf-tiny" and sent["token"] == "secret"
    assert sent["commit_message"] == "tiny weights" and sent["create_pr"] is True
