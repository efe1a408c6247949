"""Export to the Hub's standard layout (Parquet shards + README card), check it, and push it.

Layout of an export folder (one per dataset, several configs):

    README.md                              card with YAML `configs:` and `dataset_info:`
    ad/train-00000-of-00001.parquet        image and mask bytes embedded, not paths
    loco/validation-00000-of-00001.parquet ...

so `load_dataset("<folder>", "loco")` and, once pushed, `load_dataset("<user>/mvtec_caption", "loco")`
work with no remote code.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard, DatasetCardData, HfApi
from tqdm.auto import tqdm

from ._io import atomic_write, load_source
from .builder import CITATION, SPLITS, MVTecCaption
from .cards import (
    MVTEC_LICENSE,
    PROJECT_LICENSE,
    UNKNOWN_LICENSE,
    card_template,
    check_card_data,
    check_license_id,
    check_publishable,
    size_category,
)
from .errors import MVTecCaptionError
from .images import decode
from .sample_tree import SYNTHETIC_PREFIX

DEFAULT_OUTPUT = Path("outputs") / "mvtec_caption"
CONFIGS = tuple(SPLITS)
CARD_TEMPLATE = "dataset_card.md"  # in mvtec_caption/cards/ (package data)
# What this package wrote into an export folder: the card's sha256 and, per config, its kind and files.
MARKER = ".mvtec_caption_export.json"
_SPLIT_ORDER = ("train", "validation", "test")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_marker(output: Path) -> dict:
    """The export's record of what it wrote; {} for a folder this package did not write."""
    path = output / MARKER
    if not path.is_file():
        return {}
    try:
        marker = json.loads(path.read_text())
        if not isinstance(marker.get("configs"), dict):
            raise ValueError("no configs")
        return marker
    except ValueError as err:
        raise MVTecCaptionError(f"{path} is not a readable MVTec Caption export record ({err})") from err


