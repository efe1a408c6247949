"""The end of training: a pipeline ``AnomalyXFusionPipeline.from_pretrained`` loads, its model card, the push.

The saved pipeline is assembled from a fresh fp32 ``from_base`` load (so mixed-precision training never
degrades the frozen weights) into which the trained MIF, DDF and UNet weights are copied. A UNet LoRA is
saved the diffusers way (``save_lora_weights``, with its adapter metadata) under ``unet_lora/``, then
loaded back through ``load_lora_weights`` and, by default, fused: the saved UNet never carries an
unfused adapter, and ``from_pretrained`` alone gives the trained model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "cards" / "model_card.md"
LORA_DIR = "unet_lora"
# Never uploaded: resumable state and scratch.
HUB_IGNORE = ["checkpoint-*", "checkpoint-*/**", "*.tmp/**", "logs/**"]


def export_pipeline(args, denoiser, data, global_step: int, num_processes: int = 1) -> Path:
    """Writes the pipeline (and the LoRA, the card) to ``args.output_dir``; pushes when asked."""
    from .loop import load_base_pipeline

    output_dir = Path(args.output_dir)
    pipe = load_base_pipeline(args)
    pipe.mif.load_state_dict({k: v.float() for k, v in denoiser.mif.state_dict().items()})
    if denoiser.ddf is not None:
        pipe.ddf.load_state_dict({k: v.float() for k, v in denoiser.ddf.state_dict().items()})
    unet = denoiser.unet
    if args.train_unet == "full":
        pipe.unet.load_state_dict({k: v.float() for k, v in unet.state_dict().items()})
    elif args.lora_rank:
        save_unet_lora(pipe, unet, output_dir / LORA_DIR)
        pipe.load_lora_weights(str(output_dir / LORA_DIR))
        if args.fuse_lora:
            pipe.fuse_lora()
        # Drops the adapter layers: keeps the fused weights, or restores the base UNet when not fused.
        pipe.unload_lora_weights()
    pipe.save_pretrained(str(output_dir), safe_serialization=True)
    metrics = json.loads(Path(args.metrics_file).read_text()) if getattr(args, "metrics_file", None) else None
    write_model_card(args, output_dir, len(data.train), global_step, num_processes, metrics)
    logger.info("Saved the pipeline to %s", output_dir)
    if args.push_to_hub:
        push(args, output_dir)
    return output_dir


def save_unet_lora(pipe, unet, folder: Path) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    pipe.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=convert_state_dict_to_diffusers(layers),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )


def _trained(args) -> str:
    parts = ["MIF (mask encoder, heads" + (", aggregator" if not args.no_mif else "") + ")"]
    if not args.no_ddf:
        parts.append("DDF")
    if args.train_unet == "full":
        parts.append("the whole UNet (from scratch)")
    elif args.lora_rank:
        parts.append(f"UNet LoRA rank {args.lora_rank}")
    return (
        ", ".join(parts)
        + "; VAE, CLIP text/image encoders"
        + ("" if args.train_unet == "full" else " and base UNet")
        + " frozen"
    )


def write_model_card(args, output_dir: Path, num_examples: int, steps: int, num_processes: int, metrics=None):
    from huggingface_hub import ModelCard, ModelCardData

    base = str(args.pretrained_model_name_or_path)
    is_local = Path(base).exists()
    card_data = ModelCardData(
        license=args.license,
        library_name="diffusers",
        base_model=None if is_local else base,
        datasets=None if Path(args.dataset_name).exists() else [args.dataset_name],
        pipeline_tag="image-to-image",
        tags=["anomaly-synthesis", "anomalyxfusion", "industrial-anomaly-detection", "diffusers"],
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        repo_id=args.hub_model_id or output_dir.name,
        base_model=base,
        image_encoder=args.image_encoder,
        dataset=args.dataset_name,
        dataset_config=args.dataset_config,
        num_examples=num_examples,
        train_fold=args.train_fold,
        categories=args.categories,
        defect_types=args.defect_types,
        steps=steps,
        batch_size=args.train_batch_size,
        num_processes=num_processes,
        accumulation=args.gradient_accumulation_steps,
        resolution=args.resolution,
        learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler,
        trained=_trained(args),
        use_text=not args.no_text,
        use_mif=not args.no_mif,
        use_ddf=not args.no_ddf,
        loss_mask_weight=args.loss_mask_weight,
        mixed_precision=args.mixed_precision or "no",
        seed=args.seed,
        lora_rank=args.lora_rank,
        fused=args.fuse_lora,
        synthetic=args.train_unet == "full",
        metrics=metrics,
        license=args.license,
    )
    card.save(str(output_dir / "README.md"))
    return card


def push(args, output_dir: Path) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or output_dir.name
    repo_id = api.create_repo(repo_id, exist_ok=True, private=args.private, repo_type="model").repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message=f"AnomalyXFusion trained with train.py ({args.max_train_steps} steps)",
        ignore_patterns=HUB_IGNORE,
    )
    logger.info("Pushed %s to https://huggingface.co/%s", output_dir, repo_id)
    return repo_id
