"""The end of training: a pipeline ``AnomalyXFusionPipeline.from_pretrained`` loads, its model card, the push.

The export is atomic. It is written whole into ``<output_dir>/exports/<name>.tmp``, renamed to
``exports/<name>``, and published by replacing the link ``exports/current`` (one rename). The pipeline's
names in ``<output_dir>`` (``model_index.json``, ``unet/``, ``mif/``, ..., ``README.md``, ``unet_lora/``)
are links through ``exports/current``, so ``from_pretrained(output_dir)`` loads the old export or the new
one, never a mix, whenever the run is killed. Checkpoints, logs and validation grids are left alone.

The saved pipeline is assembled from a fresh fp32 ``from_base`` load (so mixed-precision training never
degrades the frozen weights) into which the trained MIF, DDF and UNet weights are copied. A UNet LoRA is
saved the diffusers way (``save_lora_weights``, with its adapter metadata) under ``unet_lora/``, then
loaded back through ``load_lora_weights`` and, by default, fused: the saved UNet never carries an
unfused adapter, and ``from_pretrained`` alone gives the trained model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from .args import TrainingInputError
from .checkpointing import fsync_tree
from .model import load_base_pipeline

logger = logging.getLogger(__name__)

CARD_TEMPLATE = "model_card.md"  # in axf_pipeline/cards/ (package data)
LORA_DIR = "unet_lora"
EXPORTS = "exports"
CURRENT = "current"
_EXPORT_NAME = re.compile(r"^step-\d+-[0-9a-f]{8}(\.tmp)?$")


def _published_names() -> list[str]:
    """Every name an export may put in ``output_dir``: model_index.json, the card, the LoRA, the pipeline's code
    file, the components."""
    from .. import AnomalyXFusionPipeline
    from ..remote_code import pipeline_file

    components, _ = AnomalyXFusionPipeline._get_signature_keys(AnomalyXFusionPipeline)
    return ["model_index.json", "README.md", LORA_DIR, pipeline_file(AnomalyXFusionPipeline), *components]


def _link_target(name: str) -> str:
    return f"{EXPORTS}/{CURRENT}/{name}"


def _is_ours(path: Path) -> bool:
    return path.is_symlink() and os.readlink(path) == _link_target(path.name)


def has_export(output_dir: str | os.PathLike) -> bool:
    """Whether ``output_dir`` holds an exported pipeline (a finished run)."""
    return os.path.lexists(Path(output_dir) / EXPORTS / CURRENT)


def check_export_target(output_dir: str | os.PathLike) -> None:
    """Start-up check: the export would link the pipeline's names in ``output_dir``; none may be a user's file."""
    output_dir = Path(output_dir)
    if os.path.lexists(output_dir / EXPORTS) and not (output_dir / EXPORTS).is_dir():
        raise TrainingInputError(
            f"--output_dir {str(output_dir)!r} holds a file {EXPORTS}, where the exported pipelines go: "
            "move it away, or choose a new --output_dir"
        )
    for name in _published_names():
        path = output_dir / name
        if os.path.lexists(path) and not _is_ours(path):
            raise TrainingInputError(
                f"--output_dir {str(output_dir)!r} holds {name}, which this program did not write; the "
                "exported pipeline would replace it: move it away, or choose a new --output_dir"
            )


def publish(staged: Path, output_dir: Path) -> Path:
    """Makes the complete export ``staged`` (``exports/<name>.tmp``) the one ``output_dir`` loads, atomically."""
    exports = output_dir / EXPORTS
    fsync_tree(staged)
    final = staged.with_name(staged.name.removesuffix(".tmp"))
    os.rename(staged, final)
    # 1. The pipeline's names link through exports/current (the first time they dangle until step 2).
    for entry in final.iterdir():
        link = output_dir / entry.name
        if not _is_ours(link):
            if os.path.lexists(link):  # appeared since start-up: leave it, say where the export is
                raise TrainingInputError(
                    f"{link} was not written by this program; the pipeline was exported to {final} instead"
                )
            os.symlink(_link_target(entry.name), link)
    # 2. The switch: one rename of a link.
    switch = exports / f"{CURRENT}.tmp"
    if os.path.lexists(switch):
        os.unlink(switch)
    os.symlink(final.name, switch)
    os.replace(switch, exports / CURRENT)
    fd = os.open(exports, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    # 3. Tidy up what this program wrote: older exports and links to components the new export lacks.
    for old in exports.iterdir():
        if old != final and _EXPORT_NAME.match(old.name) and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
    for name in _published_names():
        link = output_dir / name
        if _is_ours(link) and not link.exists():
            os.unlink(link)
    return final


def export_pipeline(args, denoiser, data, global_step: int, num_processes: int = 1) -> Path:
    """Writes the pipeline (and the LoRA, the card) and publishes it in ``args.output_dir``; pushes when asked."""
    output_dir = Path(args.output_dir)
    staged = output_dir / EXPORTS / f"step-{global_step:06d}-{uuid.uuid4().hex[:8]}.tmp"
    staged.mkdir(parents=True)
    pipe = load_base_pipeline(args)
    pipe.mif.load_state_dict({k: v.float() for k, v in denoiser.mif.state_dict().items()})
    if denoiser.ddf is not None:
        pipe.ddf.load_state_dict({k: v.float() for k, v in denoiser.ddf.state_dict().items()})
    unet = denoiser.unet
    if args.train_unet == "full":
        pipe.unet.load_state_dict({k: v.float() for k, v in unet.state_dict().items()})
    elif args.lora_rank:
        save_unet_lora(pipe, unet, staged / LORA_DIR)
        pipe.load_lora_weights(str(staged / LORA_DIR))
        if args.fuse_lora:
            pipe.fuse_lora()
        # Drops the adapter layers: keeps the fused weights, or restores the base UNet when not fused.
        pipe.unload_lora_weights()
    pipe.save_pretrained(str(staged), safe_serialization=True)
    metrics = json.loads(Path(args.metrics_file).read_text()) if getattr(args, "metrics_file", None) else None
    write_model_card(args, staged, len(data.train), global_step, num_processes, metrics, output_dir.name)
    publish(staged, output_dir)
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


def write_model_card(
    args,
    folder: Path,
    num_examples: int,
    steps: int,
    num_processes: int,
    metrics=None,
    name: str | None = None,
):
    """README.md of the exported pipeline: names fit for the Hub (no local path), the licence of the data."""
    from huggingface_hub import ModelCard, ModelCardData

    from mvtec_caption.cards import card_template, check_card_data, check_publishable
    from mvtec_caption.export import dataset_terms

    from ..publishing import is_local, publishable_name

    base = str(args.pretrained_model_name_or_path)
    terms = dataset_terms(args.dataset_name, args.dataset_config)
    license = args.license or terms["license"]
    # A toy: trained on toy data, or a whole UNet from scratch (only ever done on a tiny random base).
    toy = terms["toy"] or args.train_unet == "full"
    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        base_model=None if is_local(base) else base,
        datasets=None if is_local(args.dataset_name) else [args.dataset_name],
        pipeline_tag="image-to-image",
        tags=[
            "anomaly-synthesis",
            "anomalyxfusion",
            "industrial-anomaly-detection",
            "diffusers",
            *(["mvtec"] if terms["mvtec"] else []),
            *(["toy"] if toy else []),
        ],
    )
    if license == "other" and args.license is None:
        card_data.license_name, card_data.license_link = terms["license_name"], terms["license_link"]
    typed = [base, args.image_encoder, args.dataset_name, args.output_dir, getattr(args, "cache_dir", None)]
    check_card_data(card_data, typed)
    card = ModelCard.from_template(
        card_data,
        template_str=card_template("axf_pipeline", CARD_TEMPLATE),
        repo_id=args.hub_model_id or name or folder.name,
        base_model=publishable_name(base),
        image_encoder=publishable_name(args.image_encoder),
        dataset=publishable_name(args.dataset_name),
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
        caption_drop_prob=args.caption_drop_prob,
        reference_drop_prob=args.reference_drop_prob,
        joint_drop_prob=args.joint_drop_prob,
        reference_mismatch_prob=args.reference_mismatch_prob,
        mixed_precision=args.mixed_precision or "no",
        seed=args.seed,
        lora_rank=args.lora_rank,
        fused=args.fuse_lora,
        toy=toy,
        data_mvtec=terms["mvtec"],
        metrics=metrics,
        license=license,
        license_stated=args.license is not None,
    )
    check_publishable(str(card), typed, "model card")
    card.save(str(folder / "README.md"))
    return card


def push(args, output_dir: Path) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or output_dir.name
    repo_id = api.create_repo(repo_id, exist_ok=True, private=args.private, repo_type="model").repo_id
    api.upload_folder(  # the published export only: no checkpoints, logs or validation grids
        repo_id=repo_id,
        folder_path=str((output_dir / EXPORTS / CURRENT).resolve()),
        commit_message=f"AnomalyXFusion trained with train.py ({args.max_train_steps} steps)",
    )
    logger.info("Pushed %s to https://huggingface.co/%s", output_dir, repo_id)
    return repo_id
