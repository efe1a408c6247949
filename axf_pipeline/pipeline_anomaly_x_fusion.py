"""AnomalyXFusionPipeline: paint a described defect into a normal image where a mask says (paper §4).

The module path ``axf_pipeline.pipeline_anomaly_x_fusion`` and the class names are public: a saved folder
carries this module (bundled) and the component modules, recorded in ``model_index.json`` as
``["pipeline_anomaly_x_fusion", "AnomalyXFusionPipeline"]`` and ``["multimodal_in_fusion", "MultiModalInFusion"]``
(see :mod:`axf_pipeline.remote_code`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from . import image_processing as ip
from . import remote_code
from .conditioning import cross_attention_states, encode_reference, encode_text, x_embedding
from .models import DynamicDifFusion, MultiModalInFusion
from .publishing import drop_local_paths

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from PIL import Image
        >>> from axf_pipeline import AnomalyXFusionPipeline

        >>> pipe = AnomalyXFusionPipeline.from_pretrained("path/or/hub-id-of-a-trained-pipeline")
        >>> out = pipe(
        ...     prompt="a long thin scratch across the metal surface",
        ...     image=Image.open("good/000.png"),
        ...     mask_image=Image.open("masks/000.png"),
        ...     reference_image=Image.open("test/scratch/003.png"),
        ...     reference_mask=Image.open("ground_truth/scratch/003_mask.png"),
        ... )
        >>> out.images[0].save("synthetic.png"); out.masks[0].save("synthetic_mask.png")
        ```
"""


@dataclass
class AnomalyXFusionPipelineOutput(BaseOutput):
    """``images``: the synthesised anomalies, at each input image's own size, equal to the input outside
    the mask. ``masks``: the binary masks they were made with (the pair a detector trains on); for
    ``output_type="latent"``, the latent-resolution masks.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def guidance_branches(
    use_text: bool, has_reference: bool, text_scale: float, reference_scale: float
) -> tuple[tuple[str, ...], float]:
    """Which conditions the UNet sees per step, and the weight of a two-branch combination.

    Branches: ``"uncond"`` (no caption, no reference), ``"reference"`` (no caption, the reference) and
    ``"full"`` (caption and reference). Three are needed only when both conditions are present and their
    scales differ; with equal scales the formula of :func:`combine_guidance` is plain CFG over two
    branches, and a missing condition leaves the other's scale alone. A scale ``<= 1`` on the only
    guided condition means no guidance (one pass), as in diffusers.
    """
    if use_text and has_reference and text_scale != reference_scale:
        return ("uncond", "reference", "full"), text_scale
    if use_text and not (has_reference and text_scale == reference_scale):
        scale = text_scale
    elif has_reference:
        scale = reference_scale
    else:
        return ("full",), 1.0
    return (("uncond", "full"), scale) if scale > 1 else (("full",), 1.0)


def combine_guidance(
    noise_pred: torch.Tensor,
    branches: tuple[str, ...],
    text_scale: float,
    reference_scale: float,
    scale: float,
) -> torch.Tensor:
    """Two-condition guidance as in InstructPix2Pix, over the branches stacked along the batch:
    ``ε = ε(∅,∅) + s_ref·(ε(∅,ref) − ε(∅,∅)) + s_txt·(ε(txt,ref) − ε(∅,ref))``; with two branches it is
    ``ε(∅,∅) + scale·(ε(full) − ε(∅,∅))``."""
    parts = dict(zip(branches, noise_pred.chunk(len(branches)), strict=True))
    if len(branches) == 1:
        return parts["full"]
    if len(branches) == 2:
        return parts["uncond"] + scale * (parts["full"] - parts["uncond"])
    uncond, reference, full = parts["uncond"], parts["reference"], parts["full"]
    return uncond + reference_scale * (reference - uncond) + text_scale * (full - reference)


def blend_known(latents, image_latents, noise, mask, scheduler, timesteps, i: int) -> torch.Tensor:
    """Eq. 16: outside the mask, the original latents noised to the next timestep (clean after the last
    step); inside, what the model denoised. Every step keeps the background on the original's trajectory."""
    known = image_latents
    if i < len(timesteps) - 1:
        known = scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
    return (1 - mask) * known + mask * latents


def paste_inside_mask(image: torch.Tensor, mask: torch.Tensor, decoded: torch.Tensor, region) -> torch.Tensor:
    """The input image with the decoded window, resized to ``region`` (x1, y1, x2, y2), pasted where the mask
    is non-zero: every pixel outside the mask is the input's own, exactly."""
    x1, y1, x2, y2 = region
    result = image.clone()
    window = result[:, y1:y2, x1:x2]
    generated = AnomalyXFusionPipeline._resize(decoded, (y2 - y1, x2 - x1))[0]
    result[:, y1:y2, x1:x2] = torch.where(mask[:, y1:y2, x1:x2] > 0, generated, window)
    return result


