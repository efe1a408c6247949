"""anomalib's ``Draem`` trained on the demo's toy set: stock (Perlin) vs AnomalyXFusion anomalies vs a 50/50
mix, plus ASBench's ratio rows, over several demo seeds; anomalib's metrics on the real evaluation fold.

Reads what ``python -m axf_pipeline.demo --seed N --output_dir DIR`` leaves in each DIR: the toy MVTec Caption
export (``mvtec_caption/``), the held-out normals (``toy/held_out/``, added to the test set as in the demo's
own downstream table) and the anomalies the demo synthesised (``downstream/<run>/synthesized/mvtec``).
Writes ``results.md``, ``results.json`` and ``maps_seed<N>.png`` under ``--output`` after every seed, so a
cut-short run keeps its rows.

    nice -n 19 python benchmarks/bench_anomalib_draem.py outputs/demo_seeds/seed0 outputs/demo_seeds/seed1 \\
        outputs/demo_seeds/seed2 --epochs 20 --output benchmarks/results/anomalib_draem
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from axf_pipeline.demo.toy_data import CATEGORY
from axf_pipeline.evaluation.data import RealData, Sample
from axf_pipeline.integrations.anomalib import load_synthetic
from axf_pipeline.integrations.anomalib_evaluate import (
    METRICS,
    STOCK,
    DraemBudget,
    evaluate_draem,
    mean_std,
    public,
    table,
    write_maps_picture,
)
from axf_pipeline.synthesis.core import atomic_write

NAME = "AnomalyXFusion"
MIX = f"{NAME} 50/50 Perlin"
TARGET_AP_GAIN = 10.0  # pixel AP points over stock Draem (issue 19)


def demo_seed(folder: Path) -> int:
    match = re.search(r"(\d+)$", folder.name)
    if not match:
        raise SystemExit(f"{folder}: name the folder seed<N> so the seed is known")
    return int(match.group(1))


def synthesized(folder: Path, run: str | None) -> tuple[str, Path]:
    runs = sorted(p.parent.name for p in (folder / "downstream").glob("*/synthesized"))
    if not runs:
        raise SystemExit(
            f"{folder}: no downstream/<run>/synthesized (the demo's downstream stage has not run)"
        )
    if run is None and len(runs) > 1:
        raise SystemExit(f"{folder}: several downstream runs {runs}; pick one with --run")
    run = run or runs[0]
    return run, folder / "downstream" / run / "synthesized"


def summary(per_seed: dict) -> list[str]:
    """mean ± std over seeds of every metric, then the pixel-AP gain over stock per seed."""
    rows = list(next(iter(per_seed.values())))
    lines = [
        f"Mean ± std over {len(per_seed)} seed(s) ({', '.join(map(str, per_seed))}); anomalib metrics in %.",
        "",
        "| Draem trained on normals + | " + " | ".join(METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for row in rows:
        cells = []
        for m in METRICS:
            values = [r[row]["metrics"][m] for r in per_seed.values() if m in r[row]["metrics"]]
            cells.append(mean_std(values) if values else "n/a")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    gains = {
        s: 100 * (r[NAME]["metrics"]["pixel_AUPR"] - r[STOCK]["metrics"]["pixel_AUPR"])
        for s, r in per_seed.items()
    }
    mix = {
        s: 100 * (r[MIX]["metrics"]["pixel_AUPR"] - r[STOCK]["metrics"]["pixel_AUPR"])
        for s, r in per_seed.items()
    }
    mean = statistics.fmean(gains.values())
    lines += [
        "",
        f"Pixel AP gain of {NAME} over stock Draem: {_points(list(gains.values()))} points "
        f"(per seed: {', '.join(f'seed {s}: {g:+.1f}' for s, g in gains.items())}); "
        f"target ≥ {TARGET_AP_GAIN:.0f}: {'met' if mean >= TARGET_AP_GAIN else 'NOT met'}.",
        f"Pixel AP gain of the 50/50 mix over stock: {_points(list(mix.values()))} points.",
    ]
    return lines


def _points(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.1f} ± {std:.1f}"


def write(output: Path, per_seed: dict, reports: dict, settings: dict, command: str) -> None:
    lines = [
        "# anomalib Draem on the demo's toy set: stock vs AnomalyXFusion anomalies",
        "",
        "```",
        command,
        "```",
        "",
        f"anomalib {settings['anomalib_version']}, {settings['accelerator']}; image size {settings['image_size']}, "
        f"{settings['epochs']} epochs, batch size {settings['batch_size']}, anomaly probability "
        f"{settings['probability']}; the same seed for every row of a demo seed. Test set: the real evaluation "
        "fold, the good test images and the held-out normals. Stock Draem uses anomalib's Perlin generator with "
        "Perlin-noise textures (DTD is not downloaded offline). Ratio rows (ASBench): the real generator-fold "
        "anomalies alone, then with k× as many synthetic ones, capped at what the demo synthesised.",
        "",
        *summary(per_seed),
        "",
    ]
    for seed, rows in per_seed.items():
        lines += [
            f"## seed {seed} ({reports[seed]['run']}, {reports[seed]['seconds']:.0f} s)",
            "",
            *table(rows),
            "",
        ]
    for name, text in (
        ("results.md", "\n".join(lines) + "\n"),
        ("results.json", json.dumps({"command": command, "settings": settings, "seeds": reports}, indent=2)),
    ):
        atomic_write(output / name, lambda tmp, text=text: tmp.write_text(text))


def previous(path: Path, args) -> dict:
    """Seeds an earlier call measured with this budget (results.json), so seeds can be added one by one."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    same = {"image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
            "ratios": list(args.ratios), "accelerator": args.accelerator}  # fmt: skip
    if any(old["settings"].get(k) != v for k, v in same.items()):
        return {}
    return old["seeds"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demo_dirs", nargs="+", type=Path, help="demo output folders named seed<N>")
    p.add_argument("--run", default=None, help="downstream/<run> to read (default: the only one)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratios", type=int, nargs="*", default=[1, 4, 16], help="ratio rows; none: skip them")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/anomalib_draem"))
    p.add_argument("--work", type=Path, default=Path("outputs/bench_anomalib_draem"), help="runs, real tree")
    args = p.parse_args(argv)
    command = "python benchmarks/bench_anomalib_draem.py " + " ".join(
        [
            *(f"<demo>/{d.name}" for d in args.demo_dirs),
            *(argv if argv is not None else sys.argv[1:])[len(args.demo_dirs) :],
        ]
    )
    per_seed, reports = {}, {}
    settings = None
    done = previous(args.output / "results.json", args)
    for folder in args.demo_dirs:
        seed = demo_seed(folder)
        run, synthetic = synthesized(folder, args.run)
        budget = DraemBudget(
            image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
            ratios=tuple(args.ratios), accelerator=args.accelerator,
        )  # fmt: skip
        if str(seed) in done:  # measured by an earlier call with the same budget: keep it
            reports[seed] = done[str(seed)]
            per_seed[seed] = reports[seed]["results"][NAME][CATEGORY]
            settings = {**reports[seed]["settings"], "anomalib_version": reports[seed]["anomalib_version"]}
            continue
        real = RealData(str(folder / "mvtec_caption"), "ad")
        held_out = [
            Sample(str(p), None, CATEGORY, "good", f"held_out/{p.name}")
            for p in sorted((folder / "toy" / "held_out").glob("*.png"))
        ]
        pool = load_synthetic(synthetic, CATEGORY, model=f"demo {run}", seed=seed)
        started = time.perf_counter()
        report = evaluate_draem(
            real, {NAME: {CATEGORY: pool}}, args.work / f"seed{seed}", budget, [CATEGORY],
            extra_normals={CATEGORY: held_out}, ratios=bool(args.ratios),
        )  # fmt: skip
        rows = report["results"][NAME][CATEGORY]
        write_maps_picture(rows, [STOCK, NAME, MIX], args.output / f"maps_seed{seed}.png")
        per_seed[seed] = rows
        reports[seed] = {"run": run, "seconds": time.perf_counter() - started, **public(report)}
        settings = {**report["settings"], "anomalib_version": report["anomalib_version"]}
        write(args.output, per_seed, reports, settings, command)
        print(f"seed {seed} done: {args.output / 'results.md'}", flush=True)
    print((args.output / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
