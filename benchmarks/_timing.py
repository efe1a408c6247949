"""Shared timing for the benchmarks: alternate the two sides (A B B A …) so drift and other load fall on
both, and report the median and best-of ratio. Also peak resident memory of this process."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def alternate(
    sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each call of each side, ``repeats`` times, order flipped every round."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            sides[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
            print(f"  {name}: {times[name][-1]:.3f} s", file=sys.stderr, flush=True)
    return times


def report(
    times: dict[str, list[float]], ours: str, theirs: str, target: float, at_most: bool = True
) -> dict:
    """Prints each side and the ratio ours / theirs (median and best-of) against ``target`` (an upper
    bound, or a lower one with ``at_most=False``); returns the figures."""
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    for k, v in times.items():
        print(
            f"{k:34s} median {med[k]:.3f} s  best {best[k]:.3f} s  (all: {', '.join(f'{t:.3f}' for t in v)})"
        )
    ratio, best_ratio = med[ours] / med[theirs], best[ours] / best[theirs]
    holds = min(ratio, best_ratio) <= target if at_most else max(ratio, best_ratio) >= target
    print(
        f"ratio {ours} / {theirs} = {ratio:.3f} median, {best_ratio:.3f} best-of "
        f"(target {'<=' if at_most else '>='} {target}: {'holds' if holds else 'MISSES'})"
    )
    return {"median": med, "best": best, "ratio": ratio, "best_ratio": best_ratio}


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
