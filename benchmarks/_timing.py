"""Shared timing for the benchmarks: alternate the two sides (A B B A …) so drift and other load fall on
both, and report the median and best-of ratio. Also peak memory of this process (RSS, or CUDA allocated)."""

from __future__ import annotations

import os
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


def rss_now() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Starts a new peak of this process's RSS (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS, Linux >= 4.0


def peak_rss() -> int:
    """Bytes of this process's peak RSS since :func:`reset_peak_rss` (or its start)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_memory() -> None:
    """Starts a new peak: CUDA's max allocated when a GPU is in use, else the peak RSS."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def held_memory() -> int:
    """Bytes held now: CUDA allocated on a GPU, else this process's RSS."""
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else rss_now()


def peak_memory() -> int:
    """Bytes at the peak since :func:`reset_peak_memory`: CUDA max allocated on a GPU, else peak RSS."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return peak_rss()
