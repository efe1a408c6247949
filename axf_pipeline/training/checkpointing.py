"""Atomic checkpoints: every process writes into ``checkpoint-<step>.tmp``, then the main process renames
it to ``checkpoint-<step>``. A rename is atomic, so a run killed at any moment leaves complete
checkpoints (and perhaps a ``.tmp`` leftover, ignored and removed) but never a half-written one.

A checkpoint holds accelerate's state (optimizer, lr scheduler, every process's RNG states), the
trained parameters only (``trainable_parameters.safetensors``: MIF, DDF, LoRA or the UNet when trained,
never the frozen base) and ``training_state.json`` (the step, epoch and batch position, and the run: an id
and the flags that decide what is learned). The run record keeps two runs from mixing in one
``--output_dir``: a new run refuses a folder holding another run's checkpoints, a resume refuses other
flags, and ``--checkpoints_total_limit`` prunes only the current run's checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from .args import TrainingInputError

PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
STATE_FILE = "training_state.json"
WEIGHTS_FILE = "trainable_parameters.safetensors"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
# Flags that may differ when a run is resumed: they change neither the data seen nor what is learned.
RESUMABLE_FLAGS = frozenset(
    {
        "output_dir", "resume_from_checkpoint", "max_train_steps", "checkpointing_steps",
        "checkpoints_total_limit", "validation_steps", "num_validation_images", "validation_inference_steps",
        "report_to", "logging_dir", "tracker_project_name", "push_to_hub", "hub_model_id", "hub_token",
        "private", "metrics_file", "license", "fuse_lora", "cache_dir", "dataloader_num_workers",
        "gradient_checkpointing", "allow_tf32", "cache_latents", "mixed_precision",
    }
)  # fmt: skip

# Local folders may be named by other relative paths when a run is resumed.
_PATH_FLAGS = frozenset({"pretrained_model_name_or_path", "image_encoder", "dataset_name"})

logger = logging.getLogger(__name__)


def step_of(checkpoint: Path) -> int:
    return int(_NAME.match(checkpoint.name).group(1))


def _checkpoint_folders(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if _NAME.match(p.name) and p.is_dir()), key=step_of)


def is_complete(checkpoint: Path) -> bool:
    """The state file is written last, just before the rename: without it a folder is not a checkpoint."""
    return (checkpoint / STATE_FILE).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    return [p for p in _checkpoint_folders(Path(output_dir)) if is_complete(p)]


def read_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def run_id_of(checkpoint: Path) -> str | None:
    """The id of the run that wrote ``checkpoint`` (None for a checkpoint without a run record)."""
    return (read_state(checkpoint).get("run") or {}).get("id")


def run_flags(args: argparse.Namespace) -> dict:
    """The flags that define a run (everything but :data:`RESUMABLE_FLAGS`), local paths made absolute."""

    def normal(name, value):
        if name in _PATH_FLAGS and isinstance(value, str) and os.path.exists(value):
            return os.path.realpath(value)
        return value if value is None or isinstance(value, int | float | str | bool | list) else str(value)

    return {k: normal(k, v) for k, v in sorted(vars(args).items()) if k not in RESUMABLE_FLAGS}


def _names(paths: list[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:4])
    return shown + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")


def _resume_dir(resume: str | None, complete: list[Path]) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        return complete[-1] if complete else None
    if not is_complete(Path(resume)):
        raise TrainingInputError(
            f"--resume_from_checkpoint {resume!r} is not a complete checkpoint (no {STATE_FILE}); "
            f"use a {PREFIX}<step> folder of a previous run or 'latest'"
        )
    return Path(resume)


def _check_same_flags(args: argparse.Namespace, resume_dir: Path, recorded: dict) -> None:
    current = run_flags(args)
    for name in sorted(set(current) & set(recorded)):
        if current[name] != recorded[name]:
            raise TrainingInputError(
                f"--{name} {current[name]!r} differs from the run being resumed ({resume_dir}: "
                f"--{name} {recorded[name]!r}); resume with the run's own flags, or continue from the "
                "checkpoint with other flags in a new --output_dir"
            )


def resolve_run(args: argparse.Namespace, has_export: bool = False) -> tuple[Path | None, dict]:
    """Start-up check of ``--output_dir`` and ``--resume_from_checkpoint``: ``(resume_dir, run record)``.

    Resuming a checkpoint of ``--output_dir`` continues its run: the flags must be the run's own and no
    other run's checkpoints may lie beside it. Anything else is a new run (possibly starting from another
    folder's checkpoint): its ``--output_dir`` must hold no checkpoints and no exported pipeline.
    Incomplete ``checkpoint-N`` folders are skipped by ``latest``; one where this run would save is refused.
    """
    output_dir = Path(args.output_dir)
    folders = _checkpoint_folders(output_dir)
    complete = [p for p in folders if is_complete(p)]
    incomplete = [p for p in folders if not is_complete(p)]
    resume_dir = _resume_dir(args.resume_from_checkpoint, complete)
    state = read_state(resume_dir) if resume_dir is not None else {"global_step": 0}
    where = f"--output_dir {str(output_dir)!r}"
    if resume_dir is not None and resume_dir.parent.resolve() == output_dir.resolve():
        record = {"id": (state.get("run") or {}).get("id")}  # None: a checkpoint without a run record
        if others := [p for p in complete if run_id_of(p) != record["id"]]:
            raise TrainingInputError(
                f"{where} holds checkpoints of more than one run ({_names(others)} are not of the run of "
                f"{resume_dir.name}): resume from a folder holding one run only, or a new --output_dir"
            )
        if "flags" in (state.get("run") or {}):
            _check_same_flags(args, resume_dir, state["run"]["flags"])
    else:
        hint = "resume that run with --resume_from_checkpoint latest, or choose a new --output_dir"
        if complete:
            raise TrainingInputError(f"{where} holds checkpoints of another run ({_names(complete)}): {hint}")
        if has_export:
            if args.resume_from_checkpoint == "latest":  # nothing to resume: the checkpoints are gone
                hint = "its checkpoints are gone, so choose a new --output_dir"
            raise TrainingInputError(f"{where} holds the exported pipeline of another run: {hint}")
        record = {"id": uuid.uuid4().hex}
    record["flags"] = run_flags(args)
    start, end = state["global_step"], args.max_train_steps
    saves = [p for p in incomplete if start < step_of(p) <= end]
    if clash := [p for p in saves if step_of(p) % args.checkpointing_steps == 0 or step_of(p) == end]:
        raise TrainingInputError(
            f"{clash[0]} is not a complete checkpoint (no {STATE_FILE}) and this run would save its "
            "checkpoint there: move it away, or choose a new --output_dir"
        )
    if incomplete and args.resume_from_checkpoint == "latest":
        logger.warning(
            "%s in %s: not a complete checkpoint (no %s), skipped", _names(incomplete), output_dir, STATE_FILE
        )
    return resume_dir, record


def remove_leftovers(output_dir: str | os.PathLike) -> None:
    """Delete ``.tmp`` folders that a killed run left behind (main process, at start-up)."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for p in output_dir.glob(f"{PREFIX}*{TMP_SUFFIX}"):
            if _NAME.match(p.name.removesuffix(TMP_SUFFIX)):
                shutil.rmtree(p, ignore_errors=True)


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: torch.nn.Module, path: str | os.PathLike) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    expected = set(trainable_state_dict(module))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise TrainingInputError(
            f"{path} does not match this run's trained parameters (missing {missing[:3]}, unexpected "
            f"{extra[:3]}): resume with the same model flags (--no_text/--no_mif/--no_ddf/--lora_rank/--train_unet)"
        )
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def register_hooks(accelerator, unwrap) -> None:
    """accelerate saves only the trained parameters of the denoiser, not the frozen base UNet."""
    from safetensors.torch import save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_file(trainable_state_dict(unwrap(model)), os.path.join(output_dir, WEIGHTS_FILE))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            load_trainable_state_dict(unwrap(models.pop()), os.path.join(input_dir, WEIGHTS_FILE))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, state: dict, total_limit: int | None) -> Path:
    """Collective: every process must call it. Returns the final folder."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{state['global_step']}"
    tmp = output_dir / f"{final.name}{TMP_SUFFIX}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        fsync_tree(tmp)
        run = state["run"]["id"]
        if final.exists():  # this run's same step saved again (after resuming an earlier checkpoint)
            if not (is_complete(final) and run_id_of(final) == run):
                raise RuntimeError(f"{final} appeared during training and is not this run's: not replaced")
            shutil.rmtree(final)
        os.rename(tmp, final)
        if total_limit is not None:  # never prune what another run wrote
            for old in [p for p in list_checkpoints(output_dir) if run_id_of(p) == run][:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def fsync_tree(folder: Path) -> None:
    """Flush the files to disk before the rename publishes them (a power cut must not expose empty files)."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
