"""Tiny AnomalyXFusion components built from configs: the one place tests, the demo and the
benchmarks get a model from when no pretrained weights can be downloaded.

Everything here is randomly initialised; a tiny VAE and UNet learn only when trained from scratch.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch


def write_tiny_clip_tokenizer(
    folder: str | Path, words: Iterable[str] = (), model_max_length: int = 32
) -> Path:
    """Writes a CLIP BPE tokenizer (vocab.json + merges.txt) whose vocabulary is generated here:
    every printable ASCII character, alone and as a word end (``</w>``), plus whole-word tokens for
    ``words`` (built by left-to-right merges)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in sorted({w.lower() for w in words}):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
            left = left + right
            vocab.setdefault(left, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else ""))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": model_max_length, "pad_token": "<|endoftext|>"})
    )
    return folder


def tiny_clip_tokenizer(words: Iterable[str] = (), model_max_length: int = 32):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_tokenizer(tmp, words, model_max_length)
        return CLIPTokenizer.from_pretrained(tmp)


def build_tiny_components(
    *,
    unet_in_channels: int = 4,
    sample_size: int = 32,
    cross_attention_dim: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64),
    vae_block_out_channels: tuple[int, ...] = (32, 64),
    latent_channels: int = 4,
    norm_num_groups: int = 8,
    num_tokens: int = 2,
    words: Iterable[str] = (),
    model_max_length: int = 32,
    use_semantic: bool = True,
    use_aggregator: bool = True,
    use_ddf: bool = True,
    scheduler: str = "ddim",
    unet_layout: str = "low",
    seed: int = 0,
) -> dict:
    """All components of an :class:`AnomalyXFusionPipeline`, tiny and seeded.

    ``unet_layout``: where the UNet cross-attends to the X-embedding. ``"sd"`` is Stable Diffusion 1.5's
    layout (every level but the lowest, plus the mid block); ``"low"`` only the lower levels (cheaper).

    ``sample_size`` is the image size in pixels; the VAE downsamples by ``2 ** (len(vae_block_out_channels) - 1)``.
    ``unet_in_channels`` is 4 (blended sampling) or 9 (inpainting UNet).
    """
    from .models import DynamicDifFusion, MultiModalInFusion

    if unet_in_channels not in (4, 9) and unet_in_channels != latent_channels:
        raise ValueError(f"unet_in_channels must be {latent_channels} or {2 * latent_channels + 1}")
    vae_scale = 2 ** (len(vae_block_out_channels) - 1)
    torch.manual_seed(seed)
    unet = _tiny_unet(
        sample_size // vae_scale, unet_in_channels, latent_channels, block_out_channels, norm_num_groups,
        cross_attention_dim, unet_layout,
    )  # fmt: skip
    torch.manual_seed(seed)
    vae = _tiny_vae(sample_size, vae_block_out_channels, latent_channels, norm_num_groups)
    tokenizer = tiny_clip_tokenizer(words, model_max_length)
    torch.manual_seed(seed)
    text_encoder = _tiny_text_encoder(tokenizer, cross_attention_dim, model_max_length)
    torch.manual_seed(seed)
    image_encoder, feature_extractor = _tiny_image_encoder(image_size=32)
    torch.manual_seed(seed)
    mif = MultiModalInFusion(
        cross_attention_dim=cross_attention_dim,
        text_embed_dim=text_encoder.config.hidden_size,
        image_embed_dim=image_encoder.config.projection_dim,
        num_tokens=num_tokens,
        mask_size=32,
        mask_encoder_channels=(8, 16, 32),
        mask_grid_size=4,
        num_attention_heads=4,
        use_semantic=use_semantic,
        use_aggregator=use_aggregator,
    )
    ddf = DynamicDifFusion(cross_attention_dim=cross_attention_dim, timestep_channels=32) if use_ddf else None
    return pipeline_components(
        vae,
        text_encoder,
        tokenizer,
        image_encoder,
        feature_extractor,
        unet,
        _tiny_scheduler(scheduler),
        mif,
        ddf,
    )


def pipeline_components(
    vae, text_encoder, tokenizer, image_encoder, feature_extractor, unet, scheduler, mif, ddf
) -> dict:
    """The keyword arguments of :class:`AnomalyXFusionPipeline`, by name."""
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "image_encoder": image_encoder,
        "feature_extractor": feature_extractor,
        "unet": unet,
        "scheduler": scheduler,
        "mif": mif,
        "ddf": ddf,
    }


def _tiny_unet(
    sample_size, in_channels, out_channels, block_out_channels, norm_num_groups, cross_attention_dim,
    layout: str = "low",
):  # fmt: skip
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    if layout == "sd":  # SD-1.5: CrossAttn at every resolution but the lowest
        down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    elif layout == "low":
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
        up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    else:
        raise ValueError(f"unet_layout must be 'sd' or 'low', not {layout!r}")

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )


def _tiny_vae(sample_size, block_out_channels, latent_channels, norm_num_groups):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )


def _tiny_text_encoder(tokenizer, hidden_size: int, model_max_length: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _tiny_image_encoder(image_size: int) -> tuple:
    """A two-layer CLIP vision tower and its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
        )
    )
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return image_encoder, feature_extractor


def _tiny_scheduler(name: str):
    """Stable Diffusion's noise schedule; DDIM (``"ddim"``) or DDPM."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kwargs = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    return DDIMScheduler(**kwargs, set_alpha_to_one=False) if name == "ddim" else DDPMScheduler(**kwargs)


def stable_diffusion_pipeline(components: dict, pipeline_class=None, feature_extractor: bool = True):
    """A ``StableDiffusion*Pipeline`` over the same components: what a real base checkpoint is, and the
    baseline ours is benchmarked against. By default plain or inpainting by the UNet's ``in_channels``."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    if pipeline_class is None:
        in_channels = components["unet"].config.in_channels
        pipeline_class = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    return pipeline_class(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=components["scheduler"],
        safety_checker=None,
        feature_extractor=components["feature_extractor"] if feature_extractor else None,
        requires_safety_checker=False,
    )


def save_tiny_base(folder: str | Path, components: dict) -> tuple[Path, Path]:
    """Saves tiny components the way real checkpoints come: a Stable Diffusion folder and a CLIP vision
    folder. Returns ``(base, image_encoder)``."""
    folder = Path(folder)
    stable_diffusion_pipeline(components).save_pretrained(folder / "base", safe_serialization=True)
    components["image_encoder"].save_pretrained(folder / "image_encoder", safe_serialization=True)
    components["feature_extractor"].save_pretrained(folder / "image_encoder")
    return folder / "base", folder / "image_encoder"


def _random_parameters(module: torch.nn.Module, seed: int, pool_size: int = 2**22) -> torch.nn.Module:
    """Materialises parameters left on the meta device (accelerate's ``init_empty_weights``) with seeded
    values at PyTorch's default scale: weights U(±1/sqrt(fan_in)), norm scales 1, other vectors U(±0.02).

    The values are a seeded pool of ``pool_size`` uniforms read from a random offset per tensor: a billion
    fresh random numbers take minutes on a CPU, and what the benchmarks measure depends on shapes only."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = rng.random(pool_size, dtype=np.float32) * 2 - 1
    pool = np.concatenate([pool, pool])  # any window of pool_size values is contiguous
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            shape = tuple(param.shape)
            if isinstance(sub, norms) and name == "weight":
                values = np.ones(shape, np.float32)
            else:
                bound = 1 / float(np.sqrt(np.prod(shape[1:]))) if len(shape) >= 2 else 0.02
                n, start = int(np.prod(shape)), int(rng.integers(pool_size))
                window = pool[start : start + pool_size]
                flat = window[:n] if n <= pool_size else np.tile(window, -(-n // pool_size))[:n]
                values = (flat * bound).reshape(shape)  # a fresh array of exactly n values
            setattr(
                sub, name, torch.nn.Parameter(torch.from_numpy(values), requires_grad=param.requires_grad)
            )
    return module


def build_sd15_components(
    *,
    unet_in_channels: int = 4,
    num_tokens: int = 4,
    words: Iterable[str] = (),
    use_ddf: bool = True,
    scheduler: str = "ddim",
    seed: int = 0,
) -> dict:
    """Components shaped like a real base, with random weights (no download): the benchmarks' real size.

    UNet and VAE have Stable Diffusion 1.5's configs (``unet_in_channels`` 4, or 9 for the inpainting UNet),
    the text encoder is CLIP ViT-L/14's (12 layers, 768 wide, 77 positions; its vocabulary is the generated
    tokenizer's), the image encoder a ViT-L/14 vision tower with a 768 projection, and MIF/DDF are what
    ``AnomalyXFusionPipeline.from_base`` builds for them. About 5.4 GB of fp32 weights (UNet 3.4 GB).
    Tokenizer and scheduler are the tiny builder's (SD's betas).
    """
    from accelerate import init_empty_weights
    from transformers import CLIPImageProcessor

    from .models import DynamicDifFusion, MultiModalInFusion

    small = build_tiny_components(
        unet_in_channels=unet_in_channels, words=words, model_max_length=77, scheduler=scheduler, seed=seed
    )
    tokenizer = small["tokenizer"]
    with init_empty_weights():  # parameters on the meta device, buffers real; filled below
        unet, vae, text_encoder, image_encoder = _sd15_modules(unet_in_channels, tokenizer)
    for i, module in enumerate((unet, vae, text_encoder, image_encoder)):
        _random_parameters(module, seed * 100 + i)
    torch.manual_seed(seed)  # MIF and DDF are small: their own initialisation (DDF starts as identity)
    mif = MultiModalInFusion(
        cross_attention_dim=768, text_embed_dim=768, image_embed_dim=768, num_tokens=num_tokens
    )
    ddf = DynamicDifFusion(cross_attention_dim=768) if use_ddf else None
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    return pipeline_components(
        vae, text_encoder, tokenizer, image_encoder, feature_extractor, unet, small["scheduler"], mif, ddf
    )


def _sd15_modules(unet_in_channels: int, tokenizer) -> tuple:
    """SD-1.5's UNet and VAE, CLIP ViT-L/14's text and vision towers, by their published configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=unet_in_channels,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            projection_dim=768,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="quick_gelu",
        )
    )
    return unet, vae, text_encoder, image_encoder