def _vae_latents(encoder_output) -> torch.Tensor:
    # The known image is encoded to its posterior mean: deterministic, no generator draw.
    if hasattr(encoder_output, "latent_dist"):
        return encoder_output.latent_dist.mode()
    if hasattr(encoder_output, "latents"):
        return encoder_output.latents
    raise AttributeError("could not read latents from the VAE encoder output")


def _load_base(base, scheduler, torch_dtype, load_kwargs: dict) -> tuple:
    """VAE, UNet, CLIP text encoder, tokenizer and scheduler of a Stable Diffusion checkpoint (or pipeline)."""
    import diffusers

    if isinstance(base, DiffusionPipeline):
        parts = base.components
        scheduler = scheduler if scheduler is not None else parts["scheduler"]
        return parts["vae"], parts["unet"], parts["text_encoder"], parts["tokenizer"], scheduler
    common = {k: v for k, v in load_kwargs.items() if k != "variant"}
    weights = dict(use_safetensors=True, dtype=torch_dtype, variant=load_kwargs.get("variant"), **common)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **weights)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **weights)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **weights)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **common)
    if scheduler is None:
        config = diffusers.DDIMScheduler.load_config(base, subfolder="scheduler", **common)
        scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    return vae, unet, text_encoder, tokenizer, scheduler


def _load_image_encoder(source, feature_extractor, subfolder, torch_dtype, load_kwargs: dict) -> tuple:
    """The CLIP vision encoder and its image processor (``None`` when its folder has none)."""
    sub = {"subfolder": subfolder} if subfolder else {}
    common = {k: v for k, v in load_kwargs.items() if k != "variant"}
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(
        source, use_safetensors=True, dtype=torch_dtype, **sub, **common
    )
    if feature_extractor is None:
        try:
            feature_extractor = CLIPImageProcessor.from_pretrained(source, **sub, **common)
        except (OSError, ValueError):
            feature_extractor = None
    return image_encoder, feature_extractor


