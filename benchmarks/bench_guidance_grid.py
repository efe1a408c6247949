"""Text and reference guidance scales, measured on the demo's VALIDATION split, and the choice made on it.

For each trained demo model (a demo output folder: ``toy/validation/`` normals, ``mvtec_caption/``, and the
pipeline under ``runs/``), every pair of scales on the grid synthesises, on the validation normals with
their own masks, the demo's two measurements: text controllability (caption + a reference of another colour
and shape) and reference fidelity (empty caption + a reference). The pair with the best mean over models of
``min(text controllability, reference fidelity)`` (neither bought by giving up the other) is the choice;
ties go to the cheaper, plain-CFG pair (equal scales: two UNet passes instead of three). Nothing here reads
the held-out normals the demo reports on, nor the fresh split.

    python benchmarks/bench_guidance_grid.py --runs outputs/tune/seed100 outputs/tune/seed101 \\
        --output benchmarks/results/guidance_grid
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axf_pipeline.demo import run as demo  # noqa: E402

VALIDATION_SEED_OFFSET = 20_000  # masks and references of the validation jobs: not the test or fresh seeds


def pipeline_dir(run: Path) -> Path:
    found = sorted(p.parent for p in (run / "runs").glob("*/model_index.json"))
    if len(found) != 1:
        raise SystemExit(f"{run}: expected one trained pipeline under runs/, found {len(found)}")
    return found[0]


def measure_grid(run: Path, grid: list[tuple[float, float]], args) -> dict:
    from axf_pipeline import AnomalyXFusionPipeline
    from mvtec_caption._io import load_source

    pipe = AnomalyXFusionPipeline.from_pretrained(pipeline_dir(run))
    dataset = load_source(str(run / "mvtec_caption"), "ad")
    normals = demo.normals_of(sorted((run / "toy" / "validation").glob("*.png")))
    if not normals:
        raise SystemExit(f"{run}: no validation normals in toy/validation/")
    seed = (
        int(json.loads((run / "metrics.json").read_text())["settings"]["seed"])
        if (run / "metrics.json").exists()
        else 0
    )
    out = {}
    for text_scale, reference_scale in grid:
        one = argparse.Namespace(size=args.size, inference_steps=args.steps, synthesis_batch=32,
                                 guidance_scale=text_scale, reference_guidance_scale=reference_scale)  # fmt: skip
        started = time.perf_counter()
        result, jobs = demo.measure_split(pipe, normals, dataset, seed + VALIDATION_SEED_OFFSET, one)
        out[f"{text_scale}/{reference_scale}"] = {
            "text_controllability": result["text_controllability"],
            "reference_fidelity": result["reference_fidelity"],
            "seconds": time.perf_counter() - started,
            "example": jobs[0]["generated"],
        }
        print(f"{run.name} text {text_scale} reference {reference_scale}: "
              f"text {result['text_controllability']:.3f} reference {result['reference_fidelity']:.3f}", flush=True)  # fmt: skip
    return out


def choose(per_run: dict, grid: list[tuple[float, float]]) -> tuple[str, dict]:
    score = {}
    for t, r in grid:
        key = f"{t}/{r}"
        score[key] = statistics.fmean(
            min(m[key]["text_controllability"], m[key]["reference_fidelity"]) for m in per_run.values()
        )
    best = max(score.values())
    ties = [f"{t}/{r}" for t, r in grid if score[f"{t}/{r}"] >= best - 1e-9]
    plain = [k for k in ties if k.split("/")[0] == k.split("/")[1]]
    return (plain or ties)[0], score


def picture(per_run: dict, grid, path: Path, scale: int = 3) -> None:
    """One validation job (same normal, mask, caption, reference) across the grid, one row per model."""
    texts = sorted({t for t, _ in grid})
    refs = sorted({r for _, r in grid})
    cell = 32 * scale
    img = Image.new("RGB", (cell * len(refs) + 60, (cell * len(texts) + 16) * len(per_run)), "white")
    draw = ImageDraw.Draw(img)
    for k, (name, measured) in enumerate(per_run.items()):
        y0 = k * (cell * len(texts) + 16)
        draw.text(
            (2, y0 + 2), f"{name}: rows text scale {texts}, columns reference scale {refs}", fill="black"
        )
        for i, t in enumerate(texts):
            for j, r in enumerate(refs):
                example = measured[f"{t}/{r}"]["example"]
                img.paste(
                    Image.fromarray(example).resize((cell, cell), Image.NEAREST),
                    (60 + j * cell, y0 + 16 + i * cell),
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--runs", nargs="+", type=Path, required=True, help="demo output folders (one per training seed)"
    )
    p.add_argument("--text", nargs="+", type=float, default=[2.0, 4.0, 7.0], help="text guidance scales")
    p.add_argument(
        "--reference", nargs="+", type=float, default=[2.0, 4.0, 7.0], help="reference guidance scales"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/guidance_grid"))
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    grid = list(itertools.product(args.text, args.reference))
    per_run = {run.name: measure_grid(run, grid, args) for run in args.runs}
    chosen, score = choose(per_run, grid)
    lines = [
        f"Validation split only ({', '.join(per_run)}): text controllability / reference fidelity, "
        "mean over models; rows: text scale, columns: reference scale.",
        "",
        "| text \\ reference | " + " | ".join(str(r) for r in args.reference) + " |",
        "|---" * (len(args.reference) + 1) + "|",
    ]
    for t in args.text:
        cells = []
        for r in args.reference:
            key = f"{t}/{r}"
            tc = statistics.fmean(m[key]["text_controllability"] for m in per_run.values())
            rf = statistics.fmean(m[key]["reference_fidelity"] for m in per_run.values())
            cells.append(f"{tc:.3f} / {rf:.3f}" + (" **chosen**" if key == chosen else ""))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", f"Chosen (max mean of min(text, reference); ties to equal scales): text {chosen.split('/')[0]}, "
              f"reference {chosen.split('/')[1]}"]  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    raw = {
        run: {k: {kk: vv for kk, vv in v.items() if kk != "example"} for k, v in m.items()}
        for run, m in per_run.items()
    }
    report = json.dumps(
        {"runs": [str(r) for r in args.runs], "per_run": raw, "score": score, "chosen": chosen}, indent=2
    )
    for name, text in (("grid.json", report), ("grid.md", "\n".join(lines) + "\n")):
        tmp = args.output / f".{name}.tmp"  # every output under a temporary name, then renamed into place
        tmp.write_text(text)
        tmp.replace(args.output / name)
    picture(per_run, grid, args.output / ".grid.tmp.png")
    (args.output / ".grid.tmp.png").replace(args.output / "grid.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
