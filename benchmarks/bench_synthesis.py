"""`axf synthesize` throughput vs a plain loop of pipeline calls, and the mask sampler's rate, in one run.

1. Synthesis: the core's ``run_items`` (loading each normal and reference from the dataset, estimating
   the foreground, sampling the mask, one pipeline call per batch, atomic PNG writes) against a plain
   loop calling the same pipeline on the same, already loaded inputs with the same batch size.
   Target: ratio (synthesize images/s / loop images/s) >= 0.95. Runs alternate; medians are reported.
   Also reported: the share of each synthesize run spent outside its pipeline calls, measured inside the
   same run (immune to load drifting between runs on a shared machine). Target: <= 5 %.
2. Mask sampler at 256 x 256 on one core (foreground computed once per normal, as synthesis does).
   Target: >= 1,000 masks/s.

Tiny components (no download), a small MVTec-shaped sample export built on the fly.

    python benchmarks/bench_synthesis.py [--size 64] [--steps 4] [--batch-size 4] [--num 8] [--repeats 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _setup(root: Path, size: int):
    from axf_pipeline import AnomalyXFusionPipeline
    from axf_pipeline.tiny import build_tiny_components
    from mvtec_caption import export_dataset, make_sample_tree

    tree = make_sample_tree(
        root / "raw", "ad", categories=["bottle"], scale=size / 900, n_train=5, captions_path=root / "c.json"
    )
    export_dataset("ad", tree.root, root / "export", tree.captions_path, cache_dir=root / "cache")
    components = build_tiny_components(
        sample_size=size, cross_attention_dim=64, block_out_channels=(64, 128, 128),
        vae_block_out_channels=(16, 32, 32), num_tokens=4,
    )  # fmt: skip
    AnomalyXFusionPipeline(**components).save_pretrained(root / "model")


def bench_synthesis(args, root: Path) -> dict:
    from axf_pipeline.synthesis.core import call_pipeline, load_pipeline, plan_batches, run_items
    from axf_pipeline.synthesis.plan import plan_items, select
    from axf_pipeline.synthesis.source import SourceData

    source = SourceData(str(root / "export"), "ad")
    pairs = select(source, None, None)
    items = plan_items(source, pairs, args.num, seed=0, model=str(root / "model"))
    pipe = load_pipeline(str(root / "model"))
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, padding_mask_crop=None)
    batches = plan_batches(items, args.batch_size)
    prepared = {i: items[i].prepare() for b in batches for i in b}  # the loop's inputs, loaded up front

    def plain_loop() -> float:
        start = time.perf_counter()
        for batch in batches:
            call_pipeline(pipe, [prepared[i] for i in batch], [items[i] for i in batch], kwargs)
        return len(items) / (time.perf_counter() - start)

    from axf_pipeline.synthesis import core

    in_pipeline = []

    def timed_call(*a, **k):  # the core's own pipeline calls, timed: the rest is orchestration
        start = time.perf_counter()
        result = call_pipeline(*a, **k)
        in_pipeline[-1] += time.perf_counter() - start
        return result

    def synthesize(run: int) -> float:
        out = root / f"out-{run}"
        in_pipeline.append(0.0)
        core.call_pipeline = timed_call
        try:
            summary = run_items(pipe, items, out, args.batch_size, kwargs, progress=False)
        finally:
            core.call_pipeline = call_pipeline
        shutil.rmtree(out)
        in_pipeline[-1] = 1 - in_pipeline[-1] / summary.seconds  # orchestration share of this run
        return summary.images_per_second

    plain_loop()  # warm-up (first calls allocate)
    ours, loop = [], []
    for run in range(args.repeats):  # alternating order, so drifting machine load hits both alike
        if run % 2:
            loop.append(plain_loop())
            ours.append(synthesize(run))
        else:
            ours.append(synthesize(run))
            loop.append(plain_loop())
    ratio = statistics.median(ours) / statistics.median(loop)
    return {"synthesize_images_per_s": statistics.median(ours), "loop_images_per_s": statistics.median(loop),
            "ratio": ratio, "items": len(items), "batches": len(batches),
            "orchestration_share": statistics.median(in_pipeline)}  # fmt: skip


def bench_masks(seconds: float = 3.0) -> dict:
    from axf_pipeline.synthesis.masks import MaskSampler, estimate_foreground

    side = 256
    rng = np.random.default_rng(0)
    reals = []
    for _ in range(4):  # scratch- and blob-like real masks
        m = np.zeros((side, side), bool)
        y, x = rng.integers(40, 200, 2)
        h, w = rng.integers(8, 50, 2)
        m[y : y + h, x : x + w] = True
        reals.append(m)
    normals = []
    for i in range(8):
        image = rng.integers(0, 20, (side, side, 3)).astype(np.uint8)
        image[30 + i : 220, 40 : 230 - i] = 170
        normals.append(image)
    start = time.perf_counter()
    foregrounds = [estimate_foreground(n) for n in normals]
    fg_ms = (time.perf_counter() - start) / len(normals) * 1000
    sampler = MaskSampler(reals)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler.sample(rng, (side, side), foregrounds[n % len(foregrounds)])
        n += 1
    return {"masks_per_s": n / (time.perf_counter() - start), "foreground_ms_per_normal": fg_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num", type=int, default=8, help="anomalies per defect type (bottle: 2 types)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: one core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    masks = bench_masks()
    print(f"mask sampler, 256x256, one core: {masks['masks_per_s']:.0f} masks/s (target >= 1000); "
          f"foreground estimate {masks['foreground_ms_per_normal']:.2f} ms per normal")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-synthesis-") as tmp:
        root = Path(tmp)
        _setup(root, args.size)
        result = bench_synthesis(args, root)
    print(
        f"synthesis, {result['items']} items in {result['batches']} batches of <= {args.batch_size}, "
        f"{args.size} px, {args.steps} steps: axf synthesize {result['synthesize_images_per_s']:.2f} images/s, "
        f"plain pipeline loop {result['loop_images_per_s']:.2f} images/s, "
        f"ratio {result['ratio']:.3f} (target >= 0.95); inside the same runs, time outside pipeline calls "
        f"(loading, mask sampling, writing): {100 * result['orchestration_share']:.1f} % (target <= 5 %)"
    )


if __name__ == "__main__":
    main()
