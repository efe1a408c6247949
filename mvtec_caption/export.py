"""Export to the Hub's standard layout (Parquet shards + README card), check it, and push it.

Layout of an export folder (one per dataset, several configs):

    README.md                              card with YAML `configs:` and `dataset_info:`
    ad/train-00000-of-00001.parquet        image and mask bytes embedded, not paths
    loco/validation-00000-of-00001.parquet ...

so `load_dataset("<folder>", "loco")` and, once pushed, `load_dataset("<user>/mvtec_caption", "loco")`
work with no remote code.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard, DatasetCardData, HfApi

from .builder import CITATION, LICENSE, SPLITS, MVTecCaption
from .errors import MVTecCaptionError
from .sample_tree import SYNTHETIC_PREFIX

DEFAULT_OUTPUT = Path("outputs") / "mvtec_caption"
CONFIGS = tuple(SPLITS)
CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "cards" / "dataset_card.md"
_STAGING = ".staging-"
_EXPORT_ENTRIES = {"README.md", ".gitattributes", *CONFIGS}


def check_output_dir(output: str | Path) -> Path:
    """Refuse folders that are not (empty or earlier) exports: above all the source tree's own package."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise MVTecCaptionError(f"--output {output} is a file, not a folder")
    if not output.exists():
        return output
    entries = list(output.iterdir())
    foreign = sorted(
        p.name for p in entries if p.name not in _EXPORT_ENTRIES and not p.name.startswith(_STAGING)
    )
    source = next((p for p in entries if p.suffix == ".py"), None)
    if source is None and not foreign:  # only an export's own entries: cheap to search them all
        source = next(output.rglob("*.py"), None)
    if source is not None:
        raise MVTecCaptionError(
            f"Refusing to write the export into {output}: it holds Python source ({source}). "
            f"Choose another --output (default: {DEFAULT_OUTPUT})."
        )
    if foreign:
        raise MVTecCaptionError(
            f"Refusing to write the export into {output}: it holds {', '.join(foreign[:5])}, which an "
            "MVTec Caption export does not. Choose an empty or new folder for --output."
        )
    return output


