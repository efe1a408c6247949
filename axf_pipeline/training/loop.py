"""``train.py``'s body: start-up checks, then the accelerate training loop, checkpoints, validation, export."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from . import checkpointing as ckpt
from .args import TrainingInputError
from .data import (
    AnomalyTrainingDataset,
    EpochBatchSampler,
    collate,
    load_mvtec_caption,
    select_training_data,
)
from .loss import default_loss_mask_weight
from .model import (
    BatchEncoder,
    XFusionDenoiser,
    check_base_model,
    check_resolution,
    compute_loss,
    load_base_pipeline,
    set_trainable,
    step_generator,
)

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def load_base_configs(args: argparse.Namespace) -> dict[str, SimpleNamespace]:
    """The base's VAE and UNet configs without their weights: the start-up checks need only these."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    configs = {}
    for name, cls in (("vae", AutoencoderKL), ("unet", UNet2DConditionModel)):
        try:
            config = cls.load_config(args.pretrained_model_name_or_path, subfolder=name, **kwargs)
        except OSError as err:
            raise TrainingInputError(
                f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: no readable "
                f"{name}/config.json ({err})"
            ) from err
        configs[name] = SimpleNamespace(config=SimpleNamespace(**config))
    return configs


@dataclass
class TrainingResult:
    output_dir: Path
    global_step: int
    pipeline: object  # the pipeline trained in place (its unet still carries an unfused LoRA if any)


def check_mixed_precision(precision: str | None) -> None:
    """fp16 on a CPU: accelerate would run it with the frozen towers in fp16 and no autocast, and fail
    mid-step on a dtype mismatch."""
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not (
        torch.cuda.is_available() or torch.backends.mps.is_available()
    )
    if precision == "fp16" and on_cpu:
        raise TrainingInputError("--mixed_precision fp16 needs a GPU; on a CPU use bf16 or no")


def train(args: argparse.Namespace) -> TrainingResult:
    """Runs the whole training; the saved pipeline is in ``output_dir``."""
    accelerator = make_accelerator(args)
    resume_dir, run, data = check_inputs(args)  # every bad input fails here, before any compute
    model = load_model(args, accelerator)
    batches = make_batches(args, data, accelerator)
    encoder = make_batch_encoder(args, model.pipe.components)
    global_step = resume(args, accelerator, resume_dir)
    start_trackers(args, accelerator, model, batches, global_step)
    global_step = train_loop(args, accelerator, model, batches, encoder, data, run, global_step)
    save(args, accelerator, model, data, global_step)
    return TrainingResult(Path(args.output_dir), global_step, model.pipe)


