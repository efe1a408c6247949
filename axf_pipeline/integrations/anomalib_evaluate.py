"""``axf evaluate --detector anomalib-draem``: what synthetic anomalies are worth to anomalib's own ``Draem``.

For each category, anomalib's ``Draem`` is trained with anomalib's ``Engine`` several ways, with the same
seed, epochs, batch size and image size, and tested on the real test set (good images + the evaluation fold)
with anomalib's metrics (image and pixel AUROC, AUPR, F1Max; pixel AUPRO):

* stock ``Draem`` (its Perlin augmenter; Perlin noise as the texture, since DTD is not downloaded offline),
* the synthetic anomalies (``draem_with_synthetic``), and a 50/50 mix of synthetic and Perlin,
* ASBench's ratio protocol: the real generator-fold anomalies alone (the reference row), then with 1x, 4x,
  16x as many synthetic ones (capped at what the set holds; the count used is reported).

The real data is written once per category as an MVTec AD tree and read by anomalib's ``MVTecAD`` module.
Anomaly maps are scored raw (the post-processor's min-max normalisation is off: its clamp to [0, 1] ties
scores, which moves rank metrics).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback
from PIL import Image

from ..evaluation.data import RealData, Sample
from ..synthesis.core import atomic_write, save_png
from .anomalib import AnomalyPool, draem_with_synthetic, load_synthetic

__all__ = [
    "DraemBudget",
    "MapCollector",
    "draem_evaluator",
    "evaluate_draem",
    "mean_std",
    "public",
    "ratio_rows",
    "run_cli",
    "table",
    "train_and_test_draem",
    "write_maps_picture",
    "write_real_mvtec",
    "write_report",
]

METRICS = (
    "image_AUROC", "image_AUPR", "image_F1Max", "pixel_AUROC", "pixel_AUPR", "pixel_F1Max", "pixel_AUPRO",
)  # fmt: skip
STOCK = "stock Draem (Perlin)"
REAL = "real generator fold"
DEFAULT_RATIOS = (1, 4, 16)


@dataclass
class DraemBudget:
    """One budget for every row: the same seed, epochs, batch size and image size."""

    image_size: int = 256
    epochs: int = 10
    batch_size: int = 8
    seed: int = 0
    probability: float = 0.5
    ratios: tuple[int, ...] = DEFAULT_RATIOS
    progress: bool = False
    accelerator: str = "cpu"  # Lightning's: "cpu", "gpu", "auto"


def draem_evaluator():
    """anomalib's metrics, threshold-free: image and pixel AUROC, AUPR, F1Max, and pixel AUPRO."""
    from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator, F1Max

    image, pixel = ["pred_score", "gt_label"], ["anomaly_map", "gt_mask"]
    metrics = [cls(fields=image, prefix="image_") for cls in (AUROC, AUPR, F1Max)]
    metrics += [cls(fields=pixel, prefix="pixel_", strict=False) for cls in (AUROC, AUPR, F1Max, AUPRO)]
    return Evaluator(test_metrics=metrics)


class MapCollector(Callback):
    """Keeps each test image's anomaly map and truth mask, keyed by image path (for the maps picture)."""

    def __init__(self):
        self.maps: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for i, path in enumerate(outputs.image_path):
            self.maps[str(path)] = outputs.anomaly_map[i].squeeze().float().cpu().numpy()
            if outputs.gt_mask is not None:
                self.masks[str(path)] = outputs.gt_mask[i].squeeze().cpu().numpy().astype(bool)


def _save_png(array: np.ndarray, path: Path) -> None:
    save_png(Image.fromarray(array), path)


