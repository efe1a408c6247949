"""Training-recipe comparison on a VALIDATION split: the demo's data, base and training at one seed with extra
train.py flags, then text controllability and reference fidelity at several guidance pairs on validation
normals (made at ``seed + 5000``: neither the demo's held-out normals nor its fresh split).

This is how the recipe (VAE and CLIP pre-training steps, condition dropout, training steps, guidance) was
chosen; its raw output is ``benchmarks/results/recipe_validation/results.jsonl`` (one line per run).

    python benchmarks/bench_recipe_validation.py --seed 1 --name drop25_35_10 --steps 2000 \\
        --guidance 4/4 7/3 --extra --caption_drop_prob 0.25 --reference_drop_prob 0.35 --joint_drop_prob 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axf_pipeline.demo import run as demo  # noqa: E402
from axf_pipeline.demo.toy_data import normal_image  # noqa: E402

VALIDATION_SEED_OFFSET = 5000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument(
        "--name", required=True, help="run name (a folder under the work dir, a row of the output)"
    )
    p.add_argument("--steps", type=int, default=1000, help="generator training steps")
    p.add_argument("--vae_steps", type=int, default=400)
    p.add_argument("--clip_steps", type=int, default=300)
    p.add_argument(
        "--anomalies_per_type", type=int, default=None, help="toy anomalies per type (demo default)"
    )
    p.add_argument("--guidance", nargs="+", default=["4/4"], help="TEXT/REFERENCE guidance pairs")
    p.add_argument("--work", type=Path, default=Path("outputs/recipe_validation"))
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/recipe_validation/results.jsonl"))
    p.add_argument(
        "--unet_layout", default=None, help="tiny UNet layout (axf_pipeline.tiny; default: demo's)"
    )
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="train.py flags (last)")
    a = p.parse_args()
    torch.set_num_threads(1)
    per_type = [] if a.anomalies_per_type is None else ["--anomalies_per_type", str(a.anomalies_per_type)]
    args = demo.build_parser().parse_args(["--seed", str(a.seed), "--train_steps", str(a.steps), *per_type])
    work = a.work / f"vae{a.vae_steps}_clip{a.clip_steps}_n{args.anomalies_per_type}_seed{a.seed}"
    if a.unet_layout is not None:  # the base the demo would build, with another UNet layout
        import functools

        from axf_pipeline import tiny

        tiny.build_tiny_components = functools.partial(tiny.build_tiny_components, unet_layout=a.unet_layout)
        work = work.with_name(work.name + f"_{a.unet_layout}")
    toy, export, dataset = demo.build_dataset(
        work, args.size, args.anomalies_per_type, args.held_out_normals, a.seed
    )
    base = work / "base"
    if (base / "base" / "model_index.json").exists():  # the same seed's base, made by an earlier run
        base, encoder = base / "base", base / "image_encoder"
    else:
        base, encoder = demo.tiny_base(work, toy, args.size, a.vae_steps, a.seed, a.clip_steps)
    started = time.perf_counter()
    out = demo.train_model(work, a.name, a.extra, base, encoder, export, args)
    seconds = time.perf_counter() - started
    from axf_pipeline import AnomalyXFusionPipeline

    pipe = AnomalyXFusionPipeline.from_pretrained(out)
    rng = np.random.default_rng(a.seed + VALIDATION_SEED_OFFSET)
    normals = [normal_image(rng, args.size) for _ in range(8)]
    row = {"name": a.name, "seed": a.seed, "steps": a.steps, "vae_steps": a.vae_steps, "clip_steps": a.clip_steps,
           "anomalies_per_type": args.anomalies_per_type, "unet_layout": a.unet_layout, "flags": a.extra, "train_s": round(seconds, 1)}  # fmt: skip
    for pair in a.guidance:
        text, reference = (float(x) for x in pair.split("/"))
        one = argparse.Namespace(size=args.size, inference_steps=args.inference_steps, synthesis_batch=64,
                                 guidance_scale=text, reference_guidance_scale=reference)  # fmt: skip
        m, _ = demo.measure_split(pipe, normals, dataset, a.seed + VALIDATION_SEED_OFFSET + 1, one)
        row[pair] = {
            k: m[k]
            for k in ("text_controllability", "colour_accuracy", "shape_accuracy", "reference_fidelity")
        }
    print(json.dumps(row), flush=True)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    before = a.output.read_text() if a.output.exists() else ""
    tmp = a.output.with_name(a.output.name + ".tmp")
    tmp.write_text(before + json.dumps(row) + "\n")
    tmp.replace(a.output)  # one more row, never a half-written file
    return 0


if __name__ == "__main__":
    sys.exit(main())