# ---- set-up ----------------------------------------------------------------------------------------
def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    check_mixed_precision(args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION"))
    output_dir = Path(args.output_dir)
    report_to = None if args.report_to in ("none", "") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def check_inputs(args: argparse.Namespace):
    """The start-up checks (base model, output folder, resume, resolution, data); returns the checkpoint to
    resume from (or None), the run id and the selected training data."""
    from .export import check_export_target, has_export

    output_dir = Path(args.output_dir)
    check_base_model(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    check_export_target(output_dir)
    resume_dir, run = ckpt.resolve_run(args, has_export=has_export(output_dir))
    base = load_base_configs(args)
    check_resolution(args.resolution, base["vae"], base["unet"])
    if base["unet"].config.in_channels not in (4, 9):
        raise TrainingInputError(
            f"--pretrained_model_name_or_path: UNet in_channels={base['unet'].config.in_channels}; "
            "expected 4 (plain) or 9 (inpainting)"
        )
    data = select_training_data(
        load_mvtec_caption(args.dataset_name, args.dataset_config, args.cache_dir),
        args.categories,
        args.defect_types,
        args.train_fold,
        source=f"--dataset_name {args.dataset_name!r}",
    )
    return resume_dir, run, data


# ---- model -----------------------------------------------------------------------------------------
@dataclass
class Model:
    """What the loop trains and steps: the pipeline, its trained modules as one denoiser, the optimiser."""

    pipe: object
    denoiser: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: object | None


def load_model(args: argparse.Namespace, accelerator) -> Model:
    """The base pipeline with fresh MIF/DDF (and LoRA), the trainable parameters, AdamW and its schedule."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    set_seed(args.seed)  # fresh MIF/DDF (and LoRA) initialisations are reproducible
    pipe = load_base_pipeline(args)
    components = pipe.components
    weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    set_trainable(
        components, args.train_unet, args.lora_rank, args.lora_alpha, accelerator.device, weight_dtype
    )
    unet, mif, ddf = components["unet"], components["mif"], components["ddf"]
    if args.loss_mask_weight is None:  # by the UNet; resolved here so the model card records the value
        args.loss_mask_weight = default_loss_mask_weight(unet.config.in_channels)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    denoiser = XFusionDenoiser(unet, mif, ddf)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    lr = args.learning_rate * (total_batch if args.scale_lr else 1)
    optimizer = torch.optim.AdamW(
        params,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        foreach=True,  # one kernel per step for all tensors; torch's CPU default is one per tensor
    )
    # Stepped once per optimizer step by this loop (not prepared, so accelerate doesn't step it per process).
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = None
    if args.use_ema:  # an average of the trained weights: saved and resumed with each checkpoint, exported
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=args.ema_decay, foreach=True)
        accelerator.register_for_checkpointing(ema)
    ckpt.register_hooks(accelerator, accelerator.unwrap_model)
    return Model(pipe, denoiser, params, optimizer, lr_scheduler, ema)


# ---- data ------------------------------------------------------------------------------------------
@dataclass
class Batches:
    dataset: AnomalyTrainingDataset
    sampler: EpochBatchSampler
    loader: torch.utils.data.DataLoader


def make_batches(args: argparse.Namespace, data, accelerator) -> Batches:
    """This process's share of every epoch, each example drawn from (seed, epoch, index)."""
    train_dataset = AnomalyTrainingDataset(
        data.train,
        args.resolution,
        seed=args.seed,
        crop_jitter=args.crop_jitter,
        random_flip=args.random_flip,
        caption_drop_prob=args.caption_drop_prob,
        reference_drop_prob=args.reference_drop_prob,
        joint_drop_prob=args.joint_drop_prob,
        reference_mismatch_prob=args.reference_mismatch_prob,
    )
    sampler = EpochBatchSampler(
        len(train_dataset),
        args.train_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        args.seed,
    )
    loader = torch.utils.data.DataLoader(
        train_dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.dataloader_num_workers
    )
    return Batches(train_dataset, sampler, loader)


def make_batch_encoder(args: argparse.Namespace, components: dict) -> BatchEncoder:
    frozen = ("vae", "text_encoder", "tokenizer", "image_encoder", "feature_extractor")
    return BatchEncoder(
        **{name: components[name] for name in frozen},
        scheduler=components["scheduler"].__class__.from_config(components["scheduler"].config),
        inpainting=components["unet"].config.in_channels == 9,
        cache_latents=args.cache_latents,
        noise_offset=args.noise_offset,
        snr_gamma=args.snr_gamma,
    )


# ---- resume ----------------------------------------------------------------------------------------
def resume(args: argparse.Namespace, accelerator, resume_dir: Path | None) -> int:
    """Loads the checkpoint to resume from (if any); returns the optimizer step to start at."""
    output_dir = Path(args.output_dir)
    global_step = 0
    if accelerator.is_main_process:
        ckpt.remove_leftovers(output_dir)
    if resume_dir is not None:
        logger.info("Resuming from %s", resume_dir)
        accelerator.load_state(str(resume_dir))
        global_step = ckpt.read_state(resume_dir)["global_step"]
        if global_step >= args.max_train_steps:
            logger.warning(
                "%s is at step %d, not below --max_train_steps %d: nothing to train, its weights are exported",
                resume_dir,
                global_step,
                args.max_train_steps,
            )
    elif args.resume_from_checkpoint == "latest":
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting fresh", output_dir)
    return global_step


def start_trackers(args: argparse.Namespace, accelerator, model: Model, batches: Batches, global_step: int):
    if accelerator.is_main_process:
        config = {
            k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in vars(args).items()
        }
        accelerator.init_trackers(args.tracker_project_name, config=config)
    logger.info(
        "%d training anomalies, %d processes x batch %d x accumulation %d, %d steps (from %d), %d trained parameters",
        len(batches.dataset),
        accelerator.num_processes,
        args.train_batch_size,
        args.gradient_accumulation_steps,
        args.max_train_steps,
        global_step,
        sum(p.numel() for p in model.params),
    )


# ---- loop ------------------------------------------------------------------------------------------
def train_loop(
    args: argparse.Namespace,
    accelerator,
    model: Model,
    batches: Batches,
    encoder: BatchEncoder,
    data,
    run: str,
    global_step: int,
) -> int:
    """Optimizer steps from ``global_step`` to ``--max_train_steps``, with checkpoints and validations."""
    from tqdm.auto import tqdm

    micro = global_step * args.gradient_accumulation_steps
    progress = tqdm(
        total=args.max_train_steps,
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    running = 0.0
    denoiser, optimizer, params = model.denoiser, model.optimizer, model.params
    while global_step < args.max_train_steps:
        epoch, skip = divmod(micro, len(batches.sampler))
        batches.sampler.set_epoch(epoch, skip)
        batches.dataset.set_epoch(epoch)
        for batch in batches.loader:
            with accelerator.accumulate(denoiser):
                generator = step_generator(args.seed, micro, accelerator.process_index)
                inputs = encoder(batch, generator, not args.no_text)
                loss = compute_loss(denoiser, inputs, args.loss_mask_weight)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            running += loss.detach() / args.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            model.lr_scheduler.step()
            if model.ema is not None:
                model.ema.step(params)
            global_step += 1
            step_loss = accelerator.reduce(running, reduction="mean").item()
            running = 0.0
            accelerator.log({"loss": step_loss, "lr": model.lr_scheduler.get_last_lr()[0]}, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}")
            after_step(args, accelerator, model, data, run, global_step, micro, len(batches.sampler))
            if global_step >= args.max_train_steps:
                break
    progress.close()
    return global_step


def after_step(args, accelerator, model: Model, data, run: str, global_step: int, micro: int, epoch_len: int):
    """A checkpoint every ``--checkpointing_steps`` (and at the end), a validation every ``--validation_steps``."""
    if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
        state = {"global_step": global_step, "micro_batches": micro, "epoch": micro // epoch_len, "run": run}
        path = ckpt.save_checkpoint(accelerator, Path(args.output_dir), state, args.checkpoints_total_limit)
        logger.info("Saved %s", path)
    if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
        from .validation import log_validation

        log_validation(accelerator, model.pipe, data.train, data.normals, args, global_step)


# ---- save ------------------------------------------------------------------------------------------
def save(args: argparse.Namespace, accelerator, model: Model, data, global_step: int) -> None:
    """Exports the pipeline (main process only: it is saved once), with the EMA weights if any."""
    accelerator.wait_for_everyone()
    if model.ema is not None:
        model.ema.copy_to(model.params)  # the pipeline (exported and returned) carries the averaged weights
    if accelerator.is_main_process:
        from .export import export_pipeline

        export_pipeline(
            args, accelerator.unwrap_model(model.denoiser), data, global_step, accelerator.num_processes
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