def _write_marker(output: Path, marker: dict) -> None:
    text = json.dumps(marker, indent=1, sort_keys=True)
    atomic_write(output / MARKER, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_output_dir(output: str | Path) -> Path:
    """Refuse any folder holding a file this package did not write there (named in the error).

    An export is recognised by its record (`.mvtec_caption_export.json`): the configs and shard files
    it wrote and the sha256 of the card it rendered. Anything else -- a user's README.md, an ad/ folder
    of their own, Python source -- is never overwritten or deleted.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise MVTecCaptionError(f"--output {output} is a file, not a folder")
    if not output.exists():
        return output
    entries = sorted(output.iterdir())
    if not entries:
        return output
    marker = read_marker(output)
    source = next((p for p in entries if p.suffix == ".py"), None)
    if source is not None:
        raise MVTecCaptionError(
            f"Refusing to write the export into {output}: it holds Python source ({source}). "
            f"Choose another --output (default: {DEFAULT_OUTPUT})."
        )
    if not marker:
        raise MVTecCaptionError(
            f"Refusing to write the export into {output}: it holds {entries[0]}, which this builder did not "
            f"write (no {MARKER} record). Choose an empty or new folder for --output."
        )
    configs = marker["configs"]
    for entry in entries:
        if entry.name == MARKER:
            continue
        if entry.name == "README.md":
            if _sha256(entry) not in marker.get("readme_sha256", []):
                raise MVTecCaptionError(
                    f"Refusing to write the export into {output}: {entry} was changed since the builder wrote it; "
                    "move your edits elsewhere or choose another --output"
                )
            continue
        if entry.is_dir() and entry.name in configs:
            ours = set(configs[entry.name]["files"])
            for file in sorted(entry.rglob("*")):
                if file.relative_to(entry).as_posix() not in ours:
                    raise MVTecCaptionError(
                        f"Refusing to write the export into {output}: {file} was not written by the builder"
                    )
            continue
        raise MVTecCaptionError(
            f"Refusing to write the export into {output}: {entry} was not written by the builder"
        )
    return output


def config_license(config_name: str, license: str | None = None, toy: bool = False) -> str:
    """A config's licence: the project's for toy data, MVTec's for MVTec AD / LOCO images, and for a custom
    tree the one its owner states (``--license``), else ``unknown``."""
    if license is not None and (config_name != "custom" or toy):
        raise MVTecCaptionError(
            f"--license is for --config custom; the {config_name} config's images are "
            + (f"toy data under {PROJECT_LICENSE}" if toy else f"MVTec's, under {MVTEC_LICENSE}")
        )
    if toy:
        return PROJECT_LICENSE
    if config_name != "custom":
        return MVTEC_LICENSE
    try:
        return UNKNOWN_LICENSE if license is None else check_license_id(license)
    except ValueError as err:
        raise MVTecCaptionError(str(err)) from err


def _check_name(config_name: str, name: str | None) -> str:
    if config_name not in CONFIGS:
        raise MVTecCaptionError(f"Unknown config {config_name!r}; choose one of {', '.join(CONFIGS)}")
    if name is None:
        return config_name
    if config_name != "custom":
        raise MVTecCaptionError(
            f"--name is for --config custom; the {config_name} config is always named {config_name}"
        )
    if not _NAME.match(name) or name in ("ad", "loco") or name.startswith("."):
        raise MVTecCaptionError(
            f"--name {name!r} is not a usable config name (letters, digits, _ and -; not ad or loco)"
        )
    return name


def export_dataset(
    config_name: str,
    data_dir: str | Path,
    output: str | Path = DEFAULT_OUTPUT,
    captions: str | Path | None = None,
    categories: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    max_shard_size: str | int = "500MB",
    name: str | None = None,
    license: str | None = None,
    toy: bool = False,
) -> Path:
    """Build one config into `output/<name>/` (name: the config's, or yours for `custom`), then
    (re)render the card for every config present.

    ``license``: a custom tree's licence as its owner states it (a Hub licence id; default ``unknown``).
    ``toy``: the tree is generated toy data (the demo's, a sample tree): carded as such, under the project's
    licence, whatever config layout it follows.

    Everything is built in a staging folder beside `output` and renamed into place: a failed or killed
    build leaves the earlier export (or no folder) as it was, never a mix.
    """
    name = _check_name(config_name, name)
    terms = {"license": config_license(config_name, license, toy), "toy": toy}
    output = Path(output)
    prefix = f".{output.name}.staging-"
    _recover_interrupted(output, prefix)
    output = check_output_dir(output)
    builder = MVTecCaption(
        config_name=config_name,
        data_dir=str(data_dir),
        captions=None if captions is None else str(captions),
        categories=categories,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=prefix, dir=output.parent))
    try:
        # datasets puts its lock files beside its output folder, hence the extra level.
        builder.download_and_prepare(
            str(staging_root / "build"), file_format="parquet", max_shard_size=max_shard_size
        )
        target = staging_root / name
        target.mkdir()
        for split in builder.info.splits:
            shards = sorted((staging_root / "build").glob(f"{builder.dataset_name}-{split}*.parquet"))
            if not shards:
                raise MVTecCaptionError(f"datasets wrote no Parquet shard for split {split!r}")
            for i, shard in enumerate(shards):
                shard.rename(target / f"{split}-{i:05d}-of-{len(shards):05d}.parquet")
        entry = {"kind": config_name, "files": sorted(p.name for p in target.iterdir()), **terms}
        if not output.exists():
            fresh = staging_root / "export"
            fresh.mkdir()
            target.rename(fresh / name)
            _write_marker(
                fresh, {"written_by": "mvtec_caption", "configs": {name: entry}, "readme_sha256": []}
            )
            write_card(fresh, {name: builder.info})
            fresh.rename(output)
        else:
            _replace_config(output, name, entry, target, staging_root)
            write_card(output, {name: builder.info})
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return output


def _recover_interrupted(output: Path, prefix: str) -> None:
    """Undo what a killed build left: a config moved aside but not yet replaced gets its old files back;
    the staging folders and half-written card or record (ours by name) go."""
    if not output.parent.is_dir():
        return
    marker = read_marker(output) if output.is_dir() else {}
    if marker:
        for name in ("README.md", MARKER):
            for tmp in output.glob(f".{name}.*.tmp"):
                tmp.unlink()
    for leftover in sorted(output.parent.glob(f"{prefix}*")):
        previous = leftover / "previous"
        if previous.is_dir() and marker:
            name = next((n for n in marker["configs"] if not (output / n).exists()), None)
            if name is not None:
                previous.rename(output / name)
        shutil.rmtree(leftover, ignore_errors=True)


def _replace_config(output: Path, name: str, entry: dict, target: Path, staging_root: Path) -> None:
    """Swap `target` in as `output/<name>`; the record lists old and new files until the swap is done."""
    marker = read_marker(output) or {"written_by": "mvtec_caption", "configs": {}, "readme_sha256": []}
    old = marker["configs"].get(name, {}).get("files", [])
    marker["configs"][name] = {**entry, "files": sorted({*old, *entry["files"]})}
    _write_marker(output, marker)
    final = output / name
    if final.exists():
        final.rename(staging_root / "previous")
    target.rename(final)
    marker["configs"][name] = entry
    _write_marker(output, marker)


def _config_files(output: Path) -> dict[str, dict[str, list[Path]]]:
    """{config: {split: [shard, ...]}} of what is on disk (configs from the record, else any shard folder)."""
    marker = read_marker(output)
    if marker:
        names = list(marker["configs"])
    else:
        names = (
            sorted(p.name for p in output.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
            if output.is_dir()
            else []
        )
    found: dict[str, dict[str, list[Path]]] = {}
    for config_name in names:
        for split in _SPLIT_ORDER:
            shards = sorted((output / config_name).glob(f"{split}-*.parquet"))
            if shards:
                found.setdefault(config_name, {})[split] = shards
    return found


def summarize(output: str | Path) -> dict[str, dict]:
    """Counts per config and split, read from the shards' metadata columns (no image bytes read), with each
    config's licence and whether it is toy data (built so, or from a generated sample tree)."""
    summary: dict[str, dict] = {}
    recorded = read_marker(Path(output)).get("configs", {})
    for config_name, splits in _config_files(Path(output)).items():
        record = recorded.get(config_name, {})
        entry: dict = {
            "kind": record.get("kind", config_name), "splits": {}, "categories": [], "captions": 0,
            "templated": 0, "synthetic": False,
        }  # fmt: skip
        for split, shards in splits.items():
            columns = ["category", "is_anomaly", "caption"]
            if "caption_source" in pq.read_schema(shards[0]).names:
                columns.append("caption_source")
            table = pq.read_table(shards, columns=columns)
            anomalies = sum(table.column("is_anomaly").to_pylist())
            entry["splits"][split] = {"examples": table.num_rows, "anomalies": anomalies}
            entry["captions"] += sum(1 for c in table.column("caption").to_pylist() if c)
            if "caption_source" in columns:
                entry["templated"] += table.column("caption_source").to_pylist().count("template")
            entry["synthetic"] |= any(
                c.startswith(SYNTHETIC_PREFIX) for c in table.column("caption").to_pylist()
            )
            entry["categories"] = list(
                dict.fromkeys([*entry["categories"], *table.column("category").to_pylist()])
            )
        entry["toy"] = bool(record.get("toy")) or entry["synthetic"]
        kind = entry["kind"] if entry["kind"] in CONFIGS else "custom"
        entry["license"] = PROJECT_LICENSE if entry["toy"] else record.get("license") or config_license(kind)
        summary[config_name] = entry
    return summary


def dataset_terms(dataset: str | Path, config: str | None = None) -> dict:
    """What a model or a synthetic set made from one config of ``dataset`` inherits: ``license`` (plus
    ``license_name``/``license_link`` for ``other``), ``toy`` and ``mvtec`` (MVTec's images).

    A local export of this package answers per config from its record; any other folder or a Hub id from its
    card (offline or without a card: ``unknown``, never a guess)."""
    path = Path(dataset)
    summary = summarize(path) if path.is_dir() and read_marker(path) else {}
    entry = summary.get(config) if config else next(iter(summary.values())) if len(summary) == 1 else None
    if entry is not None:
        mvtec = entry["kind"] in ("ad", "loco") and not entry["toy"]
        return {"license": entry["license"], "toy": entry["toy"], "mvtec": mvtec}
    try:
        readme = path / "README.md"
        data = (DatasetCard.load(readme) if readme.is_file() else DatasetCard.load(str(dataset))).data
    except Exception:  # offline, no card, or not a dataset: say so rather than guess
        data = DatasetCardData()
    license, tags = data.get("license"), data.get("tags") or []
    if isinstance(license, list):
        license = license[0] if len(license) == 1 else None
    terms = {"license": license or UNKNOWN_LICENSE, "toy": "toy" in tags, "mvtec": "mvtec" in tags}
    if license == "other":
        if data.get("license_name") and data.get("license_link"):
            terms.update(license_name=data.get("license_name"), license_link=data.get("license_link"))
        else:
            terms["license"] = UNKNOWN_LICENSE
    return terms


def write_card(output: str | Path, infos: dict[str, datasets.DatasetInfo] | None = None) -> Path:
    """README.md from the template `mvtec_caption/cards/dataset_card.md`, listing every config in `output`."""
    output = Path(output)
    readme = output / "README.md"
    card_data = DatasetCard.load(readme).data if readme.exists() else DatasetCardData()
    summary = summarize(output)
    files = _config_files(output)
    mvtec = any(entry["kind"] in ("ad", "loco") and not entry["toy"] for entry in summary.values())
    toy = bool(summary) and all(entry["toy"] for entry in summary.values())
    licenses = sorted({entry["license"] for entry in summary.values()})
    card_data.license = licenses[0] if len(licenses) == 1 else licenses
    card_data.pretty_name = "MVTec Caption" + (" (toy data)" if toy else "")
    card_data.task_categories = ["image-to-image", "text-to-image", "image-segmentation"]
    card_data.language = ["en"]
    card_data.tags = [
        "anomaly-detection",
        "anomaly-synthesis",
        "industrial-inspection",
        *(["mvtec"] if mvtec else []),
        *(["toy"] if any(entry["toy"] for entry in summary.values()) else []),
    ]
    total = sum(s["examples"] for entry in summary.values() for s in entry["splits"].values())
    card_data.size_categories = [size_category(total)]
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
    try:
        check_card_data(card_data, [output])
    except ValueError as err:
        raise MVTecCaptionError(f"{readme}: {err}") from err
    card = DatasetCard.from_template(
        card_data,
        template_str=card_template("mvtec_caption", CARD_TEMPLATE),
        summary=summary,
        citation=CITATION,
        mvtec=mvtec,
        toy=toy,
    )
    # Atomic, and recorded as ours before it lands: a kill at any point leaves a card the next build
    # recognises.
    text = str(card)
    check_publishable(text, [output], str(readme))
    marker = read_marker(output)
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    marker["readme_sha256"] = [*marker.get("readme_sha256", [])[-1:], sha]
    _write_marker(output, marker)
    atomic_write(readme, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    marker["readme_sha256"] = [sha]
    _write_marker(output, marker)
    return readme


def _check_rows(output: Path, config_name: str, split: str, shards: list[Path]) -> None:
    """Decode every image and mask once, naming the first one that is truncated, empty or misfit."""
    total = sum(pq.ParquetFile(shard).metadata.num_rows for shard in shards)
    bar = tqdm(
        total=total, desc=f"Decoding {config_name}/{split}", unit=" rows", disable=None
    )  # None: tty only
    for shard in shards:
        parquet = pq.ParquetFile(shard)
        for batch in parquet.iter_batches(batch_size=16, columns=["image", "mask", "path", "is_anomaly"]):
            bar.update(batch.num_rows)
            for row in batch.to_pylist():
                where = f"{output}: {config_name}/{split} {row['path']}"
                image = decode(row["image"]["bytes"], f"{where} (image)")
                mask = decode(row["mask"]["bytes"], f"{where} (mask)")
                if image.size != mask.size or mask.mode != "L":
                    raise MVTecCaptionError(
                        f"{where}: mask is {mask.mode} {mask.size[0]}x{mask.size[1]}, image {image.size[0]}x{image.size[1]}"
                    )
                if row["is_anomaly"] and not np.asarray(mask).any():
                    raise MVTecCaptionError(f"{where}: an anomaly whose mask is all zero")
    bar.close()


def check_export(output: str | Path, cache_dir: str | Path | None = None) -> dict[str, dict]:
    """Load every config of an export with `load_dataset`, compare it with the shards' counts, and
    decode every image and mask once."""
    output = Path(output)
    if not (output / "README.md").is_file():
        raise MVTecCaptionError(f"{output} is not an MVTec Caption export: README.md is missing")
    summary = summarize(output)
    if not summary:
        raise MVTecCaptionError(f"{output} holds no config folder with Parquet shards")
    files = _config_files(output)
    for config_name, splits in files.items():
        for split, shards in splits.items():
            _check_rows(output, config_name, split, shards)
    for config_name, entry in summary.items():
        loaded = load_source(
            str(output), config_name, cache_dir=None if cache_dir is None else str(cache_dir)
        )
        for split, counts in entry["splits"].items():
            if loaded[split].num_rows != counts["examples"]:
                raise MVTecCaptionError(
                    f"{output}: {config_name}/{split} loads {loaded[split].num_rows} rows, shards hold {counts['examples']}"
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
            f"{output} is not an MVTec Caption export (README.md and config folders of Parquet shards); "
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