class AnomalyXFusionPipeline(DiffusionPipeline, StableDiffusionMixin, StableDiffusionLoraLoaderMixin):
    r"""Multi-modal anomaly synthesis: text, mask and a reference defect steer a Stable Diffusion UNet.

    Each denoising step conditions the UNet's cross-attention on ``concat(prompt tokens, e_t)`` with
    ``e_t = DDF(e_X, t)`` and ``e_X = MIF(mask, pooled text, CLIP image of reference ⊙ reference mask)``.
    With a 4-channel UNet, the latents are blended with the noised original outside the mask at every
    step (eq. 16); a 9-channel inpainting UNet instead sees the mask and the masked-image latents, and
    its own predictions outside the mask are kept from step to step (no blending). After decoding, the
    input pixels are put back outside the mask, so the result equals the input there exactly, at the
    input's own size.

    Components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``, ``mif``
    (:class:`MultiModalInFusion`), optional ``ddf`` (:class:`DynamicDifFusion`; ``None`` ablates DDF),
    optional ``image_encoder`` (CLIP vision with projection) and ``feature_extractor``.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->mif->ddf->unet->vae"
    _optional_components = ["ddf", "image_encoder", "feature_extractor"]
    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "negative_prompt_embeds",
        "x_embeds",
        "mask",
        "masked_image_latents",
    ]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        mif: MultiModalInFusion,
        ddf: DynamicDifFusion | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
    ):
        super().__init__()
        if unet is not None and unet.config.in_channels not in (4, 9):
            raise ValueError(
                f"unet must have 4 (blended sampling) or 9 (inpainting) input channels, not {unet.config.in_channels}"
            )
        if image_encoder is not None and feature_extractor is None:
            raise ValueError("an image_encoder needs its feature_extractor (a CLIPImageProcessor)")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            mif=mif,
            ddf=ddf,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = (
            2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    # ------------------------------------------------------------------ saving and loading (safetensors only)
    _SAFETENSORS_ONLY = (
        "AnomalyXFusionPipeline saves and loads safetensors weights only (no pickle weights are ever read)"
    )

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs):
        """diffusers' saver; pickle weights are refused here, since :meth:`from_pretrained` would refuse them.
        The saved configs name no local folder, so the folder can be pushed as it is."""
        if not safe_serialization:
            raise ValueError(f"{self._SAFETENSORS_ONLY}: save_pretrained(safe_serialization=False) refused")
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        drop_local_paths(save_directory)

    def _upload_folder(self, working_dir, *args, **kwargs):
        """diffusers' upload (``push_to_hub``, ``save_pretrained(push_to_hub=True)``), of configs that name no
        local folder."""
        drop_local_paths(working_dir)
        return super()._upload_folder(working_dir, *args, **kwargs)

    def to_json_file(self, json_file_path: str | os.PathLike):
        """diffusers' ``model_index.json``, then the code that lets the folder load without this package
        (``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``), before any push."""
        super().to_json_file(json_file_path)
        remote_code.write_remote_code(self, os.path.dirname(os.path.abspath(json_file_path)))

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike):
        # The remote-code layout's `_class_name` is read as this class: the package's code runs, not the folder's.
        return remote_code.read_class_name(super()._dict_from_json_file(json_file), cls)

    @classmethod
    def _get_signature_types(cls):
        # Run as remote code, MIF and DDF come from their folders' own files: diffusers' check must accept them.
        return remote_code.signature_types(super()._get_signature_types(), cls)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' reader; the folder's own component code is read as the package's classes."""
        loaded = super().load_config(*args, **kwargs)
        remote_code.read_components(loaded[0] if isinstance(loaded, tuple) else loaded, cls)
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """diffusers' loader, safetensors only (no pickle weights are ever read)."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"{cls._SAFETENSORS_ONLY}: use_safetensors=False refused")
        kwargs["use_safetensors"] = True
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as err:
            if "safetensors" not in str(err):
                raise
            raise OSError(
                f"{cls._SAFETENSORS_ONLY}; {pretrained_model_name_or_path} lacks a .safetensors file that "
                f"is needed (pickle .bin weights are not loaded: re-save them with safetensors). {err}"
            ) from err

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike | DiffusionPipeline,
        image_encoder: str | os.PathLike | CLIPVisionModelWithProjection | None = None,
        *,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder_subfolder: str | None = None,
        scheduler=None,
        num_tokens: int = 4,
        use_semantic: bool = True,
        use_aggregator: bool = True,
        use_ddf: bool = True,
        mif_kwargs: dict | None = None,
        ddf_kwargs: dict | None = None,
        torch_dtype: torch.dtype | None = None,
        **load_kwargs,
    ) -> AnomalyXFusionPipeline:
        """Assemble a pipeline from a Stable Diffusion checkpoint and a CLIP vision encoder, with fresh
        (untrained) ``mif`` and ``ddf`` sized from the UNet. Training starts from this.

        Args:
            base: Hub id or folder of a Stable Diffusion checkpoint (plain or inpainting, diffusers layout),
                or an already loaded ``StableDiffusion(Inpaint)Pipeline``.
            image_encoder: Hub id or folder of a ``CLIPVisionModelWithProjection`` (or the model itself);
                ``None`` builds a pipeline without the textural branch.
            feature_extractor: its ``CLIPImageProcessor``; read from the encoder's folder when omitted
                (or built from its ``image_size`` when the folder has none).
            scheduler: replaces the checkpoint's scheduler.
            num_tokens: ``k``, tokens per modality in the X-embedding.
            use_semantic, use_aggregator, use_ddf: the ablation switches of paper table 6.
            mif_kwargs, ddf_kwargs: further ``MultiModalInFusion`` / ``DynamicDifFusion`` config values.
            torch_dtype: dtype for every component.
            load_kwargs: passed to every ``from_pretrained`` (``revision``, ``cache_dir``, ``token``,
                ``local_files_only``, ``variant`` ...). Weights load from safetensors only.
        """
        vae, unet, text_encoder, tokenizer, scheduler = _load_base(base, scheduler, torch_dtype, load_kwargs)
        if isinstance(image_encoder, (str, os.PathLike)):
            image_encoder, feature_extractor = _load_image_encoder(
                image_encoder, feature_extractor, image_encoder_subfolder, torch_dtype, load_kwargs
            )
        if image_encoder is not None and feature_extractor is None:
            size = image_encoder.config.image_size
            feature_extractor = CLIPImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )

        d = unet.config.cross_attention_dim
        if not isinstance(d, int):
            raise ValueError(f"unet.config.cross_attention_dim must be a single int, got {d!r}")
        mif = MultiModalInFusion(
            cross_attention_dim=d,
            text_embed_dim=text_encoder.config.hidden_size,
            image_embed_dim=image_encoder.config.projection_dim if image_encoder is not None else d,
            num_tokens=num_tokens,
            use_semantic=use_semantic,
            use_aggregator=use_aggregator,
            **(mif_kwargs or {}),
        )
        ddf = DynamicDifFusion(cross_attention_dim=d, **(ddf_kwargs or {})) if use_ddf else None
        if torch_dtype is not None:
            mif.to(torch_dtype)
            if ddf is not None:
                ddf.to(torch_dtype)
        return cls(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            mif=mif,
            ddf=ddf,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )

    # ------------------------------------------------------------------ properties (diffusers' conventions)
    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def reference_guidance_scale(self):
        return self._reference_guidance_scale

    @property
    def do_classifier_free_guidance(self):
        """More than one branch per step (see :func:`guidance_branches`): a scale above 1 and something
        to guide towards, the text or a reference."""
        return len(getattr(self, "_guidance_branches", ("uncond", "full"))) > 1

    @property
    def use_text(self) -> bool:
        """Text condition on (ablation switch ``mif.config.use_semantic``)."""
        return bool(self.mif.config.use_semantic)

    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ):
        """Token states (for cross-attention) and pooled embeddings (for e_sem) of the prompts and, with
        guidance, of the negative prompts (default ``""``), each repeated ``num_images_per_prompt`` times.

        Returns ``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)``;
        the negative ones are ``None`` without guidance.
        """
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, pooled_prompt_embeds = encode_text(
                self.tokenizer, self.text_encoder, prompts, device
            )
        elif pooled_prompt_embeds is None:
            raise ValueError(
                "`prompt_embeds` need `pooled_prompt_embeds` too (e_sem is built from the pooled text)"
            )
        batch = prompt_embeds.shape[0]
        if pooled_prompt_embeds.shape[0] != batch:
            raise ValueError(
                f"pooled_prompt_embeds has batch {pooled_prompt_embeds.shape[0]}, prompt_embeds has {batch}"
            )

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative = negative_prompt if negative_prompt is not None else ""
            negatives = [negative] * batch if isinstance(negative, str) else list(negative)
            if len(negatives) != batch:
                raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
            negative_prompt_embeds, negative_pooled_prompt_embeds = encode_text(
                self.tokenizer, self.text_encoder, negatives, device
            )
        elif do_classifier_free_guidance:
            if negative_pooled_prompt_embeds is None:
                raise ValueError("`negative_prompt_embeds` need `negative_pooled_prompt_embeds` too")
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the shape of "
                    f"prompt_embeds {tuple(prompt_embeds.shape)}"
                )

        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        to = dict(device=device, dtype=dtype)
        prompt_embeds = prompt_embeds.to(**to).repeat_interleave(num_images_per_prompt, 0)
        pooled_prompt_embeds = pooled_prompt_embeds.to(**to).repeat_interleave(num_images_per_prompt, 0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(**to).repeat_interleave(
                num_images_per_prompt, 0
            )
            negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.to(**to).repeat_interleave(
                num_images_per_prompt, 0
            )
        else:
            negative_prompt_embeds = negative_pooled_prompt_embeds = None
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    def encode_reference_images(
        self, references: list[torch.Tensor], masks: list[torch.Tensor], size: int | None = None
    ) -> torch.Tensor:
        """CLIP image embeddings ``(B, p)`` of each ``reference ⊙ reference_mask`` (eq. 3).

        With ``size``, each reference and its mask are first cut to the ``size``² window around the mask
        that training crops references to (:func:`~axf_pipeline.image_processing.mask_crop_region`): CLIP's
        processor resizes the short side and centre-crops, which on a non-square image could cut away a
        defect near an edge, and the defect keeps the scale it had in training. ``size=None`` feeds the
        whole image (what the pipeline does when no ``reference_mask`` is given).
        """
        if self.image_encoder is None:
            raise ValueError("reference_image given but this pipeline has no image_encoder")
        if size is not None:
            windows = [ip.mask_crop_region(m, (size, size)) for m in masks]
            references = [  # masked before resizing, so no pixel outside the mask blends in
                self._resize((r * m)[None, :, y1:y2, x1:x2], (size, size))[0]
                for r, m, (x1, y1, x2, y2) in zip(references, masks, windows, strict=True)
            ]
            masks = [
                ip.resize_mask(m[None, :, y1:y2, x1:x2], (size, size))[0]
                for m, (x1, y1, x2, y2) in zip(masks, windows, strict=True)
            ]
        if len({tuple(r.shape) for r in references}) == 1:  # one CLIP call for same-sized references
            return encode_reference(
                self.image_encoder, self.feature_extractor, torch.stack(references), torch.stack(masks)
            )
        embeds = []
        for ref, msk in zip(references, masks, strict=True):
            embeds.append(encode_reference(self.image_encoder, self.feature_extractor, ref[None], msk[None]))
        return torch.cat(embeds)

    @staticmethod
    def _reference_tensors(reference_image, reference_mask) -> tuple[list, list]:
        """Reference images and their masks as tensors; no mask means the whole image is the defect."""
        references = ip.images_to_tensors(reference_image, "reference_image")
        ref_masks = (
            ip.masks_to_tensors(reference_mask, "reference_mask")
            if reference_mask is not None
            else [torch.ones(1, *r.shape[-2:]) for r in references]
        )
        ip.check_same_sizes(references, ref_masks, "reference_image", "reference_mask")
        return references, ref_masks

    def encode_reference_image(
        self, reference_image, reference_mask=None, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """The CLIP image embeddings ``(B, p)`` that ``__call__`` computes from ``reference_image`` (and
        ``reference_mask``) at generation size ``height × width``, to pass as ``reference_image_embeds``:
        a batch job with one reference runs the ViT once instead of once per call.
        """
        references, ref_masks = self._reference_tensors(reference_image, reference_mask)
        batch = ip.resolve_batch_size(reference_image=len(references), reference_mask=len(ref_masks))
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        return self.encode_reference_images(
            ip.broadcast(references, batch),
            ip.broadcast(ref_masks, batch),
            size=max(height, width) if reference_mask is not None else None,
        )

    # ------------------------------------------------------------------ helpers
    def check_inputs(
        self,
        prompt,
        image,
        mask_image,
        height,
        width,
        strength,
        num_inference_steps,
        num_images_per_prompt,
        output_type,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        pooled_prompt_embeds,
        reference_image,
        reference_mask,
        padding_mask_crop,
        callback_on_step_end_tensor_inputs,
        guidance_scale: float = 1.0,
        reference_image_embeds=None,
        reference_guidance_scale: float | None = None,
    ):
        for name, value in (
            ("guidance_scale", guidance_scale),
            ("reference_guidance_scale", reference_guidance_scale),
        ):
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value} (values <= 1 mean no guidance)")
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        for name, value in (("height", height), ("width", width)):
            if value is not None and (value <= 0 or value % self.vae_scale_factor):
                raise ValueError(
                    f"{name} must be a positive multiple of {self.vae_scale_factor}, got {value}"
                )
        if padding_mask_crop is not None and (
            not isinstance(padding_mask_crop, int) or padding_mask_crop < 0
        ):
            raise ValueError(f"padding_mask_crop must be a non-negative int, got {padding_mask_crop!r}")
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"callback_on_step_end_tensor_inputs {unknown} are unknown; choose from {self._callback_tensor_inputs}"
                )
        if image is None or mask_image is None:
            raise ValueError(
                "`image` (the normal image) and `mask_image` (where the defect goes) are required"
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if self.use_text and prompt is None and prompt_embeds is None:
            raise ValueError(
                "a `prompt` (or `prompt_embeds`) is required: this pipeline's text condition is on"
            )
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        if prompt_embeds is not None and pooled_prompt_embeds is None and self.use_text:
            raise ValueError(
                "`prompt_embeds` need `pooled_prompt_embeds` too (e_sem is built from the pooled text)"
            )
        if reference_mask is not None and reference_image is None:
            raise ValueError("`reference_mask` given without `reference_image`")
        if reference_image is not None and self.image_encoder is None:
            raise ValueError("`reference_image` given but this pipeline has no image_encoder")
        if reference_image_embeds is not None:
            if reference_image is not None:
                raise ValueError("pass either `reference_image` or `reference_image_embeds`, not both")
            p = self.mif.config.image_embed_dim
            embeds = reference_image_embeds
            if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2 or embeds.shape[1] != p:
                got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise ValueError(
                    f"reference_image_embeds must be a (batch, {p}) tensor as returned by "
                    f"encode_reference_image, got {got}"
                )

    def _warn_text_unused(self) -> None:
        if not getattr(self, "_warned_text_unused", False):
            logger.warning(
                "This pipeline has no text condition (mif.config.use_semantic=False, trained without text): "
                "prompts and negative prompts are not used. Each prompt still counts as one sample of the "
                "batch, so outputs stay aligned with the inputs."
            )
            self._warned_text_unused = True

    def get_timesteps(self, num_inference_steps: int, strength: float, device):
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps, num_inference_steps - t_start

    def prepare_extra_step_kwargs(self, generator, eta):
        import inspect

        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def crop_regions(self, masks: list[torch.Tensor], height: int, width: int, padding_mask_crop: int | None):
        """Per sample, the ``(x1, y1, x2, y2)`` generated at ``height × width`` and pasted back.

        Default: the window training crops show a defect in (:func:`~axf_pipeline.image_processing.mask_crop_region`):
        an image larger than the generation size is cut around its mask at native detail (downscaled only
        when the defect does not fit), so the location mask and the defect have the scale they had in
        training; an image of the generation size is used whole. With ``padding_mask_crop``: diffusers'
        rule, the box around the mask padded by that many pixels, widened to the generation aspect ratio.
        """
        regions = []
        for m in masks:
            if padding_mask_crop is None:
                regions.append(ip.mask_crop_region(m, (height, width)))
            else:
                pil = PIL.Image.fromarray((m[0].numpy() * 255).astype(np.uint8), mode="L")
                regions.append(self.mask_processor.get_crop_region(pil, width, height, pad=padding_mask_crop))
        return regions

    def _encode_vae(self, images: torch.Tensor) -> torch.Tensor:
        latents = _vae_latents(self.vae.encode(images))
        return latents * self.vae.config.scaling_factor

    @staticmethod
    def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(image.shape[-2:]) == tuple(size):
            return image
        return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(
            0, 1
        )

    def _to_output(self, items: list[torch.Tensor], output_type: str, mask: bool):
        if output_type == "pil":
            out = []
            for x in items:
                arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                out.append(
                    PIL.Image.fromarray(arr[..., 0], mode="L")
                    if mask
                    else PIL.Image.fromarray(arr, mode="RGB")
                )
            return out
        stacked = torch.stack(items)
        if output_type == "pt":
            return stacked
        return self.image_processor.pt_to_numpy(stacked)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        reference_image=None,
        reference_mask=None,
        reference_image_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = ip.DEFAULT_PADDING_MASK_CROP,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        reference_guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Synthesise anomalies.

        Args:
            prompt: the defect description(s): a string or a one-element list is used for every image,
                a list gives one prompt per image. A pipeline trained without text
                (``mif.config.use_semantic=False``) does not use prompts: it warns once, and each prompt
                still counts as one sample so the outputs stay aligned with the inputs.
            image: the normal image(s): PIL, NumPy or torch, see :mod:`axf_pipeline.image_processing`.
            mask_image: where the defect goes; single-channel; every non-zero pixel counts as defect.
            reference_image: a real defect whose texture guides the result (eq. 3). Optional: without it
                the MIF sees a zero image embedding, the learned "no reference" state.
            reference_mask: the defect region of ``reference_image``. Pixels outside it are zeroed and the
                reference is cut to the ``max(height, width)``² window around it that training crops
                references to, before CLIP sees it. Without it the whole reference image goes to CLIP,
                whose processor resizes the short side and centre-crops (an edge of a non-square
                reference is lost).
            reference_image_embeds: instead of ``reference_image``, its precomputed CLIP embeddings
                ``(1 or B, p)`` from :meth:`encode_reference_image` (same generation size): many calls
                with one reference then run the ViT once.
            height, width: generation size (default: the UNet's native resolution). The result is
                resized back to the generated region's size and composited.
            padding_mask_crop: ``None`` (default: ``image_processing.DEFAULT_PADDING_MASK_CROP``, the one
                default of ``axf synthesize``, ``axf generate`` and the demo too): generate in the window
                training crops show a defect in, so the defect and location mask have their training scale:
                an image larger than ``height × width`` is cut around its mask at native detail (shrunk only
                if the defect does not fit), an image of that size is used whole. An int: diffusers' rule instead, the box
                around the mask padded by this many pixels and widened to ``width/height``'s aspect ratio.
                Either way the region is pasted back and the result equals the input outside the mask.
            strength: 1.0 starts from pure noise; lower values start from the noised image.
            guidance_scale: the text's guidance weight ``s_txt``, >= 0 (> 1 enables it). The unconditional
                branch sees the negative prompt (default ``""``) in both the prompt tokens and e_sem, the
                same mask, and no reference (zero image embedding); the location is kept in every branch.
            reference_guidance_scale: the reference's weight ``s_ref`` in two-condition guidance
                ``ε(∅,∅) + s_ref·(ε(∅,ref) − ε(∅,∅)) + s_txt·(ε(txt,ref) − ε(∅,ref))``. ``None`` (default):
                equal to ``guidance_scale``, which is plain classifier-free guidance towards caption and
                reference together (two UNet passes per step); a different value costs a third pass.
            num_images_per_prompt: samples per input; outputs are ordered input-major.
            generator, latents: randomness, as in diffusers (``latents`` are the initial noise).
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds:
                precomputed text states (see :meth:`encode_prompt`); the pooled ones feed e_sem.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in diffusers; available tensors
                are listed in ``_callback_tensor_inputs``.

        Returns:
            :class:`AnomalyXFusionPipelineOutput` (or ``(images, masks)`` with ``return_dict=False``).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 1. Check inputs and bring images and masks to tensors at their own size
        self.check_inputs(
            prompt,
            image,
            mask_image,
            height,
            width,
            strength,
            num_inference_steps,
            num_images_per_prompt,
            output_type,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            reference_image,
            reference_mask,
            padding_mask_crop,
            callback_on_step_end_tensor_inputs,
            guidance_scale,
            reference_image_embeds,
            reference_guidance_scale,
        )
        images = ip.images_to_tensors(image, "image")
        masks = ip.masks_to_tensors(mask_image, "mask_image")
        ip.check_same_sizes(images, masks)
        references = ref_masks = None
        if reference_image is not None:
            references, ref_masks = self._reference_tensors(reference_image, reference_mask)
        if prompt_embeds is not None:
            n_prompts = prompt_embeds.shape[0]
        elif prompt is not None:
            n_prompts = 1 if isinstance(prompt, str) else len(prompt)
        else:
            n_prompts = None
        if not self.use_text and (n_prompts is not None or negative_prompt is not None):
            self._warn_text_unused()
        batch_size = ip.resolve_batch_size(
            prompt=n_prompts,
            image=len(images),
            mask_image=len(masks),
            reference_image=None if references is None else len(references),
            reference_mask=None if ref_masks is None else len(ref_masks),
            reference_image_embeds=None if reference_image_embeds is None else len(reference_image_embeds),
        )
        images, masks = ip.broadcast(images, batch_size), ip.broadcast(masks, batch_size)
        if output_type in ("np", "pt") and len({tuple(x.shape) for x in images}) > 1:
            raise ValueError("images of different sizes can only be returned with output_type='pil'")
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        self._guidance_scale = guidance_scale
        self._reference_guidance_scale = (
            guidance_scale if reference_guidance_scale is None else reference_guidance_scale
        )
        has_reference = references is not None or reference_image_embeds is not None
        self._guidance_branches, two_branch_scale = guidance_branches(
            self.use_text, has_reference, self._guidance_scale, self._reference_guidance_scale
        )
        branches = self._guidance_branches
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        total = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"{len(generator)} generators for a batch of {total} images")

        # 2. Encode the prompt (cross-attention tokens + pooled text for e_sem)
        pooled = negative_pooled = None
        if self.use_text:
            if prompt_embeds is None and isinstance(prompt, str):
                prompt = [prompt] * batch_size
            elif prompt_embeds is None and len(prompt) == 1:
                prompt = list(prompt) * batch_size
            elif prompt_embeds is not None and prompt_embeds.shape[0] == 1 and batch_size > 1:
                prompt_embeds = prompt_embeds.expand(batch_size, -1, -1)
                pooled_prompt_embeds = pooled_prompt_embeds.expand(batch_size, -1)
            if isinstance(negative_prompt, list) and len(negative_prompt) == 1:
                negative_prompt = negative_prompt * batch_size
            if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] == 1 and batch_size > 1:
                negative_prompt_embeds = negative_prompt_embeds.expand(batch_size, -1, -1)
                negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.expand(batch_size, -1)
            prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                self.do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            )
        if self.do_classifier_free_guidance and prompt_embeds is not None:  # one slice per branch
            prompt_embeds = torch.cat(
                [prompt_embeds if b == "full" else negative_prompt_embeds for b in branches]
            )
            pooled = torch.cat([pooled if b == "full" else negative_pooled for b in branches])

        # 3. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps, steps_left = self.get_timesteps(num_inference_steps, strength, device)
        if steps_left < 1:
            raise ValueError(f"strength={strength} leaves no denoising step out of {num_inference_steps}")
        num_inference_steps = steps_left
        is_strength_max = strength == 1.0

        # 4. Image and mask at generation size (a crop around the mask with padding_mask_crop)
        regions = self.crop_regions(masks, height, width, padding_mask_crop)
        init_image = torch.cat(
            [
                self._resize(img[None, :, y1:y2, x1:x2], (height, width))
                for img, (x1, y1, x2, y2) in zip(images, regions, strict=True)
            ]
        )
        gen_mask = torch.cat(
            [
                ip.resize_mask(m[None, :, y1:y2, x1:x2], (height, width))
                for m, (x1, y1, x2, y2) in zip(masks, regions, strict=True)
            ]
        )
        dtype = self.unet.dtype
        init_image = self.image_processor.normalize(init_image).to(device=device, dtype=self.vae.dtype)
        gen_mask = gen_mask.to(device)

        # 5. Reference embedding (unless precomputed) and X-embedding, once per call (eqs. 1-5)
        image_embeds = reference_image_embeds
        if references is not None:  # one reference for the whole batch goes through the ViT once
            n_refs = max(len(references), len(ref_masks))
            image_embeds = self.encode_reference_images(
                ip.broadcast(references, n_refs),
                ip.broadcast(ref_masks, n_refs),
                size=max(height, width) if reference_mask is not None else None,
            )
        if image_embeds is not None:
            image_embeds = image_embeds.to(device=device, dtype=self.mif.dtype)
            if image_embeds.shape[0] == 1 and batch_size > 1:
                image_embeds = image_embeds.expand(batch_size, -1)
            image_embeds = image_embeds.repeat_interleave(num_images_per_prompt, 0)
        mif_mask = gen_mask.repeat_interleave(num_images_per_prompt, 0).to(self.mif.dtype)
        if image_embeds is not None and len(branches) > 1:  # the unconditional branch: zero embedding
            image_embeds = torch.cat(
                [torch.zeros_like(image_embeds) if b == "uncond" else image_embeds for b in branches]
            )
        x_embeds = x_embedding(self.mif, mif_mask.repeat(len(branches), 1, 1, 1), pooled, image_embeds)

        # 6. Latents; the VAE encodes once (image and, for inpainting UNets, the masked image together)
        num_channels_latents = self.vae.config.latent_channels
        num_channels_unet = self.unet.config.in_channels
        need_image_latents = num_channels_unet == 4 or not is_strength_max
        to_encode = []
        if need_image_latents:
            to_encode.append(init_image)
        if num_channels_unet == 9:
            to_encode.append(init_image * (gen_mask < 0.5).to(init_image.dtype))
        image_latents = masked_image_latents = None
        if to_encode:
            encoded = self._encode_vae(torch.cat(to_encode)).to(dtype).chunk(len(to_encode))
            encoded = [e.repeat_interleave(num_images_per_prompt, 0) for e in encoded]
            if need_image_latents:
                image_latents = encoded.pop(0)
            if num_channels_unet == 9:
                masked_image_latents = encoded.pop(0)

        shape = (total, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if is_strength_max:
                latents = noise * self.scheduler.init_noise_sigma
            else:
                latent_timestep = timesteps[:1].repeat(total)
                latents = self.scheduler.add_noise(image_latents, noise, latent_timestep)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            noise = latents.to(device=device, dtype=dtype)
            latents = noise * self.scheduler.init_noise_sigma
        mask = (
            ip.latent_mask(gen_mask, self.vae_scale_factor)
            .to(dtype)
            .repeat_interleave(num_images_per_prompt, 0)
        )

        # 7. Denoising loop: DDF once per step for the whole batch, guidance as one batched UNet call
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                n = len(branches)
                latent_model_input = torch.cat([latents] * n) if n > 1 else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                if num_channels_unet == 9:
                    m_in = torch.cat([mask] * n) if n > 1 else mask
                    mi_in = torch.cat([masked_image_latents] * n) if n > 1 else masked_image_latents
                    latent_model_input = torch.cat([latent_model_input, m_in, mi_in], dim=1)
                encoder_hidden_states = cross_attention_states(
                    prompt_embeds, x_embeds, t, self.ddf, use_text=self.use_text
                ).to(dtype)
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=encoder_hidden_states,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    return_dict=False,
                )[0]
                noise_pred = combine_guidance(
                    noise_pred,
                    branches,
                    self._guidance_scale,
                    self._reference_guidance_scale,
                    two_branch_scale,
                )
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[
                    0
                ]

                if num_channels_unet == 4:
                    latents = blend_known(latents, image_latents, noise, mask, self.scheduler, timesteps, i)

                if callback_on_step_end is not None:
                    available = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                        "x_embeds": x_embeds,
                        "mask": mask,
                        "masked_image_latents": masked_image_latents,
                    }
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop(
                        "negative_prompt_embeds", negative_prompt_embeds
                    )
                    x_embeds = callback_outputs.pop("x_embeds", x_embeds)
                    mask = callback_outputs.pop("mask", mask)
                    masked_image_latents = callback_outputs.pop("masked_image_latents", masked_image_latents)

                if i == len(timesteps) - 1 or (
                    (i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0
                ):
                    progress_bar.update()

        if output_type == "latent":
            self.maybe_free_model_hooks()
            return (
                AnomalyXFusionPipelineOutput(images=latents, masks=mask) if return_dict else (latents, mask)
            )

        # 8. Decode, put the input pixels back outside the mask at the input's own size, postprocess
        decoded = self.vae.decode(
            latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False
        )[0]
        decoded = (decoded.float().cpu() / 2 + 0.5).clamp(0, 1)
        out_images, out_masks = [], []
        for j in range(total):
            b = j // num_images_per_prompt
            out_images.append(paste_inside_mask(images[b], masks[b], decoded[j : j + 1], regions[b]))
            out_masks.append(masks[b])
        self.maybe_free_model_hooks()
        out_images = self._to_output(out_images, output_type, mask=False)
        out_masks = self._to_output(out_masks, output_type, mask=True)
        if not return_dict:
            return (out_images, out_masks)
        return AnomalyXFusionPipelineOutput(images=out_images, masks=out_masks)
