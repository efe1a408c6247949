"""Pixel metrics on an MVTec-sized test set: our exact distinct-value reduction vs scikit-learn on raw pixels.

Prints time and peak-memory (tracemalloc) ratios measured in the same run; both give identical numbers.
Usage: python benchmarks/bench_evaluation_localization.py [n_images] [side] [levels]
(levels=0: continuous float32 scores; N: scores quantised to N+1 values, as uint8 / fp16 maps often are)
"""

import sys
import time
import tracemalloc

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from axf_pipeline.evaluation.localization import CurveCounts, f1_max


def raw_sklearn(maps, masks):
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([m.ravel() for m in masks])
    p, r, _ = precision_recall_curve(labels, scores)
    return roc_auc_score(labels, scores), average_precision_score(labels, scores), f1_max(p, r)


def ours(maps, masks):
    counts = CurveCounts.merge([CurveCounts.from_scores(a, m) for a, m in zip(maps, masks, strict=True)])
    out = counts.metrics()
    return out["auroc"], out["ap"], out["f1_max"]


def measure(fn, *args):
    tracemalloc.start()
    t = time.perf_counter()
    result = fn(*args)
    elapsed = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, elapsed, peak


def main(n_images=100, side=256, levels=255):
    rng = np.random.default_rng(0)
    masks = [np.zeros((side, side), bool) for _ in range(n_images)]
    for m in masks[n_images // 3 :]:
        y, x = rng.integers(0, side - 40, 2)
        m[y : y + 40, x : x + 40] = True
    maps = [(rng.random((side, side)) * 0.7 + 0.3 * m).astype(np.float32) for m in masks]
    if levels:
        maps = [np.round(a * levels) / levels for a in maps]
    ref, t_ref, mem_ref = measure(raw_sklearn, maps, masks)
    res, t_ours, mem_ours = measure(ours, maps, masks)
    assert np.allclose(ref, res, atol=1e-9), (ref, res)
    print(
        f"{n_images} maps of {side}x{side} ({n_images * side * side / 1e6:.1f} M pixels), levels={levels or 'float32'}"
    )
    print(f"time  ratio ours/sklearn-raw: {t_ours / t_ref:.2f}  ({t_ours:.2f}s vs {t_ref:.2f}s)")
    print(
        f"peak memory ratio ours/sklearn-raw: {mem_ours / mem_ref:.2f}  ({mem_ours / 2**20:.0f} MiB vs {mem_ref / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
