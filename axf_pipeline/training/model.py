"""What is trained and how one step computes eq. 17.

The conditioning maths (X-embedding, DDF, cross-attention states) is called from
:mod:`axf_pipeline.conditioning`, the same functions the pipeline samples with.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..conditioning import cross_attention_states, encode_reference, encode_text, x_embedding
from ..image_processing import latent_mask
from ..model_index import read_model_index
from .args import TrainingInputError
from .loss import min_snr_weights, noise_prediction_loss

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


def check_base_model(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> None:
    """A Stable Diffusion checkpoint must have a UNet (and a VAE, text encoder, tokenizer): say so before loading."""
    index = read_model_index(
        name_or_path, "--pretrained_model_name_or_path", TrainingInputError, revision, cache_dir
    )
    missing = [
        c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not index.get(c, [None])[0]
    ]
    if missing:
        raise TrainingInputError(
            f"--pretrained_model_name_or_path {name_or_path!r} has no {', '.join(missing)}: AnomalyXFusion "
            "trains on a Stable Diffusion checkpoint (plain or inpainting) with all of them"
        )
    if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "unet", "config.json")):
        raise TrainingInputError(
            f"--pretrained_model_name_or_path {name_or_path!r}: unet/config.json is missing"
        )


def load_base_pipeline(args: argparse.Namespace, torch_dtype: torch.dtype | None = None):
    """``AnomalyXFusionPipeline.from_base``: the Stable Diffusion base, the CLIP vision encoder and fresh MIF/DDF."""
    from .. import AnomalyXFusionPipeline

    kwargs = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return AnomalyXFusionPipeline.from_base(
        args.pretrained_model_name_or_path,
        image_encoder=args.image_encoder,
        use_semantic=not args.no_text,
        use_aggregator=not args.no_mif,
        use_ddf=not args.no_ddf,
        **{k: v for k, v in kwargs.items() if v is not None},
    )


def check_resolution(resolution: int, vae, unet) -> None:
    """The crop must pass the VAE and every UNet down-sampling without rounding."""
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    multiple = vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise TrainingInputError(
            f"--resolution {resolution} is not a multiple of {multiple} (VAE factor {vae_scale} x UNet "
            f"down-sampling {multiple // vae_scale}); try {max(multiple, resolution // multiple * multiple)}"
        )


class XFusionDenoiser(nn.Module):
    """MIF → DDF → UNet as one module, so one DDP wrapper holds every trained parameter."""

    def __init__(self, unet, mif, ddf=None):
        super().__init__()
        self.unet, self.mif, self.ddf = unet, mif, ddf

    @property
    def use_text(self) -> bool:
        return bool(self.mif.config.use_semantic)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor,
        pooled_text: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        inpaint_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x_embeds = x_embedding(self.mif, mask, pooled_text if self.use_text else None, image_embeds)
        states = cross_attention_states(prompt_embeds, x_embeds, timesteps, self.ddf, use_text=self.use_text)
        sample = noisy_latents if inpaint_latents is None else torch.cat([noisy_latents, inpaint_latents], 1)
        return self.unet(sample, timesteps, encoder_hidden_states=states.to(self.unet.dtype)).sample


def set_trainable(
    components: dict,
    train_unet: str = "frozen",
    lora_rank: int = 0,
    lora_alpha=None,
    device=None,
    weight_dtype: torch.dtype = torch.float32,
) -> None:
    """Freeze VAE, CLIP towers and the UNet; train MIF and DDF, plus a UNet LoRA or (tiny models) the UNet.

    Frozen towers move to ``weight_dtype`` (the mixed-precision type); trained weights stay fp32.
    """
    for name in ("vae", "text_encoder", "image_encoder", "unet"):
        components[name].requires_grad_(False)
        components[name].eval()
        frozen = name != "unet" or train_unet != "full"
        _move(components[name], device, weight_dtype if frozen else torch.float32)
    mif, ddf = components["mif"], components["ddf"]
    _move(mif, device, torch.float32)
    mif.requires_grad_(True).train()
    if not mif.config.use_semantic:
        mif.semantic_proj.requires_grad_(False)  # unused without text; DDP rejects unused trainables
        mif.semantic_gain.requires_grad_(False)
    if ddf is not None:
        _move(ddf, device, torch.float32)
        ddf.requires_grad_(True).train()
    unet = components["unet"]
    if train_unet == "full":
        unet.requires_grad_(True).train()
    elif lora_rank:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha or lora_rank,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGET_MODULES,
            )
        )
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.to(device=device, dtype=torch.float32)  # trained LoRA weights stay fp32


def _move(module, device, dtype) -> None:
    module.to(device)
    if module.dtype != dtype:  # diffusers warns on a no-op dtype cast
        module.to(dtype)


@dataclass
class StepInputs:
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    pooled_text: torch.Tensor | None
    prompt_embeds: torch.Tensor | None
    image_embeds: torch.Tensor
    inpaint_latents: torch.Tensor | None
    loss_weights: torch.Tensor | None = None  # per example (min-SNR); None = uniform


@dataclass
class BatchEncoder:
    """Frozen encoders (VAE, CLIP text, CLIP image) turning a data batch into the denoiser's inputs.

    Noise is added by a ``DDPMScheduler`` built from the base scheduler's config, as diffusers' training
    scripts do: a sigma-space sampler (Euler, LMS, Heun) would otherwise noise in its own scale (std ≈ 15
    at t = 999 instead of ≈ 1). The target follows the config's ``prediction_type``: the noise
    (``epsilon``) or ``get_velocity`` (``v_prediction``).
    """

    vae: object
    text_encoder: object
    tokenizer: object
    image_encoder: object
    feature_extractor: object
    scheduler: object
    inpainting: bool = False
    cache_latents: bool = False
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    _latents: dict = field(default_factory=dict)
    _text: dict = field(default_factory=dict)

    def __post_init__(self):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(self.scheduler.config)

    @property
    def device(self):
        return self.vae.device

    def _latent_params(self, pixels: torch.Tensor, keys) -> torch.Tensor:
        """Mean and log-variance of the VAE posterior, per example; cached per (image, crop, flip)."""
        if not self.cache_latents:
            return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.parameters
        todo = [i for i, k in enumerate(keys) if k not in self._latents]
        if todo:
            params = self.vae.encode(pixels[todo].to(self.vae.dtype)).latent_dist.parameters
            for i, p in zip(todo, params, strict=True):
                self._latents[keys[i]] = p
        return torch.stack([self._latents[k] for k in keys])

    def _text_embeds(self, captions: list[str]):
        todo = sorted({c for c in captions if c not in self._text})
        if todo:
            tokens, pooled = encode_text(self.tokenizer, self.text_encoder, todo, self.device)
            for c, t, p in zip(todo, tokens, pooled, strict=True):
                self._text[c] = (t, p)
        return torch.stack([self._text[c][0] for c in captions]), torch.stack(
            [self._text[c][1] for c in captions]
        )

    @torch.no_grad()
    def __call__(self, batch: dict, generator: torch.Generator, use_text: bool = True) -> StepInputs:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        device = self.device
        pixels = batch["pixel_values"].to(device)
        mask = batch["mask"].to(device)
        scaling = self.vae.config.scaling_factor
        posterior = DiagonalGaussianDistribution(self._latent_params(pixels, batch["key"]))
        latents = posterior.sample(generator=generator).float() * scaling
        noise = torch.randn(latents.shape, generator=generator).to(device)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
        if self.noise_offset:  # diffusers' --noise_offset: a per-channel shift the model must learn to undo
            noise = noise + self.noise_offset * torch.randn(
                (*latents.shape[:2], 1, 1), generator=generator
            ).to(device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise TrainingInputError(f"scheduler prediction_type {prediction_type!r} is not supported")
        prompt_embeds, pooled = self._text_embeds(batch["caption"]) if use_text else (None, None)
        image_embeds = encode_reference(
            self.image_encoder,
            self.feature_extractor,
            batch["reference"].to(device),
            batch["reference_mask"].to(device),
        )
        image_embeds = image_embeds * batch["has_reference"].to(device, image_embeds.dtype)[:, None]
        inpaint = None
        if self.inpainting:
            masked = pixels * (mask < 0.5)
            masked_latents = self.vae.encode(masked.to(self.vae.dtype)).latent_dist.mode().float()
            small_mask = latent_mask(mask, mask.shape[-1] // latents.shape[-1])
            inpaint = torch.cat([small_mask, masked_latents * scaling], dim=1)
        weights = (
            None if self.snr_gamma is None else min_snr_weights(self.scheduler, timesteps, self.snr_gamma)
        )
        return StepInputs(
            noisy, timesteps, target, mask, pooled, prompt_embeds, image_embeds, inpaint, weights
        )


def step_generator(seed: int, batch_counter: int, process_index: int) -> torch.Generator:
    """The noise, timesteps and VAE sample of a micro-batch depend only on (seed, micro-batch, process)."""
    value = np.random.SeedSequence([seed, batch_counter, process_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(value) & (2**63 - 1))


def compute_loss(denoiser, inputs: StepInputs, loss_mask_weight: float) -> torch.Tensor:
    pred = denoiser(
        inputs.noisy_latents,
        inputs.timesteps,
        inputs.mask,
        inputs.pooled_text,
        inputs.prompt_embeds,
        inputs.image_embeds,
        inputs.inpaint_latents,
    )
    return noise_prediction_loss(pred, inputs.target, inputs.mask, loss_mask_weight, inputs.loss_weights)