def export_dataset(
    config_name: str,
    data_dir: str | Path,
    output: str | Path = DEFAULT_OUTPUT,
    captions: str | Path | None = None,
    categories: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    max_shard_size: str | int = "500MB",
) -> Path:
    """Build one config into `output/<config>/`, then (re)render the card for every config present.

    The shards are written to a staging folder first, so a failed build leaves an earlier export intact.
    """
    if config_name not in CONFIGS:
        raise MVTecCaptionError(f"Unknown config {config_name!r}; choose one of {', '.join(CONFIGS)}")
    output = check_output_dir(output)
    output.mkdir(parents=True, exist_ok=True)
    for leftover in output.glob(f"{_STAGING}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    builder = MVTecCaption(
        config_name=config_name,
        data_dir=str(data_dir),
        captions=None if captions is None else str(captions),
        categories=categories,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    # Staged next to the export (same file system for the final rename); datasets puts its lock files
    # beside its output folder, hence the extra level.
    staging_root = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{config_name}-", dir=output))
    staging = staging_root / "build"
    try:
        try:
            builder.download_and_prepare(str(staging), file_format="parquet", max_shard_size=max_shard_size)
        except datasets.exceptions.DatasetGenerationError as err:
            if isinstance(err.__cause__, MVTecCaptionError):
                raise err.__cause__ from None
            raise
        target = staging_root / config_name
        target.mkdir()
        for split in builder.info.splits:
            shards = sorted(staging.glob(f"{builder.dataset_name}-{split}*.parquet"))
            if not shards:
                raise MVTecCaptionError(f"datasets wrote no Parquet shard for split {split!r} into {staging}")
            for i, shard in enumerate(shards):
                shard.rename(target / f"{split}-{i:05d}-of-{len(shards):05d}.parquet")
        final = output / config_name
        if final.exists():
            shutil.rmtree(final)
        target.rename(final)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    write_card(output, {config_name: builder.info})
    return output


def _config_files(output: Path) -> dict[str, dict[str, list[Path]]]:
    """{config: {split: [shard, ...]}} of what is on disk."""
    found: dict[str, dict[str, list[Path]]] = {}
    for config_name, splits in SPLITS.items():
        for split in splits:
            shards = sorted((output / config_name).glob(f"{split}-*.parquet"))
            if shards:
                found.setdefault(config_name, {})[str(split)] = shards
    return found


def summarize(output: str | Path) -> dict[str, dict]:
    """Counts per config and split, read from the shards' metadata columns (no image bytes read)."""
    summary: dict[str, dict] = {}
    for config_name, splits in _config_files(Path(output)).items():
        entry: dict = {"splits": {}, "categories": [], "captions": 0, "synthetic": False}
        for split, shards in splits.items():
            table = pq.read_table(shards, columns=["category", "is_anomaly", "caption"])
            anomalies = sum(table.column("is_anomaly").to_pylist())
            entry["splits"][split] = {"examples": table.num_rows, "anomalies": anomalies}
            entry["captions"] += sum(1 for c in table.column("caption").to_pylist() if c)
            entry["synthetic"] |= any(
                c.startswith(SYNTHETIC_PREFIX) for c in table.column("caption").to_pylist()
            )
            entry["categories"] = list(
                dict.fromkeys([*entry["categories"], *table.column("category").to_pylist()])
            )
        summary[config_name] = entry
    return summary


def write_card(output: str | Path, infos: dict[str, datasets.DatasetInfo] | None = None) -> Path:
    """README.md from `cards/dataset_card.md`, listing every config found in `output`."""
    output = Path(output)
    readme = output / "README.md"
    card_data = DatasetCard.load(readme).data if readme.exists() else DatasetCardData()
    summary = summarize(output)
    files = _config_files(output)
    card_data.license = LICENSE
    card_data.pretty_name = "MVTec Caption"
    card_data.task_categories = ["image-to-image", "text-to-image", "image-segmentation"]
    card_data.language = ["en"]
    card_data.tags = ["anomaly-detection", "anomaly-synthesis", "industrial-inspection", "mvtec"]
    total = sum(s["examples"] for entry in summary.values() for s in entry["splits"].values())
    card_data.size_categories = ["n<1K" if total < 1000 else "1K<n<10K" if total < 10000 else "10K<n<100K"]
    card_data.configs = [
        {
            "config_name": config_name,
            "data_files": [{"split": split, "path": f"{config_name}/{split}-*"} for split in splits],
        }
        for config_name, splits in files.items()
    ]
    if infos:
        DatasetInfosDict(infos).to_dataset_card_data(card_data)
    if isinstance(card_data.get("dataset_info"), list):
        card_data.dataset_info = [i for i in card_data.dataset_info if i.get("config_name") in files]
    if not CARD_TEMPLATE.is_file():
        raise MVTecCaptionError(f"Dataset card template {CARD_TEMPLATE} is missing")
    card = DatasetCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        summary=summary,
        citation=CITATION,
    )
    card.save(readme)
    return readme


def check_export(output: str | Path, cache_dir: str | Path | None = None) -> dict[str, dict]:
    """Load every config of an export with `load_dataset` and compare it with the shards' counts."""
    output = Path(output)
    if not (output / "README.md").is_file():
        raise MVTecCaptionError(f"{output} is not an MVTec Caption export: README.md is missing")
    summary = summarize(output)
    if not summary:
        raise MVTecCaptionError(f"{output} holds no ad/ or loco/ Parquet shards")
    for config_name, entry in summary.items():
        loaded = datasets.load_dataset(
            str(output), config_name, cache_dir=None if cache_dir is None else str(cache_dir)
        )
        for split, counts in entry["splits"].items():
            if loaded[split].num_rows != counts["examples"]:
                raise MVTecCaptionError(
                    f"{output}: {config_name}/{split} loads {loaded[split].num_rows} rows, shards hold {counts['examples']}"
                )
            first = loaded[split][0]
            if (
                first["image"].mode != "RGB"
                or first["mask"].mode != "L"
                or first["image"].size != first["mask"].size
            ):
                raise MVTecCaptionError(
                    f"{output}: {config_name}/{split} row 0 ({first['path']}) has a bad image/mask"
                )
    return summary


def push_to_hub(
    output: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload MVTec Caption",
) -> str:
    """Upload an export folder as a dataset repo; shards of the uploaded configs replace the old ones."""
    output = Path(output)
    files = _config_files(output)
    if not (output / "README.md").is_file() or not files:
        raise MVTecCaptionError(
            f"{output} is not an MVTec Caption export (README.md and ad/ or loco/ shards); "
            "run `mvtec-caption build` first"
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    patterns = [f"{config_name}/*.parquet" for config_name in files]
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=str(output),
        allow_patterns=["README.md", *patterns],
        delete_patterns=patterns,
        commit_message=commit_message,
    )
    return str(getattr(commit, "commit_url", commit))
