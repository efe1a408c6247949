"""The paper's downstream protocol on the toy set: are the synthesised anomalies worth more to a detector
than the classical Perlin ones?

1. ``axf synthesize``'s core makes N anomalies per toy defect type (new masks sampled from the generator
   fold's masks; captions and references from the generator fold only; bases are train normals);
2. the evaluation harness's DRAEM-style discriminative U-Net is trained three times, same seed, same
   number of anomalies and epochs: on AnomalyXFusion anomalies, on Perlin anomalies (the shipped
   baseline), and on the real generator-fold anomalies themselves (repeated to N per type: the few-shot
   reference point);
3. each is tested on the held-out real evaluation fold plus normals no model has seen, with the
   package's exact :func:`localization_metrics`;
4. a table, the PR curves and a picture (image | truth | the three maps) are written.

What the toy can show: whether anomalies made from a few real ones teach a detector more than generic
Perlin blends. What it cannot: the toy's truth masks are the whole square around a painted spot or
scratch, so the real-fold detector learns that labelling convention exactly (pixel AP near 100), while
synthesised defects, painted inside sampled squares, teach the defect's own outline; and the toy's
defects are saturated colours on grey, far easier than MVTec's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mvtec_caption._io import atomic_write

from .toy_data import CATEGORY

ROWS = ("AnomalyXFusion", "Perlin (DRAEM)", "real generator fold")


@dataclass
class DetectorBudget:
    """One budget for every detector: the same seed, epochs, size and number of anomalies."""

    per_defect_type: int = 16
    epochs: int = 30
    batch_size: int = 16
    base_channels: int = 16
    depth: int = 4
    lr: float = 1e-3
    seed: int = 0


def real_splits(export: Path, held_out_normals: list[Path]):
    """(train normals, generator-fold anomalies, test set): the test set is the real evaluation fold plus
    the good test images and the held-out normals (never seen by the generator or a detector)."""
    from ..evaluation.data import RealData, Sample

    real = RealData(str(export), "ad")
    test = real.test_set(CATEGORY) + [
        Sample(str(p), None, CATEGORY, "good", f"held_out/{p.name}") for p in held_out_normals
    ]
    return real.normals(CATEGORY), real.centres(CATEGORY), test


def synthesise_anomalies(
    pipe,
    export: Path,
    out: Path,
    n: int,
    steps: int,
    guidance: float,
    batch: int,
    seed: int,
    reference_guidance: float | None = None,
):
    """N anomalies per defect type with ``axf synthesize``'s planning and core; returns evaluation Samples."""
    from ..evaluation.data import Sample
    from ..image_processing import DEFAULT_PADDING_MASK_CROP
    from ..synthesis.core import run_items
    from ..synthesis.plan import plan_items, select
    from ..synthesis.source import SourceData

    source = SourceData(str(export), "ad")
    items = plan_items(source, select(source, None, None), n, seed, model="demo")
    call = {
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "reference_guidance_scale": reference_guidance,
        "padding_mask_crop": DEFAULT_PADDING_MASK_CROP,  # as `axf synthesize` by default
    }
    run_items(pipe, items, out, batch, call)
    return [
        Sample(
            str(out / it.image_path),
            str(out / it.mask_path),
            it.record["category"],
            it.record["defect_type"],
            it.image_path,
        )
        for it in items
    ]


def repeat_per_type(samples, n: int):
    """The few-shot anomalies cycled to ``n`` per defect type, so every detector sees as many anomalies."""
    from ..evaluation.data import group_by

    return [group[k % len(group)] for group in group_by(samples, "defect_type").values() for k in range(n)]


def train_and_test(normals, anomalies, test, size: int, budget: DetectorBudget):
    """One detector: trained on normals + ``anomalies``, scored on ``test``; (result, maps)."""
    from ..evaluation.downstream import predict_maps, train_localization
    from ..evaluation.localization import localization_metrics

    model = train_localization(
        normals, anomalies, resolution=size, epochs=budget.epochs, batch_size=budget.batch_size,
        lr=budget.lr, base_channels=budget.base_channels, depth=budget.depth, seed=budget.seed, progress=False,
    )  # fmt: skip
    maps, masks = predict_maps(model, test, resolution=size)
    return localization_metrics(maps, masks), maps, masks


