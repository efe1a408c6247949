"""Export to Parquet + card, loading it back in a fresh process, the CLI, and pushing (no network)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cli_checks import assert_refused
from huggingface_hub import DatasetCard, HfApi

from mvtec_caption import MVTecCaptionError, export_dataset, make_sample_tree, push_to_hub
from mvtec_caption.cli import main
from mvtec_caption.export import check_export

REPO = Path(__file__).resolve().parents[1]

LOAD_IN_FRESH_PROCESS = """
import json, sys
import datasets
import numpy as np
out = {}
for name, config in (("mvtec_caption", "loco"), (sys.argv[1], "ad")):
    ds = datasets.load_dataset(name, config)
    test = ds["test"]
    row = test[len(test) - 1]
    out[config] = {
        "splits": {split: ds[split].num_rows for split in ds},
        "last": [row["path"], row["caption"], row["image"].mode, row["mask"].mode, int(np.asarray(row["mask"]).max())],
        "stamp": np.asarray(row["image"].convert("L"))[0, :4].tolist(),
    }
print(json.dumps(out))
"""


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    return env


def test_export_of_both_configs_loads_in_a_fresh_process_after_the_tree_is_gone(tmp_path):
    trees = {
        c: make_sample_tree(tmp_path / "raw" / c, c, scale=0.02, captions_path=tmp_path / f"{c}.json")
        for c in ("ad", "loco")
    }
    output = tmp_path / "parent" / "mvtec_caption"
    for config_name, tree in trees.items():
        export_dataset(config_name, tree.root, output, tree.captions_path, cache_dir=tmp_path / "cache")
    # the second build added its config: the card lists both
    card = DatasetCard.load(output / "README.md")
    assert [c["config_name"] for c in card.data.configs] == ["ad", "loco"]
    # generated sample trees are toy data: the project's licence, never MVTec's terms or its tag
    assert card.data.license == "apache-2.0" and "toy" in card.data.tags and "mvtec" not in card.data.tags
    assert "1,258" not in card.text
    assert "bergmann2019mvtec" in card.text and "hu2024anomalyxfusion" in card.text
    assert "| `loco` | `test` | 14 | 12 | 2 |" in card.text
    assert "generated sample tree" in card.text
    # bytes are embedded in the shards, not paths to the raw tree
    table = pq.read_table(sorted((output / "loco").glob("test-*.parquet")), columns=["image", "mask"])
    assert all(cell["bytes"] for cell in table.column("image").to_pylist())
    expected_last = trees["loco"].captions["juice_bottle"]["logical_anomalies"][-1]

    shutil.rmtree(tmp_path / "raw")
    shutil.rmtree(tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(output)],
        cwd=output.parent,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["loco"]["splits"] == {"train": 4, "validation": 2, "test": 14}
    assert loaded["ad"]["splits"] == {"train": 6, "test": 24}
    assert loaded["loco"]["last"] == [
        "juice_bottle/test/logical_anomalies/002.png",
        expected_last,
        "RGB",
        "L",
        255,
    ]
    assert loaded["loco"]["stamp"][0] == 2  # the pixels of image 002 came with it

    # rebuilding one config replaces only that config
    tree = make_sample_tree(
        tmp_path / "raw2", "ad", captions_path=tmp_path / "ad2.json", scale=0.02, n_train=3
    )
    export_dataset(
        "ad", tree.root, output, tree.captions_path, categories=["grid"], cache_dir=tmp_path / "cache"
    )
    summary = check_export(output, cache_dir=tmp_path / "cache")
    assert summary["ad"]["splits"]["train"]["examples"] == 3 and summary["ad"]["categories"] == ["grid"]
    assert summary["loco"]["splits"]["test"]["examples"] == 14


def test_export_refuses_folders_holding_python_source_or_other_files(tmp_path):
    tree = make_sample_tree(tmp_path / "raw", "ad", scale=0.02, captions_path=tmp_path / "ad.json")
    before = sorted(p.name for p in (REPO / "mvtec_caption").iterdir())
    with pytest.raises(
        MVTecCaptionError, match=r"Refusing to write the export into .*mvtec_caption: it holds Python source"
    ):
        export_dataset(
            "ad", tree.root, REPO / "mvtec_caption", tree.captions_path, cache_dir=tmp_path / "cache"
        )
    assert sorted(p.name for p in (REPO / "mvtec_caption").iterdir()) == before
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(
        MVTecCaptionError, match=r"it holds .*home/notes\.txt, which this builder did not write"
    ):
        export_dataset("ad", tree.root, tmp_path / "home", tree.captions_path, cache_dir=tmp_path / "cache")


def test_failed_build_leaves_the_earlier_export_intact(tmp_path):
    tree = make_sample_tree(tmp_path / "raw", "ad", scale=0.02, captions_path=tmp_path / "ad.json")
    output = tmp_path / "mvtec_caption"
    export_dataset("ad", tree.root, output, tree.captions_path, cache_dir=tmp_path / "cache")
    shards = sorted(p.name for p in (output / "ad").iterdir())
    (tree.root / "grid" / "test" / "bent" / "000.png").unlink()
    with pytest.raises(MVTecCaptionError, match="grid/bent"):
        export_dataset("ad", tree.root, output, tree.captions_path, cache_dir=tmp_path / "cache2")
    assert sorted(p.name for p in (output / "ad").iterdir()) == shards
    assert sorted(p.name for p in output.iterdir()) == [".mvtec_caption_export.json", "README.md", "ad"]


def test_cli_build_without_data_dir_builds_the_sample(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["build", "--scale", "0.02"]) == 0
    printed = capsys.readouterr().out
    assert "No --data-dir given" in printed and "SAMPLE" in printed
    output = tmp_path / "outputs" / "mvtec_caption"
    assert sorted(p.name for p in output.iterdir()) == [
        ".mvtec_caption_export.json",
        "README.md",
        "ad",
        "loco",
    ]
    assert main(["check", str(output), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "loads with load_dataset" in capsys.readouterr().out


def test_cli_build_from_data_dir_and_its_errors(tmp_path, capsys):
    tree = make_sample_tree(tmp_path / "raw", "loco", scale=0.02, captions_path=tmp_path / "loco.json")
    output = tmp_path / "out" / "mvtec_caption"
    args = ["build", "--config", "loco", "--data-dir", str(tree.root), "--captions", str(tree.captions_path)]
    assert main([*args, "--output", str(output), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert (
        "loco: train 4 (0 anomalies), validation 2 (0 anomalies), test 14 (12 anomalies)"
        in capsys.readouterr().out
    )
    watch = [output, tree.root, REPO / "mvtec_caption"]
    assert_refused(main, [*args, "--output", str(REPO / "mvtec_caption")], "holds Python source", watch)
    assert_refused(main, ["build", "--data-dir", str(tree.root), "--output", str(output)],
                   "--config {ad,loco,custom} is required", watch)  # fmt: skip
    assert_refused(main, [*args, "--categories", "pushpins", "--output", str(output)],
                   "Unknown loco categories ['pushpins']", watch)  # fmt: skip
    assert_refused(
        main, [*args, "--name", "mine", "--output", str(output)], "--name is for --config custom", watch
    )


def _build_args(tree, output, tmp_path):
    return ["build", "--config", "ad", "--data-dir", str(tree.root), "--captions", str(tree.captions_path),
            "--output", str(output), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip


def test_export_never_overwrites_or_deletes_what_it_did_not_write(tmp_path):
    """A user's README.md or ad/ folder in --output, or a file added to an export, is refused by name."""
    tree = make_sample_tree(tmp_path / "raw", "ad", scale=0.02, captions_path=tmp_path / "ad.json")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# my notes")
    assert_refused(main, _build_args(tree, mine, tmp_path), str(mine / "README.md"), [mine, tree.root])
    (mine / "README.md").unlink()
    (mine / "ad").mkdir()
    (mine / "ad" / "train-00000-of-00001.parquet").write_bytes(b"my own parquet")
    assert_refused(main, _build_args(tree, mine, tmp_path), str(mine / "ad"), [mine, tree.root])

    output = tmp_path / "export"
    assert main(_build_args(tree, output, tmp_path)) == 0
    (output / "ad" / "notes.txt").write_text("mine")
    assert_refused(main, _build_args(tree, output, tmp_path), str(output / "ad" / "notes.txt"), [output])
    (output / "ad" / "notes.txt").unlink()
    card = (output / "README.md").read_text()
    (output / "README.md").write_text(card + "\nMy own section.\n")
    assert_refused(
        main, _build_args(tree, output, tmp_path), [str(output / "README.md"), "was changed"], [output]
    )
    (output / "README.md").write_text(card)
    (output / "loco").mkdir()
    assert_refused(main, _build_args(tree, output, tmp_path), str(output / "loco"), [output])
    (output / "loco").rmdir()
    assert main(_build_args(tree, output, tmp_path)) == 0  # its own export: rebuilt in place


