"""One tiny training set-up for the training tests: a small MVTec Caption export, a tiny Stable Diffusion
base and CLIP vision folder saved as real checkpoints come, and train.py's arguments over them."""

from __future__ import annotations

from pathlib import Path

from axf_pipeline.tiny import build_tiny_components, save_tiny_base
from axf_pipeline.training.data import load_mvtec_caption


def make_training_setup(root: Path) -> dict:
    from mvtec_caption import export_dataset, make_sample_tree

    tree = make_sample_tree(root / "tree", "ad", captions_path=root / "captions.json", scale=0.04)
    export_dataset(
        "ad", tree.root, root / "export", captions=root / "captions.json", cache_dir=root / "cache"
    )
    words = {
        w.strip(".:").lower()
        for d in tree.captions.values()
        for c in d.values()
        for s in c
        for w in s.split()
    }
    base, encoder = save_tiny_base(root, build_tiny_components(words=words, scheduler="ddpm"))
    load_mvtec_caption(str(root / "export"), "ad", str(root / "cache"))  # prepared once, here
    return {
        "root": root,
        "dataset": root / "export",
        "cache": root / "cache",
        "base": base,
        "encoder": encoder,
    }


def training_argv(fx, output_dir, *extra):
    """train.py's arguments for the tiny set-up; ``extra`` adds or overrides flags."""
    return [
        "--pretrained_model_name_or_path", str(fx["base"]),
        "--image_encoder", str(fx["encoder"]),
        "--dataset_name", str(fx["dataset"]),
        "--dataset_config", "ad",
        "--cache_dir", str(fx["cache"]),
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--train_batch_size", "2",
        "--learning_rate", "1e-2",
        "--lora_rank", "2",
        "--validation_steps", "0",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip
