"""Writing results: one JSON report, Markdown tables laid out like the paper's tables 1–5, PNG plots.

Report structure (``report.json``)::

    {"generators": [...], "categories": [...], "settings": {...},
     "results": {generator: {category: {"inception_score": {...}, "ic_lpips": {...},
                                        "localization": {...}, "classification": {...}}}}}

Percentages in the Markdown tables follow the paper (AUROC/AP/F1/accuracy × 100; IS and IC-LPIPS raw).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mvtec_caption._io import atomic_write

__all__ = ["METRIC_ROWS", "check_output", "markdown_tables", "write_plots", "write_report"]

# (label in tables, section, key, scale)
METRIC_ROWS = [
    ("IS", "inception_score", "mean", 1),
    ("IL", "ic_lpips", "score", 1),
    ("AUC-P", "localization", "pixel_auroc", 100),
    ("AP-P", "localization", "pixel_ap", 100),
    ("F1-P", "localization", "pixel_f1_max", 100),
    ("AUC-I", "localization", "image_auroc", 100),
    ("AP-I", "localization", "image_ap", 100),
    ("F1-I", "localization", "image_f1_max", 100),
    ("Acc", "classification", "accuracy", 100),
]


def _value(results: dict, generator: str, category: str, section: str, key: str):
    entry = results.get(generator, {}).get(category, {}).get(section)
    return None if entry is None else entry.get(key)


def _fmt(value, scale) -> str:
    if value is None:
        return "–"
    return f"{value * scale:.2f}" if scale != 1 else f"{value:.3f}"


def markdown_tables(report: dict) -> str:
    """Paper-style tables (rows: generator × metric, columns: categories + Mean), then one per category."""
    gens, cats, results = report["generators"], report["categories"], report["results"]
    lines = ["# Evaluation report", ""]
    not_real = [
        f"{g}/{c}/{s}"
        for g in gens
        for c in cats
        for s, v in results.get(g, {}).get(c, {}).items()
        if isinstance(v, dict) and v.get("real_score") is False
    ]
    if not_real:
        lines += [f"> **NOT REAL SCORES** (random backbone or injected distance): {', '.join(not_real)}", ""]
    for title, sections in (
        ("Generation (paper tables 1–2)", ("inception_score", "ic_lpips")),
        ("Localisation and detection (paper table 3)", ("localization",)),
        ("Classification accuracy (paper tables 4–5)", ("classification",)),
    ):
        rows = [r for r in METRIC_ROWS if r[1] in sections]
        body = []
        for label, section, key, scale in rows:
            for g in gens:
                values = [_value(results, g, c, section, key) for c in cats]
                if all(v is None for v in values):
                    continue
                present = [v for v in values if v is not None]
                body.append(
                    f"| {g}, {label} | "
                    + " | ".join(_fmt(v, scale) for v in values)
                    + f" | {_fmt(float(np.mean(present)), scale)} |"
                )
        if body:
            lines += [f"## {title}", "", "| Category | " + " | ".join(cats) + " | Mean |"]
            lines += ["|---" * (len(cats) + 2) + "|", *body, ""]
    for c in cats:
        labels = [r for r in METRIC_ROWS if any(_value(results, g, c, r[1], r[2]) is not None for g in gens)]
        if not labels:
            continue
        lines += [f"## {c}", "", "| Generator | " + " | ".join(r[0] for r in labels) + " |"]
        lines.append("|---" * (len(labels) + 1) + "|")
        for g in gens:
            cells = [_fmt(_value(results, g, c, r[1], r[2]), r[3]) for r in labels]
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_plots(report: dict, curves: dict, output: Path) -> list[Path]:
    """PR and ROC curves per category (pixel and image level, one line per generator) and metric bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    written = []
    for category, by_gen in curves.items():
        fig, axes = plt.subplots(2, 2, figsize=(10, 9))
        for g, levels in by_gen.items():
            for row, level in enumerate(("pixel", "image")):
                counts = levels[level]
                fpr, tpr, _ = counts.roc_curve()
                precision, recall, _ = counts.pr_curve()
                axes[row, 0].plot(fpr, tpr, label=g)
                axes[row, 1].plot(recall, precision, label=g)
        for row, level in enumerate(("pixel", "image")):
            axes[row, 0].set(
                title=f"{category}: {level} ROC", xlabel="false positive rate", ylabel="true positive rate"
            )
            axes[row, 1].set(
                title=f"{category}: {level} precision-recall", xlabel="recall", ylabel="precision"
            )
            for ax in axes[row]:
                ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        path = output / f"curves_{category}.png"
        atomic_write(path, lambda p, fig=fig: fig.savefig(p, dpi=80, format="png"), durable=True)
        plt.close(fig)
        written.append(path)
    gens, cats, results = report["generators"], report["categories"], report["results"]
    for label, section, key, scale in METRIC_ROWS:
        table = np.array(
            [
                [np.nan if (v := _value(results, g, c, section, key)) is None else v * scale for c in cats]
                for g in gens
            ]
        )
        if np.isnan(table).all():
            continue
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(cats) * len(gens) ** 0.5), 3.5))
        width = 0.8 / len(gens)
        for i, g in enumerate(gens):
            ax.bar(np.arange(len(cats)) + i * width, np.nan_to_num(table[i]), width, label=g)
        ax.set_xticks(np.arange(len(cats)) + 0.4 - width / 2, cats, rotation=30, ha="right")
        ax.set(title=label, ylabel=label)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = output / f"bars_{label.replace('-', '_').lower()}.png"
        atomic_write(path, lambda p, fig=fig: fig.savefig(p, dpi=80, format="png"), durable=True)
        plt.close(fig)
        written.append(path)
    return written


def check_output(output: str | Path) -> None:
    """Before any work: ``output`` must be (or be creatable as) a folder where the report's files can go."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a file; give a folder for the report")
    for name, folder in (("report.json", False), ("report.md", False), ("plots", True)):
        if (output / name).exists() and (output / name).is_dir() != folder:
            kind = "a folder" if folder else "a file"
            raise ValueError(
                f"--output {str(output)!r}: {name} is in the way (the report writes {kind} there)"
            )
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--output {str(output)!r}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output {str(output)!r}: {existing} is not writable")


def write_report(report: dict, curves: dict, output: str | Path) -> dict[str, Path]:
    """Write the PNG plots, ``report.md`` and last ``report.json`` under ``output``, each atomically.

    Only these files are written (replaced if present); nothing else in ``output`` is touched.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report, curves, output / "plots")
    atomic_write(output / "report.md", lambda p: p.write_text(markdown_tables(report)), durable=True)
    atomic_write(
        output / "report.json",
        lambda p: p.write_text(json.dumps(report, indent=2, default=float)),
        durable=True,
    )
    return {"json": output / "report.json", "markdown": output / "report.md", "plots": plots}