def write_real_mvtec(real: RealData, category: str, root: Path, extra_normals: list[Sample] = ()) -> Path:
    """``root/<category>`` in MVTec AD layout: train/good = train normals; test = good test images (plus
    ``extra_normals``) and the evaluation fold only; ground_truth = its masks. The generator fold stays out."""
    cat = Path(root) / category
    if (cat / ".complete").is_file():
        return Path(root)
    for i, s in enumerate(real.normals(category)):
        _save_png(s.load_image(), cat / "train" / "good" / f"{i:03d}.png")
    counts: dict[str, int] = {}
    for s in real.test_set(category) + list(extra_normals):
        i = counts[s.defect_type] = counts.get(s.defect_type, -1) + 1
        _save_png(s.load_image(), cat / "test" / s.defect_type / f"{i:03d}.png")
        if s.is_anomaly:
            mask = s.load_mask().astype(np.uint8) * 255
            _save_png(mask, cat / "ground_truth" / s.defect_type / f"{i:03d}_mask.png")
    (cat / ".complete").write_text("")
    return Path(root)


def _datamodule(root: Path, category: str, budget: DraemBudget):
    from anomalib.data import MVTecAD

    return MVTecAD(
        root=root, category=category, train_batch_size=budget.batch_size, eval_batch_size=budget.batch_size,
        num_workers=0, val_split_mode="same_as_test", seed=budget.seed,
    )  # fmt: skip


def train_and_test_draem(
    pool: AnomalyPool | None,
    real_root: Path,
    category: str,
    work: Path,
    budget: DraemBudget,
    synthetic_fraction: float = 1.0,
) -> dict:
    """One row: ``Draem`` trained (stock when ``pool`` is None) and tested; metrics, record, maps, seconds."""
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.engine import Engine
    from anomalib.models import Draem
    from anomalib.post_processing import PostProcessor
    from lightning.pytorch import seed_everything

    seed_everything(budget.seed, workers=True, verbose=False)
    size = (budget.image_size, budget.image_size)
    components = {
        "pre_processor": Draem.configure_pre_processor(size),
        "post_processor": PostProcessor(enable_normalization=False, enable_thresholding=False),
        "evaluator": draem_evaluator(),
        "visualizer": False,
    }
    if pool is None:
        import tempfile

        with tempfile.TemporaryDirectory() as empty:  # no DTD: Perlin noise, nothing downloaded
            model = Draem(dtd_dir=empty, **components)
        record = {
            "augmenter": "anomalib PerlinAnomalyGenerator (noise texture)",
            "probability": model.augmenter.probability,
            "global_seed": budget.seed,
        }
    else:
        model = draem_with_synthetic(
            pool, category, probability=budget.probability, synthetic_fraction=synthetic_fraction,
            seed=budget.seed, **components,
        )  # fmt: skip
        record = None
    collector = MapCollector()
    engine = Engine(
        max_epochs=budget.epochs, accelerator=budget.accelerator, devices=1, default_root_dir=work, logger=False,
        enable_progress_bar=budget.progress, enable_model_summary=False, limit_val_batches=0,
        callbacks=[collector, ModelCheckpoint(save_top_k=0, save_last=False)],
    )  # fmt: skip
    datamodule = _datamodule(real_root, category, budget)
    started = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    [metrics] = engine.test(model, datamodule=datamodule, verbose=False)
    if record is None:
        record = model.augmenter.record()
    return {
        "metrics": {k: float(metrics[k]) for k in METRICS if k in metrics},
        "record": record,
        "seconds": time.perf_counter() - started,
        "maps": collector.maps,
        "masks": collector.masks,
    }


def ratio_rows(real_pool: AnomalyPool, synthetic: AnomalyPool, name: str, ratios, seed: int) -> dict:
    """ASBench's protocol: the real few-shot anomalies alone, then with ``k`` times as many synthetic ones."""
    rows = {REAL: real_pool}
    for k in ratios:
        wanted = k * len(real_pool)
        part = synthetic.subset(wanted, seed)
        capped = "" if len(part) == wanted else f", capped at {len(part)}"
        rows[f"real + {k}x {name}{capped}"] = real_pool + part
    return rows


def evaluate_draem(
    real: RealData,
    generators: dict,
    output: Path,
    budget: DraemBudget,
    categories: list[str] | None = None,
    extra_normals: dict[str, list[Sample]] | None = None,
    ratios: bool = True,
    log=print,
) -> dict:
    """Every row for every generator and category; returns the report (also written by :func:`write_report`).

    ``generators``: ``{name: axf synthesize output (or dataset, or AnomalyPool per category via a dict)}``.
    Every synthetic set is loaded and checked before the first ``Draem`` trains.
    """
    output = Path(output)
    categories = categories or real.categories
    for category in categories:
        real.test_set(category)  # fails early, naming the category
        n_train = len(real.normals(category))
        if budget.image_size == 32 and n_train % budget.batch_size == 1:
            raise ValueError(
                f"--batch-size {budget.batch_size}: {category!r} has {n_train} train normals, so the last batch "
                "holds one image, which Draem's BatchNorm cannot train on at 32 px; pick another batch size"
            )
    pools = {
        (name, c): source[c] if isinstance(source, dict) else load_synthetic(source, c)
        for name, source in generators.items()
        for c in categories
    }
    report = {"settings": asdict(budget), "anomalib_version": _anomalib_version(), "results": {}}
    for category in categories:
        real_root = write_real_mvtec(
            real, category, output / "work" / "real", (extra_normals or {}).get(category, [])
        )
        stock = None
        for name in generators:
            synthetic = pools[(name, category)]
            runs = {STOCK: (None, 1.0), name: (synthetic, 1.0), f"{name} 50/50 Perlin": (synthetic, 0.5)}
            if ratios:
                centres = real.centres(category)
                real_pool = AnomalyPool(centres, category, {"source": REAL, "n": len(centres)})
                rows = ratio_rows(real_pool, synthetic, name, budget.ratios, budget.seed)
                runs.update({row: (pool, 1.0) for row, pool in rows.items()})
            results = {}
            for row, (pool, fraction) in runs.items():
                if row == STOCK and stock is not None:
                    results[row] = stock
                    continue
                log(f"anomalib Draem, {category}: {row} ...")
                work = output / "work" / "runs" / _slug(f"{name}-{category}-{row}")
                results[row] = train_and_test_draem(pool, real_root, category, work, budget, fraction)
                results[row]["n_anomalies"] = 0 if pool is None else len(pool)
                log(f"  pixel AUPR {results[row]['metrics'].get('pixel_AUPR', float('nan')):.3f}")
                if row == STOCK:
                    stock = results[row]
            report["results"].setdefault(name, {})[category] = results
    return report


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _anomalib_version() -> str:
    import anomalib

    return anomalib.__version__


def public(report: dict) -> dict:
    """The report without maps (arrays) and with no local path: what report.json holds."""
    out = {k: v for k, v in report.items() if k != "results"}
    out["results"] = {
        name: {
            c: {row: {k: v for k, v in r.items() if k not in ("maps", "masks")} for row, r in rows.items()}
            for c, rows in cats.items()
        }
        for name, cats in report["results"].items()
    }
    return out


def table(rows: dict) -> list[str]:
    """Markdown rows of one (generator, category): metrics in percent."""
    lines = [
        "| Draem trained on normals + | anomalies | " + " | ".join(METRICS) + " |",
        "|---|---:|" + "---:|" * len(METRICS),
    ]
    for row, r in rows.items():
        values = [f"{100 * r['metrics'][m]:.1f}" if m in r["metrics"] else "n/a" for m in METRICS]
        n = r.get("n_anomalies", 0)
        lines.append(f"| {row} | {n if n else 'Perlin'} | " + " | ".join(values) + " |")
    return lines


def mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def write_maps_picture(rows: dict, columns: list[str], path: Path, scale: int = 3) -> Path:
    """test image | truth | one map per row in ``columns``: one image per defect type and two normals."""
    from PIL import ImageDraw

    first = rows[columns[0]]
    picked, seen = [], {}
    for image_path in sorted(first["maps"]):
        kind = Path(image_path).parent.name
        if seen.get(kind, 0) < (2 if kind == "good" else 1):
            seen[kind] = seen.get(kind, 0) + 1
            picked.append(image_path)
    size = next(iter(first["maps"].values())).shape[0]
    cell = size * scale
    grid = Image.new("RGB", ((2 + len(columns)) * cell, (len(picked) + 1) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(["image", "truth", *columns]):
        draw.text((c * cell + 2, cell // 3), title[: cell // 6], fill="black")
    for r, image_path in enumerate(picked, start=1):
        image = np.asarray(Image.open(image_path).convert("RGB").resize((size, size), Image.BILINEAR))
        truth = first["masks"].get(image_path, np.zeros((size, size), bool))
        cells = [image, np.repeat((truth * 255).astype(np.uint8)[..., None], 3, 2)]
        for column in columns:
            m = (np.clip(rows[column]["maps"][image_path], 0, 1) * 255).astype(np.uint8)
            cells.append(np.repeat(m[..., None], 3, 2))
        for c, array in enumerate(cells):
            grid.paste(Image.fromarray(array).resize((cell, cell), Image.NEAREST), (c * cell, r * cell))
    save_png(grid, path)
    return path


def write_report(report: dict, output: Path, command: str = "") -> dict:
    """report.json, report.md and one maps picture per (generator, category) under ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    lines = ["# anomalib Draem trained on synthetic anomalies", ""]
    if command:
        lines += ["```", command, "```", ""]
    s = report["settings"]
    lines += [
        f"anomalib {report['anomalib_version']}; image size {s['image_size']}, {s['epochs']} epochs, "
        f"batch size {s['batch_size']}, seed {s['seed']}, anomaly probability {s['probability']}. "
        "Metrics in percent, anomalib's, on the real evaluation fold plus good images.",
        "",
    ]
    pictures = []
    for name, cats in report["results"].items():
        for category, rows in cats.items():
            lines += [f"## {name}, {category}", "", *table(rows), ""]
            columns = [c for c in (STOCK, name, f"{name} 50/50 Perlin") if c in rows]
            pictures.append(write_maps_picture(rows, columns, output / f"maps_{_slug(name)}_{category}.png"))
    paths = {"json": output / "report.json", "markdown": output / "report.md", "maps": pictures}
    for key, text in (("json", json.dumps(public(report), indent=2)), ("markdown", "\n".join(lines) + "\n")):
        atomic_write(paths[key], lambda tmp, text=text: tmp.write_text(text))
    return paths


def run_cli(args) -> int:
    """The ``--detector anomalib-draem`` branch of ``axf evaluate``; bad input: one line, exit code 2."""
    import sys

    from ..evaluation.report import check_output

    try:
        if not args.generated:
            raise ValueError("--detector anomalib-draem needs at least one --generated NAME=PATH")
        if args.resolution % 32 or args.resolution < 32:
            raise ValueError(f"--resolution {args.resolution}: anomalib's Draem needs a multiple of 32")
        for flag in ("epochs", "batch_size"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
        if any(k < 1 for k in args.ratios):
            raise ValueError(f"--ratios must be positive integers, got {args.ratios}")
        check_output(args.output)
        budget = DraemBudget(
            image_size=args.resolution, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
            ratios=tuple(args.ratios), progress=not args.no_progress,
            accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        )  # fmt: skip
        real = RealData(args.real, args.real_config)
        generators = dict(args.generated)
        report = evaluate_draem(real, generators, Path(args.output), budget, args.categories)
    except (ValueError, FileNotFoundError) as err:
        print(f"axf evaluate: error: {err}", file=sys.stderr)
        return 2
    paths = write_report(report, Path(args.output))
    print(
        json.dumps({k: str(v) if not isinstance(v, list) else [str(p) for p in v] for k, v in paths.items()})
    )
    return 0
