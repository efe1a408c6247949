"""Command-line flags of ``train.py``, named after diffusers' example training scripts."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from mvtec_caption.cards import check_license_id
from mvtec_caption.command import command_parser


class TrainingInputError(ValueError):
    """Bad training input, found at start-up before any compute. The message names the flag or file."""


def check_drop_probs(caption: float, reference: float, joint: float) -> tuple[float, float, float]:
    """The three dropout probabilities are of exclusive events, so together they are at most 1."""
    for name, value in (("caption", caption), ("reference", reference), ("joint", joint)):
        if not 0.0 <= value <= 1.0:
            raise TrainingInputError(f"--{name}_drop_prob must be in [0, 1], got {value}")
    if caption + reference + joint > 1.0 + 1e-9:
        raise TrainingInputError(
            f"--caption_drop_prob {caption} + --reference_drop_prob {reference} + --joint_drop_prob {joint} "
            "exceed 1: they are the probabilities of exclusive events"
        )
    return caption, reference, joint


DESCRIPTION = (
    "Train AnomalyXFusion (MIF + DDF, optional UNet LoRA) on MVTec Caption. Run with `accelerate launch "
    "train.py ...` or `accelerate launch -m axf_pipeline.training ...` for one or several GPUs/processes."
)


def build_parser() -> argparse.ArgumentParser:
    """``train.py``'s parser (``axf train`` builds the same one from :func:`add_arguments`)."""
    return command_parser(None, DESCRIPTION, add_arguments)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``train.py``'s flags, by group, named after diffusers' training scripts."""
    _model_flags(p.add_argument_group("model"))
    _data_flags(p.add_argument_group("data"))
    _optimisation_flags(p.add_argument_group("optimisation"))
    _output_flags(p.add_argument_group("checkpoints, logging, publishing"))


def _model_flags(g) -> None:
    g.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="Stable Diffusion checkpoint (plain 4-channel or inpainting 9-channel UNet): Hub id or folder.",
    )
    g.add_argument("--revision", default=None, help="Hub revision of the base model.")
    g.add_argument("--variant", default=None, help="Weight variant of the base model, e.g. fp16.")
    g.add_argument(
        "--image_encoder",
        required=True,
        help="CLIP vision encoder with projection (CLIPVisionModelWithProjection): Hub id or folder.",
    )
    g.add_argument("--no_text", action="store_true", help="Ablation: no text condition (use_semantic=False).")
    g.add_argument(
        "--no_mif", action="store_true", help="Ablation: no MIF aggregator (use_aggregator=False)."
    )
    g.add_argument("--no_ddf", action="store_true", help="Ablation: no Dynamic Dif-Fusion (ddf=None).")
    g.add_argument(
        "--lora_rank", type=int, default=0, help="Rank of a peft LoRA on the UNet's attention; 0 = no LoRA."
    )
    g.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank).")
    g.add_argument(
        "--train_unet",
        choices=("frozen", "full"),
        default="frozen",
        help="'frozen' (default, the paper): the base UNet's weights stay fixed. 'full': train every UNet "
        "weight -- only for tiny from-scratch models with no pretrained UNet (the offline demo).",
    )
    g.add_argument(
        "--fuse_lora",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Fuse the UNet LoRA into the saved pipeline's UNet (default), so from_pretrained alone gives the "
        "trained model. The unfused LoRA is always saved too, under <output_dir>/unet_lora/.",
    )


def _data_flags(g) -> None:
    g.add_argument(
        "--dataset_name",
        required=True,
        help="MVTec Caption: a folder or Hub id that datasets.load_dataset takes (e.g. an export folder).",
    )
    g.add_argument("--dataset_config", default=None, help="Dataset config: 'ad' or 'loco'.")
    g.add_argument("--cache_dir", default=None, help="datasets / models cache directory.")
    g.add_argument("--categories", nargs="+", default=None, help="Keep only these categories.")
    g.add_argument("--defect_types", nargs="+", default=None, help="Keep only these defect types.")
    g.add_argument(
        "--train_fold",
        choices=("generator", "all"),
        default="generator",
        help="'generator' (default): the few-shot protocol's first floor(n/3) anomalies of each defect type; "
        "'all' also trains on the evaluation fold (then the evaluation is no longer held out).",
    )
    g.add_argument("--resolution", type=int, default=512, help="Training crop size in pixels (square).")
    g.add_argument(
        "--crop_jitter",
        type=float,
        default=0.25,
        help="How far (fraction of the free room) a crop may move off the defect's centre; 0 = centred.",
    )
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument(
        "--caption_drop_prob",
        type=float,
        default=0.25,
        help="Probability of an empty caption with the reference kept: teaches the reference-only branch "
        "of two-condition guidance (and sampling from a reference alone).",
    )
    g.add_argument(
        "--reference_drop_prob",
        type=float,
        default=0.35,
        help="Probability of a zero image embedding with the caption kept: teaches text-only sampling, and "
        "makes the text carry the defect instead of copying the reference.",
    )
    g.add_argument(
        "--joint_drop_prob",
        type=float,
        default=0.1,
        help="Probability of dropping caption and reference together: the unconditional branch of guidance. "
        "The three are exclusive events (sum <= 1).",
    )
    g.add_argument(
        "--reference_mismatch_prob",
        type=float,
        default=0.5,
        help="Of the examples that keep both conditions, the share whose reference is another defect type of "
        "the same category: the caption is the label, so where the two disagree the caption decides.",
    )
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument(
        "--cache_latents",
        action="store_true",
        help="Keep the VAE latents of each (image, crop, flip) seen; pays off with --crop_jitter 0 "
        "--no-random_flip on a small fixed dataset.",
    )


def _optimisation_flags(g) -> None:
    g.add_argument("--train_batch_size", type=int, default=4, help="Batch size per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument(
        "--scale_lr", action="store_true", help="Multiply the lr by processes x batch x accumulation."
    )
    g.add_argument("--lr_scheduler", default="constant", help="diffusers.optimization scheduler name.")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--max_train_steps", type=int, default=5000, help="Optimizer steps; training stops there.")
    g.add_argument(
        "--loss_mask_weight",
        type=float,
        default=None,
        help="Mask weighting of eq. 17 in [0, 1]: per-pixel weight (1 - w) + w * mask; 1 = loss inside the "
        "defect mask only (the reference code), 0 = plain unweighted loss. Default by the base UNet: 1 for a "
        "4-channel UNet (sampling replaces everything outside the mask at every step), 0 for a 9-channel "
        "inpainting UNet (its predictions outside the mask are used while sampling).",
    )
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    g.add_argument("--gradient_checkpointing", action="store_true", help="Recompute UNet activations.")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--seed", type=int, default=0, help="Seed of noise, timesteps, augmentations and order.")
    g.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an exponential moving average of the trained weights (diffusers' EMAModel); it is saved "
        "and resumed with each checkpoint and is what the final pipeline exports.",
    )
    g.add_argument("--ema_decay", type=float, default=0.9999, help="Upper bound of the EMA decay.")
    g.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting (Hang et al., 2023): weight min(SNR(t), gamma)/SNR(t) per example; "
        "5.0 is the recommended value. Default: unweighted.",
    )
    g.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="Add offset * N(0, 1) per example and channel to the training noise, so the model can "
        "change mean brightness and colour; ~0.05-0.1. 0 = off.",
    )


def _output_flags(g) -> None:
    g.add_argument("--output_dir", required=True, help="Checkpoints, logs and the final pipeline go here.")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many.")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A checkpoint folder, or 'latest' (the newest under --output_dir; starts fresh if none).",
    )
    g.add_argument(
        "--validation_steps", type=int, default=500, help="Validation grid every N steps; 0 = never."
    )
    g.add_argument("--num_validation_images", type=int, default=2)
    g.add_argument("--validation_inference_steps", type=int, default=30)
    g.add_argument(
        "--report_to", default="tensorboard", help="accelerate tracker(s): tensorboard, wandb, all."
    )
    g.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    g.add_argument("--tracker_project_name", default="anomalyxfusion")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument(
        "--hub_model_id", default=None, help="Repo id for --push_to_hub (default: output folder name)."
    )
    g.add_argument("--hub_token", default=None)
    g.add_argument("--private", action="store_true", help="Create the Hub repo private.")
    g.add_argument("--metrics_file", default=None, help="JSON {metric: value} to put in the model card.")
    g.add_argument(
        "--license",
        default=None,
        help="Model licence for the card, a Hub licence id; default: the training data's (MVTec Caption: "
        "cc-by-nc-sa-4.0; toy data: apache-2.0; a custom set: what its card states, else unknown).",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Checks that need no model or data; the rest happens in :func:`setup` before the first step."""

    def bad(msg: str):
        raise TrainingInputError(msg)

    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "resolution"):
        if getattr(args, name) < 1:
            bad(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.checkpointing_steps < 1:
        bad(f"--checkpointing_steps must be >= 1, got {args.checkpointing_steps}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        bad(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if args.lora_rank < 0:
        bad(f"--lora_rank must be >= 0, got {args.lora_rank}")
    if args.license is not None:
        try:
            check_license_id(args.license)
        except ValueError as err:
            bad(str(err))
    if args.lora_rank and args.train_unet == "full":
        bad("--lora_rank and --train_unet full exclude each other: a fully trained UNet needs no LoRA")
    for name in ("loss_mask_weight", "crop_jitter"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            bad(f"--{name} must be in [0, 1], got {value}")
    check_drop_probs(args.caption_drop_prob, args.reference_drop_prob, args.joint_drop_prob)
    if not 0 <= args.reference_mismatch_prob <= 1:
        raise TrainingInputError(
            f"--reference_mismatch_prob must lie in [0, 1], got {args.reference_mismatch_prob}"
        )
    if not 0.0 <= args.ema_decay < 1.0:
        bad(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        bad(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    if args.noise_offset < 0:
        bad(f"--noise_offset must be >= 0, got {args.noise_offset}")
    if args.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        bad("--push_to_hub was given but HF_HUB_OFFLINE is set: the push would fail after training")
    if args.metrics_file is not None and not os.path.isfile(args.metrics_file):
        bad(f"--metrics_file {args.metrics_file!r} does not exist")
    resume = args.resume_from_checkpoint
    if resume is not None and resume != "latest" and not os.path.isdir(resume):
        bad(
            f"--resume_from_checkpoint {resume!r} is not a folder (give a checkpoint-<step> folder or 'latest')"
        )