def run_downstream(pipe, export: Path, toy, work: Path, args, budget: DetectorBudget, baselines=None):
    """Rows for ``ROWS``; ``baselines`` (a previous call's Perlin and real-fold rows) are reused, since
    they do not depend on the generator. Returns ``(rows, timings)``, rows keyed by name."""
    from ..evaluation.baselines import perlin_anomalies

    timings = {}
    normals, generator_fold, test = real_splits(export, toy.held_out_normals)
    started = time.perf_counter()
    synthetic = synthesise_anomalies(
        pipe, export, work / "synthesized", budget.per_defect_type, args.inference_steps,
        args.guidance_scale, args.synthesis_batch, budget.seed, args.reference_guidance_scale,
    )  # fmt: skip
    timings["downstream synthesis"] = time.perf_counter() - started
    sets = {ROWS[0]: synthetic}
    if baselines is None:
        sets[ROWS[1]] = perlin_anomalies(
            normals,
            generator_fold,
            per_defect_type=budget.per_defect_type,
            resolution=args.size,
            seed=budget.seed,
        )
        sets[ROWS[2]] = repeat_per_type(generator_fold, budget.per_defect_type)
    rows = dict(baselines or {})
    started = time.perf_counter()
    for name, anomalies in sets.items():
        result, maps, masks = train_and_test(normals, anomalies, test, args.size, budget)
        rows[name] = {"result": result, "maps": maps, "masks": masks, "n_anomalies": len(anomalies)}
    timings["detector training + test"] = time.perf_counter() - started
    rows = {name: rows[name] for name in ROWS}
    rows["_test"] = test
    return rows, timings


def table(rows: dict) -> list[str]:
    lines = [
        "| detector trained on normals + | pixel AUROC | pixel AP | pixel F1-max | image AUROC | image AP |",
        "|---|---|---|---|---|---|",
    ]
    for name in ROWS:
        r = rows[name]["result"]
        lines.append(
            f"| {name} ({rows[name]['n_anomalies']} anomalies) | {100 * r.pixel_auroc:.1f} | {100 * r.pixel_ap:.1f} | "
            f"{100 * r.pixel_f1_max:.1f} | {100 * r.image_auroc:.1f} | {100 * r.image_ap:.1f} |"
        )
    return lines


def write_pr_curves(rows: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for name in ROWS:
        r = rows[name]["result"]
        for ax, counts, ap in ((axes[0], r.pixel_counts, r.pixel_ap), (axes[1], r.image_counts, r.image_ap)):
            precision, recall, _ = counts.pr_curve()
            ax.plot(recall, precision, label=f"{name} (AP {100 * ap:.1f})")
    for ax, level in zip(axes, ("pixel", "image"), strict=True):
        ax.set(title=f"toy evaluation fold: {level} precision-recall", xlabel="recall", ylabel="precision")
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return path


def write_maps_picture(rows: dict, path: Path, per_type: int = 1, scale: int = 3) -> Path:
    """test image | truth | one map per detector: ``per_type`` evaluation-fold anomalies of every type and
    two normals."""
    test, masks = rows["_test"], rows[ROWS[0]]["masks"]
    picked, seen = [], {}
    for i, s in enumerate(test):
        key = s.defect_type
        if seen.get(key, 0) < (2 if key == "good" else per_type):
            seen[key] = seen.get(key, 0) + 1
            picked.append(i)
    size = masks[0].shape[0]
    cell = size * scale
    columns = 2 + len(ROWS)
    grid = Image.new("RGB", (columns * cell, (len(picked) + 1) * cell // 1), "white")
    from PIL import ImageDraw

    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(("image", "truth", "AXF", "Perlin", "real")):
        draw.text((c * cell + 2, cell // 2), title, fill="black")
    for r, i in enumerate(picked, start=1):
        image = test[i].load_image()
        cells = [image, np.repeat((masks[i] * 255).astype(np.uint8)[..., None], 3, 2)]
        for name in ROWS:
            m = (np.clip(rows[name]["maps"][i], 0, 1) * 255).astype(np.uint8)
            cells.append(np.repeat(m[..., None], 3, 2))
        for c, array in enumerate(cells):
            tile = Image.fromarray(array).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (c * cell, r * cell))
    atomic_write(path, lambda tmp: grid.save(tmp, format="png"))
    return path