def test_a_build_killed_while_swapping_leaves_the_old_result(tmp_path, monkeypatch):
    """Killed between moving the old config aside and moving the new one in: the next run restores it."""
    import mvtec_caption.export as export_module

    tree = make_sample_tree(tmp_path / "raw", "ad", scale=0.02, captions_path=tmp_path / "ad.json")
    output = tmp_path / "mvtec_caption"
    export_dataset("ad", tree.root, output, tree.captions_path, cache_dir=tmp_path / "cache")
    before = {p.name: p.read_bytes() for p in (output / "ad").iterdir()}
    real_rename = Path.rename

    def killed_at_the_swap(self, target):
        if Path(target) == output / "ad" and self.parent.name.startswith(".mvtec_caption.staging-"):
            raise KeyboardInterrupt  # as a kill: no clean-up runs
        return real_rename(self, target)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", killed_at_the_swap)
        patch.setattr(export_module.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(KeyboardInterrupt):
            export_dataset("ad", tree.root, output, tree.captions_path, cache_dir=tmp_path / "c2")
    assert not (output / "ad").exists() and list(tmp_path.glob(".mvtec_caption.staging-*"))
    (output / ".README.md.x1y2.tmp").write_text("a card write that was killed")
    (tree.root / "grid" / "test" / "bent" / "000.png").unlink()  # the next build fails, yet recovers first
    with pytest.raises(MVTecCaptionError, match="grid/bent"):
        export_dataset("ad", tree.root, output, tree.captions_path, cache_dir=tmp_path / "c3")
    assert {p.name: p.read_bytes() for p in (output / "ad").iterdir()} == before
    assert not list(tmp_path.glob(".mvtec_caption.staging-*")) and not list(output.glob("*.tmp"))
    check_export(output, cache_dir=tmp_path / "c4")


def test_check_decodes_every_image_and_names_a_truncated_one(tmp_path):
    import pyarrow as pa

    tree = make_sample_tree(tmp_path / "raw", "ad", scale=0.02, captions_path=tmp_path / "ad.json")
    output = tmp_path / "mvtec_caption"
    export_dataset("ad", tree.root, output, tree.captions_path, cache_dir=tmp_path / "cache")
    shard = next((output / "ad").glob("test-*.parquet"))
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    row = len(images) - 3  # not row 0: every row is decoded
    images[row] = {**images[row], "bytes": images[row]["bytes"][: len(images[row]["bytes"]) // 2]}
    index = table.schema.get_field_index("image")
    table = table.set_column(
        index, table.schema.field(index), pa.array(images, type=table.schema.field(index).type)
    )
    pq.write_table(table, shard)
    path = table.column("path").to_pylist()[row]
    assert_refused(
        main, ["check", str(output), "--cache-dir", str(tmp_path / "c2")], ["ad/test", path], [output]
    )


def test_push_uploads_the_export_as_a_dataset_repo(tmp_path, monkeypatch):
    tree = make_sample_tree(tmp_path / "raw", "loco", scale=0.02, captions_path=tmp_path / "loco.json")
    output = tmp_path / "mvtec_caption"
    export_dataset("loco", tree.root, output, tree.captions_path, cache_dir=tmp_path / "cache")
    calls = []
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
    )

    def upload_folder(self, **kw):
        uploaded = sorted(
            str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*") if p.is_file()
        )
        calls.append(("upload", kw, uploaded))
        return "https://huggingface.co/datasets/someone/mvtec_caption/commit/abc"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert main(["push", str(output), "--repo-id", "someone/mvtec_caption", "--private"]) == 0
    (_, repo_id, create_kw), (_, upload_kw, uploaded) = calls
    assert repo_id == "someone/mvtec_caption" and create_kw["repo_type"] == "dataset" and create_kw["private"]
    assert upload_kw["repo_type"] == "dataset" and upload_kw["folder_path"] == str(output)
    assert upload_kw["allow_patterns"] == ["README.md", "loco/*.parquet"]
    assert upload_kw["delete_patterns"] == ["loco/*.parquet"]
    assert "README.md" in uploaded and "loco/test-00000-of-00001.parquet" in uploaded
    with pytest.raises(MVTecCaptionError, match="is not an MVTec Caption export"):
        push_to_hub(tmp_path / "raw", "someone/mvtec_caption")


def test_load_source_never_returns_another_folders_cached_rows(tmp_path, monkeypatch):
    """datasets keys a local folder's cache on its base name and card: two exports both called
    ``mvtec_caption`` (or one rewritten in place) must still load their own rows through the one loader."""
    from mvtec_caption._io import load_source
    from mvtec_caption.sample_tree import synthetic_captions

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "shared_cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "shared_cache")

    def export(parent: str, scale: float, prefix: str) -> Path:
        captions = {c: {d: [f"{prefix} {t}" for t in ts] for d, ts in v.items()}
                    for c, v in synthetic_captions("ad").items() if c == "bottle"}  # fmt: skip
        tree = make_sample_tree(tmp_path / "raw" / parent, "ad", captions, scale=scale,
                                captions_path=tmp_path / f"{parent}.json")  # fmt: skip
        out = tmp_path / parent / "mvtec_caption"
        export_dataset("ad", tree.root, out, tree.captions_path, cache_dir=tmp_path / "cache")
        return out

    first, second = export("one", 0.02, "first"), export("two", 0.02, "second")
    captions = [set(load_source(str(p), "ad")["test"]["caption"]) for p in (first, second)]
    assert all(c.startswith("first") for c in captions[0] if c)
    assert all(c.startswith("second") for c in captions[1] if c)
    # the same folder rewritten in place: the new rows, not the cached old ones
    shutil.rmtree(first)
    rewritten = export("one", 0.02, "third")
    assert all(c.startswith("third") for c in load_source(str(rewritten), "ad")["test"]["caption"] if c)
