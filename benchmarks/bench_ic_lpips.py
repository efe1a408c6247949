"""IC-LPIPS with each image's VGG features computed once vs LPIPS run on every pair (the backbone twice per
pair, as ``lpips.LPIPS(a, b)`` does), on the same images and the same VGG; checks the values agree to 1e-6.

Target: ≥ 2× faster. A random VGG-16 backbone (no download) costs what the real one costs.

    python benchmarks/bench_ic_lpips.py [--generated 10] [--centres 2] [--resolution 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from _timing import alternate, report

from axf_pipeline.evaluation import build_lpips, ic_lpips


class PerPair:
    """The LPIPS model as an opaque ``distance(a, b)``: ic_lpips then runs it per pair (the old cost)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, a, b):
        return self.model(a, b)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generated", type=int, default=10, help="generated images (one defect type)")
    p.add_argument("--centres", type=int, default=2, help="real anomalies (cluster centres)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = build_lpips("vgg", random_backbone=True)
    rng = np.random.default_rng(0)
    size = args.resolution
    centres = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.centres)]
    generated = [
        np.clip(centres[i % args.centres] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        for i in range(args.generated)
    ]
    kw = dict(progress=False, resolution=size, max_cluster_size=None)
    results = {}

    def run(name, distance):
        def call():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "NOT A REAL SCORE": random backbone, on purpose
                results[name] = ic_lpips(generated, centres, distance=distance, **kw)

        return call

    with warnings.catch_warnings():  # warm-up: first-call costs on neither side
        warnings.simplefilter("ignore")
        ic_lpips(generated[:2], centres[:1], distance=model, **kw)
    times = alternate(
        {"features once": run("features once", model), "per pair": run("per pair", PerPair(model))},
        repeats=args.repeats,
        warmup=0,
    )
    a, b = results["features once"], results["per pair"]
    diff = max(
        abs(x["score"] - y["score"])
        for x, y in zip(a.clusters["all"], b.clusters["all"], strict=True)
        if x["score"] is not None
    )
    sizes = [r["size"] for r in a.clusters["all"]]
    pairs = args.generated * args.centres + sum(n * (n - 1) // 2 for n in sizes)
    print(
        f"{args.generated} generated, {args.centres} centres at {size} px (cluster sizes {sizes}, {pairs} pairs), "
        f"torch threads {torch.get_num_threads()}"
    )
    out = report(times, "per pair", "features once", target=2.0, at_most=False)  # the speed-up
    print(f"largest cluster-score difference {diff:.2e} (target <= 1e-6)")
    assert diff <= 1e-6, diff
    return {**out, "max_abs_diff": diff}


if __name__ == "__main__":
    main()
