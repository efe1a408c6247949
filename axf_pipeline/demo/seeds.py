"""``--seeds``: the whole demo once per seed, then every figure as mean ± std and the worst seed.

A learned figure is a distribution: one seed shows what can happen, several show what does.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

from mvtec_caption._io import atomic_write

from . import downstream as ds

# (label, how to read it from one seed's results; higher is better for all)
FIGURES = {
    "text controllability": lambda r: r["text_controllability"],
    "colour": lambda r: r["colour_accuracy"],
    "shape": lambda r: r["shape_accuracy"],
    "reference fidelity": lambda r: r["reference_fidelity"],
    "fresh split: text controllability": lambda r: r["fresh"]["text_controllability"],
    "fresh split: reference fidelity": lambda r: r["fresh"]["reference_fidelity"],
    "pixel AP, AnomalyXFusion": lambda r: 100 * _detector(r, ds.ROWS[0])["pixel_ap"],
    "pixel AP, Perlin": lambda r: 100 * _detector(r, ds.ROWS[1])["pixel_ap"],
    "pixel AP, AnomalyXFusion − Perlin": lambda r: (
        100 * (_detector(r, ds.ROWS[0])["pixel_ap"] - _detector(r, ds.ROWS[1])["pixel_ap"])
    ),
}


def _detector(result: dict, row: str) -> dict:
    return result["downstream"]["detectors"][row]


def summarise(per_seed: dict[int, dict]) -> dict:
    """{figure: {"per_seed": {seed: value}, "mean", "std", "worst", "worst_seed"}} over the seeds run."""
    out = {}
    for label, read in FIGURES.items():
        values = {seed: float(read(result)) for seed, result in per_seed.items()}
        worst_seed = min(values, key=values.get)
        out[label] = {
            "per_seed": values,
            "mean": statistics.fmean(values.values()),
            "std": statistics.stdev(values.values()) if len(values) > 1 else 0.0,
            "worst": values[worst_seed],
            "worst_seed": worst_seed,
        }
    return out


def summary_table(summary: dict, seeds: list[int], seconds: dict[int, float]) -> list[str]:
    def fmt(label: str, value: float) -> str:
        return f"{value:.1f}" if label.startswith("pixel AP") else f"{value:.3f}"

    head = "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | worst |"
    lines = [head, "|---" * (len(seeds) + 3) + "|"]
    for label, row in summary.items():
        cells = " | ".join(fmt(label, row["per_seed"][s]) for s in seeds)
        lines.append(
            f"| {label} | {cells} | {fmt(label, row['mean'])} ± {fmt(label, row['std'])} | "
            f"{fmt(label, row['worst'])} (seed {row['worst_seed']}) |"
        )
    lines.append("| wall time (s) | " + " | ".join(f"{seconds[s]:.0f}" for s in seeds) + " | | |")
    return lines


def run_seeds(args: argparse.Namespace, run_demo) -> int:
    root = Path(args.output_dir)
    per_seed, seconds = {}, {}
    for seed in args.seeds:
        one = copy.copy(args)
        one.seed, one.seeds, one.output_dir = seed, None, str(root / f"seed{seed}")
        run_demo(one)
        report = json.loads((Path(one.output_dir) / "metrics.json").read_text())
        per_seed[seed], seconds[seed] = report["results"][-1], report["seconds"]
        write_summary(root, per_seed, seconds, args)  # after each seed: a cut-short run keeps its rows
    print("\n".join(summary_table(summarise(per_seed), list(per_seed), seconds)))
    return 0


def write_summary(root: Path, per_seed: dict, seconds: dict, args) -> None:
    summary = summarise(per_seed)
    settings = {k: v for k, v in vars(args).items() if k not in ("output_dir", "seed")}
    payload = {"seeds": list(per_seed), "summary": summary, "seconds": seconds, "settings": settings}
    atomic_write(root / "seeds.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=str)))
    lines = summary_table(summary, list(per_seed), seconds)
    atomic_write(root / "seeds.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
