"""The outputs of `axf synthesize` besides the item files: the Parquet dataset and its card, the normals of
the MVTec-layout folder, and the previews. Written by the main process once every shard is done.

    OUT/README.md                                  card (axf_pipeline/cards/synthetic_dataset_card.md)
    OUT/data/train-00000-of-00001.parquet          one row per synthetic anomaly, image bytes embedded
    OUT/mvtec/<category>/train/good/NNN.png        the train normals used as bases
    OUT/mvtec/<category>/test/good/NNN.png         held-out train normals (last floor(n/5)); none if n < 5
    OUT/mvtec/<category>/test/<defect>/NNN.png     the synthetic anomalies (the core writes these)
    OUT/mvtec/<category>/ground_truth/<defect>/NNN_mask.png
    OUT/previews/<category>/<defect>.png           normal | mask | generated, a few rows
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import PIL.Image

from .core import Item, atomic_write, save_png
from .plan import digits
from .source import SourceData

CARD_TEMPLATE = "synthetic_dataset_card.md"  # in axf_pipeline/cards/ (package data)
ROWS_PER_SHARD = 250  # rows of embedded images per Parquet file: bounded memory while writing
PREVIEW_ROWS = 4
PREVIEW_HEIGHT = 128


def features():
    """The MVTec Caption columns a detector reads (no ``fold``: every row is synthetic) plus provenance."""
    import datasets

    from mvtec_caption import caption_features

    caption = caption_features()
    kept = ("image", "mask", "caption", "category", "defect_type", "is_anomaly", "path")
    provenance = {name: datasets.Value("string") for name in ("source_image", "reference", "mask_source")}
    return datasets.Features(
        {
            **{name: caption[name] for name in kept},
            **provenance,
            "seed": datasets.Value("int64"),
            "model": datasets.Value("string"),
            "mask_fallback": datasets.Value("bool"),
        }
    )


def shard_names(n_rows: int) -> list[str]:
    n = max(1, -(-n_rows // ROWS_PER_SHARD))
    return [f"data/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]


def normal_files(source: SourceData, categories: Sequence[str]) -> dict[str, int]:
    """{relative path in OUT: train row} for train/good (bases) and test/good (held out)."""
    files = {}
    for category in categories:
        bases, held = source.bases_and_held_out(category)
        for folder, rows in (("train/good", bases), ("test/good", held)):
            width = digits(len(rows))
            for i, row in enumerate(rows):
                files[f"mvtec/{category}/{folder}/{i:0{width}d}.png"] = row
    return files


def expected_files(source: SourceData, items: Sequence[Item], pairs) -> set[str]:
    """Every file `axf synthesize` writes for this plan (what a resumable output folder may hold)."""
    files = {"README.md", *shard_names(len(items))}
    files |= {p for item in items for p in (item.image_path, item.mask_path)}
    files |= set(normal_files(source, sorted({c for c, _ in pairs})))
    files |= {f"previews/{c}/{d}.png" for c, d in pairs}
    return files


def write_normals(output: Path, source: SourceData, categories: Sequence[str]) -> None:
    for rel, row in normal_files(source, categories).items():
        path = output / rel
        if path.is_file():
            continue
        data = source.normal_bytes(row)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data))
        else:
            save_png(PIL.Image.open(io.BytesIO(data)), path)


def write_parquet(output: Path, items: Sequence[Item]) -> list[str]:
    import datasets

    names = shard_names(len(items))
    for i, name in enumerate(names):
        chunk = items[i * ROWS_PER_SHARD : (i + 1) * ROWS_PER_SHARD]
        rows = defaultdict(list)
        for item in chunk:
            rows["image"].append({"bytes": (output / item.image_path).read_bytes(), "path": item.image_path})
            rows["mask"].append({"bytes": (output / item.mask_path).read_bytes(), "path": item.mask_path})
            rows["path"].append(item.image_path)
            for key, value in item.record.items():
                rows[key].append(value)
        table = datasets.Dataset.from_dict(dict(rows), features=features())
        atomic_write(output / name, lambda tmp, table=table: table.to_parquet(str(tmp)))
    return names


def write_card(output: Path, items: Sequence[Item], settings: dict, summary_counts: dict) -> None:
    """README.md: the source's licence and toy status carried over; model and dataset named as the Hub would
    know them (never the paths typed on the command line)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from mvtec_caption.cards import card_template, check_card_data, check_publishable, size_category
    from mvtec_caption.export import dataset_terms

    from ..publishing import publishable_name

    terms = dataset_terms(settings["dataset"], settings["config"])
    shown = {
        **settings,
        "model": publishable_name(settings["model"]),
        "dataset": publishable_name(settings["dataset"]),
    }
    card_data = DatasetCardData(
        license=terms["license"],
        pretty_name="Synthetic anomalies (AnomalyXFusion)" + (" from toy data" if terms["toy"] else ""),
        task_categories=["image-segmentation", "image-classification"],
        tags=[
            "anomaly-detection",
            "synthetic",
            "anomalyxfusion",
            *(["mvtec"] if terms["mvtec"] else []),
            *(["toy"] if terms["toy"] else []),
        ],
        size_categories=[size_category(len(items))],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
    )
    if terms["license"] == "other":
        card_data.license_name, card_data.license_link = terms["license_name"], terms["license_link"]
    typed = [settings["model"], settings["dataset"], output]
    check_card_data(card_data, typed)
    counts = defaultdict(int)
    for item in items:
        counts[(item.record["category"], item.record["defect_type"])] += 1
    card = DatasetCard.from_template(
        card_data,
        template_str=card_template("axf_pipeline", CARD_TEMPLATE),
        settings=shown,
        license_name=terms["license"],
        toy=terms["toy"],
        counts=[(c, d, n) for (c, d), n in sorted(counts.items())],
        total=len(items),
        output_name=output.name,
        summary=summary_counts,
    )
    text = str(card)
    check_publishable(text, typed, "synthetic dataset card")
    atomic_write(output / "README.md", lambda tmp: tmp.write_text(text))


def _tile(image: PIL.Image.Image) -> PIL.Image.Image:
    width = max(1, round(image.width * PREVIEW_HEIGHT / image.height))
    return image.convert("RGB").resize((width, PREVIEW_HEIGHT), PIL.Image.NEAREST)


def write_previews(output: Path, source: SourceData, items: Sequence[Item]) -> None:
    """previews/<category>/<defect>.png: up to PREVIEW_ROWS rows of normal | mask | generated."""
    groups = defaultdict(list)
    for item in items:
        groups[(item.record["category"], item.record["defect_type"])].append(item)
    for (category, defect), group in groups.items():
        rows = []
        for item in group[:PREVIEW_ROWS]:
            tiles = [
                _tile(source.normal(item.context["base"])),
                _tile(PIL.Image.open(output / item.mask_path)),
                _tile(PIL.Image.open(output / item.image_path)),
            ]
            rows.append(tiles)
        width = max(sum(t.width for t in row) for row in rows)
        sheet = PIL.Image.new("RGB", (width, PREVIEW_HEIGHT * len(rows)), "white")
        for r, row in enumerate(rows):
            x = 0
            for tile in row:
                sheet.paste(tile, (x, r * PREVIEW_HEIGHT))
                x += tile.width
        save_png(sheet, output / "previews" / category / f"{defect}.png")
