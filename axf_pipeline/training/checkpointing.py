"""Atomic checkpoints: every process writes into ``checkpoint-<step>.tmp``, then the main process renames
it to ``checkpoint-<step>``. A rename is atomic, so a run killed at any moment leaves complete
checkpoints (and perhaps a ``.tmp`` leftover, ignored and removed) but never a half-written one.

A checkpoint holds accelerate's state (optimizer, lr scheduler, every process's RNG states), the
trained parameters only (``trainable_parameters.safetensors``: MIF, DDF, LoRA or the UNet when trained,
never the frozen base) and ``training_state.json`` (the step, epoch and batch position).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from .args import TrainingInputError

PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
STATE_FILE = "training_state.json"
WEIGHTS_FILE = "trainable_parameters.safetensors"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``latest`` → the newest complete checkpoint (None when there is none); a path must be a checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise TrainingInputError(
            f"--resume_from_checkpoint {resume!r} is not a complete checkpoint (no {STATE_FILE}); "
            f"use a {PREFIX}<step> folder of a previous run or 'latest'"
        )
    return path


def read_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def remove_leftovers(output_dir: str | os.PathLike) -> None:
    """Delete ``.tmp`` folders that a killed run left behind (main process, at start-up)."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for p in output_dir.glob(f"{PREFIX}*{TMP_SUFFIX}"):
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
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    """Flush the files to disk before the rename publishes them (a power cut must not expose empty files)."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
