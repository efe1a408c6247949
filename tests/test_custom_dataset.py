"""Bring your own data: the `custom` config builds any MVTec-layout tree (made-up categories and defect
types, JPEG images, natural file numbering, captions for some categories and templates for the rest),
and the result feeds training and evaluation unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_refused
from huggingface_hub import DatasetCard
from PIL import Image

from mvtec_caption import MVTecCaption, MVTecCaptionError, export_dataset, make_sample_tree
from mvtec_caption.cli import main
from mvtec_caption.sample_tree import CUSTOM_CATEGORIES, custom_caption, make_custom_tree

LOAD_IN_FRESH_PROCESS = """
import json, sys
import datasets
import numpy as np
ds = datasets.load_dataset(sys.argv[1], sys.argv[2])
rows = []
for split in ds:
    for row in ds[split]:
        rows.append({
            "split": split, "path": row["path"], "caption": row["caption"], "source": row["caption_source"],
            "category": row["category"], "defect": row["defect_type"], "anomaly": row["is_anomaly"],
            "fold": row["fold"], "image": [row["image"].mode, *row["image"].size], "mask_mode": row["mask"].mode,
            "mask": np.asarray(row["mask"]).tolist() if row["is_anomaly"] else int(np.asarray(row["mask"]).max()),
        })
print(json.dumps({"features": sorted(ds["test"].features), "rows": rows}))
"""


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    return env


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """One export folder holding the sample `ad` config and the custom tree as config `mine`."""
    root = tmp_path_factory.mktemp("custom")
    tree = make_custom_tree(root / "tree", root / "captions.json")
    sample = make_sample_tree(root / "ad_tree", "ad", scale=0.02, captions_path=root / "ad.json")
    output = root / "export"
    export_dataset("ad", sample.root, output, sample.captions_path, cache_dir=root / "cache")
    argv = ["build", "--config", "custom", "--data-dir", str(tree.root), "--captions", str(tree.captions_path),
            "--output", str(output), "--name", "mine", "--cache-dir", str(root / "cache")]  # fmt: skip
    assert main(argv) == 0
    return {"root": root, "tree": tree, "output": output}


def test_custom_tree_builds_and_loads_in_a_fresh_process(export, tmp_path):
    tree, output = export["tree"], export["output"]
    card = DatasetCard.load(output / "README.md")
    assert [c["config_name"] for c in card.data.configs] == ["ad", "mine"]
    masks = {
        p.relative_to(tree.root): np.asarray(Image.open(p)) for p in tree.root.glob("*/ground_truth/*/*")
    }
    shutil.rmtree(tree.root)  # the export must not need the tree
    result = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(output), "mine"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    rows = loaded["rows"]
    assert "caption_source" in loaded["features"]
    assert {(r["category"], r["defect"]) for r in rows if r["anomaly"]} == {
        (c, d) for c, defects in CUSTOM_CATEGORIES.items() for d in defects
    }
    assert sorted({r["split"] for r in rows}) == ["test", "train"]
    assert sum(not r["anomaly"] for r in rows if r["split"] == "train") == 8
    for defect, (_, _, n) in CUSTOM_CATEGORIES["gizmo"].items():
        got = [r for r in rows if r["defect"] == defect]
        # natural order: _1, _2, _3, _10, _11, _20; caption i on image i; fold by that order
        stems = [Path(r["path"]).stem for r in got]
        assert [int(s.rsplit("_", 1)[1]) for s in stems] == sorted(int(s.rsplit("_", 1)[1]) for s in stems)
        assert [r["caption"] for r in got] == [custom_caption("gizmo", defect, s) for s in stems]
        assert {r["source"] for r in got} == {"human"}
        assert [r["fold"] for r in got] == ["generator"] * (n // 3) + ["evaluation"] * (n - n // 3)
    templated = [r for r in rows if r["category"] == "flange_plate" and r["anomaly"]]
    assert {r["source"] for r in templated} == {"template"}
    assert {r["caption"] for r in templated} == {
        "a missing bolt on the flange plate",
        "a rust spot on the flange plate",
    }
    assert all(r["caption"] == "" and r["source"] == "" and r["mask"] == 0 for r in rows if not r["anomaly"])
    for r in rows:
        assert r["image"][0] == "RGB" and r["mask_mode"] == "L"
        if r["anomaly"]:  # the mask is its own file's (paired by stem), binary, the image's size
            mask = np.asarray(r["mask"])
            gt = Path(r["category"]) / "ground_truth" / r["defect"]
            stem = Path(r["path"]).stem
            file = next(p for p in (gt / f"{stem}_mask.png", gt / f"{stem}.png") if p in masks)
            np.testing.assert_array_equal(mask, masks[file])
            assert list(mask.shape[::-1]) == r["image"][1:]


def test_template_captions_when_no_captions_file(tmp_path):
    tree = make_custom_tree(tmp_path / "tree")
    builder = MVTecCaption(config_name="custom", data_dir=str(tree.root), cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    test = builder.as_dataset()["test"].filter(lambda a: a, input_columns="is_anomaly")
    assert set(test["caption_source"]) == {"template"}
    assert "a burr mark on the gizmo" in test["caption"]


def _custom(tmp_path, edit=None):
    tree = make_custom_tree(tmp_path / "tree", tmp_path / "captions.json")
    if edit:
        edit(tree)
    return tree


def _build_custom(tree, tmp_path):
    builder = MVTecCaption(
        config_name="custom",
        data_dir=str(tree.root),
        captions=str(tree.captions_path),
        cache_dir=str(tmp_path / "cache"),
    )
    builder.download_and_prepare()


def test_defect_folder_without_masks_is_named(tmp_path):
    tree = _custom(
        tmp_path, lambda t: shutil.rmtree(t.root / "flange_plate" / "ground_truth" / "missing_bolt")
    )
    with pytest.raises(
        MVTecCaptionError,
        match=r"flange_plate/missing_bolt: mask folder .*ground_truth/missing_bolt is missing",
    ):
        _build_custom(tree, tmp_path)


def test_missing_mask_of_one_image_is_named(tmp_path):
    tree = _custom(
        tmp_path, lambda t: (t.root / "gizmo" / "ground_truth" / "dent" / "dent_10_mask.png").unlink()
    )
    with pytest.raises(
        MVTecCaptionError, match=r"gizmo/dent image .*dent_10\.jpg \(3 of 5\): mask is missing"
    ):
        _build_custom(tree, tmp_path)


def test_caption_list_of_the_wrong_length_is_named(tmp_path):
    tree = _custom(tmp_path)
    data = json.loads(tree.captions_path.read_text())
    data["gizmo"]["dent"].pop()
    tree.captions_path.write_text(json.dumps(data))
    with pytest.raises(MVTecCaptionError, match=r"gizmo/dent: 4 captions but 5 images in .*test/dent"):
        _build_custom(tree, tmp_path)


def test_captions_naming_a_missing_image_or_category_are_named(tmp_path):
    tree = _custom(tmp_path)
    data = json.loads(tree.captions_path.read_text())
    data["gizmo"]["burr-mark"]["burr-mark_99.jpg"] = data["gizmo"]["burr-mark"].pop("burr-mark_2.jpg")
    tree.captions_path.write_text(json.dumps(data))
    with pytest.raises(
        MVTecCaptionError, match=r"gizmo/burr-mark: the captions file .* names 'burr-mark_99\.jpg'"
    ):
        _build_custom(tree, tmp_path)
    data = json.loads(tree.captions_path.read_text())
    data["sprocket"] = {"crack": ["a crack"]}
    tree.captions_path.write_text(json.dumps(data))
    with pytest.raises(MVTecCaptionError, match=r"names categories \['sprocket'\]"):
        _build_custom(tree, tmp_path)


def test_category_without_train_good_is_refused_on_the_command_line(tmp_path):
    tree = _custom(tmp_path, lambda t: shutil.rmtree(t.root / "flange_plate" / "train"))
    output = tmp_path / "out"
    argv = ["build", "--config", "custom", "--data-dir", str(tree.root), "--captions", str(tree.captions_path),
            "--output", str(output), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert_refused(main, argv, ["'flange_plate'", "train/good"], [output, tree.root])
    assert_refused(main, [*argv[:-4], "--output", str(output), "--name", "ad"], "--name 'ad'", [output])


def test_size_mismatch_is_named(tmp_path):
    def shrink(t):
        mask = t.root / "flange_plate" / "ground_truth" / "Rust_Spot" / "Rust_Spot_2_mask.png"
        Image.open(mask).resize((10, 10)).save(mask)

    tree = _custom(tmp_path, shrink)
    with pytest.raises(
        MVTecCaptionError, match=r"flange_plate/Rust_Spot: mask .*Rust_Spot_2_mask\.png is 10x10 but image"
    ):
        _build_custom(tree, tmp_path)


def test_training_runs_on_a_custom_build(export):
    from axf_pipeline.tiny import build_tiny_components, save_tiny_base
    from axf_pipeline.training import main as train_main
    from axf_pipeline.training.data import load_mvtec_caption, select_training_data

    root = export["root"]
    data = select_training_data(load_mvtec_caption(str(export["output"]), "mine", str(root / "cache")))
    # the generator fold: the first floor(n/3) of each defect type, human and template captions alike
    assert sorted(zip(data.train["category"], data.train["defect_type"], strict=True)) == sorted(
        (c, d) for c, defects in CUSTOM_CATEGORIES.items() for d in defects
    )
    assert len(data.normals) == 12
    words = {w.strip(".,").lower() for caption in data.train["caption"] for w in caption.split()}
    base, encoder = save_tiny_base(root / "tiny", build_tiny_components(words=words, scheduler="ddpm"))
    out = root / "run"
    argv = [
        "--pretrained_model_name_or_path", str(base), "--image_encoder", str(encoder),
        "--dataset_name", str(export["output"]), "--dataset_config", "mine", "--cache_dir", str(root / "cache"),
        "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "2", "--learning_rate", "1e-2",
        "--lora_rank", "2", "--validation_steps", "0", "--report_to", "none", "--max_train_steps", "2",
    ]  # fmt: skip
    assert train_main(argv) == 0
    assert (out / "model_index.json").is_file()


def test_evaluation_runs_on_a_custom_build(export, tmp_path):
    from axf_pipeline.evaluation.cli import main as evaluate_main

    out = tmp_path / "report"
    code = evaluate_main(
        [
            "--real", str(export["output"]), "--real-config", "mine",
            "--generated", f"real-generator-fold={export['output']}", "--generated-config", "mine",
            "--output", str(out), "--metrics", "localization",
            "--resolution", "32", "--classifier-resolution", "64", "--epochs", "1", "--classifier-epochs", "1",
            "--unet-channels", "4", "--unet-depth", "2", "--random-backbones", "--no-progress",
            "--batch-size", "3",  # 9 and 6 anomalies: no batch of one (BatchNorm refuses it)
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]["real-generator-fold"]) == set(CUSTOM_CATEGORIES)


def test_mask_without_its_image_is_named(tmp_path):
    def orphan(t):
        gt = t.root / "gizmo" / "ground_truth" / "dent"
        shutil.copy(gt / "dent_1_mask.png", gt / "dent_7_mask.png")

    tree = _custom(tmp_path, orphan)
    with pytest.raises(
        MVTecCaptionError, match=r"gizmo/dent: mask .*dent_7_mask\.png has no image named dent_7\.\*"
    ):
        _build_custom(tree, tmp_path)


def test_archive_with_a_top_folder_and_a_validation_split(tmp_path):
    from mvtec_caption.sample_tree import pack_tar_xz

    tree = make_custom_tree(tmp_path / "src" / "my_parts", tmp_path / "captions.json", n_validation=2)
    archive = pack_tar_xz(tmp_path / "src", tmp_path / "my_parts.tar.xz")  # members under my_parts/
    builder = MVTecCaption(
        config_name="custom",
        data_dir=str(archive),
        captions=str(tree.captions_path),
        cache_dir=str(tmp_path / "c"),
    )
    builder.download_and_prepare()
    ds = builder.as_dataset()
    assert sorted(ds) == ["test", "train", "validation"]
    assert ds["validation"].num_rows == 4 and not any(ds["validation"]["is_anomaly"])
    assert ds["test"][0]["path"] == "flange_plate/test/good/flange_plate_1.jpg"


def test_synthesis_runs_on_a_custom_build(export):
    from axf_pipeline import AnomalyXFusionPipeline
    from axf_pipeline.cli import main as axf_main
    from axf_pipeline.tiny import build_tiny_components

    root = export["root"]
    AnomalyXFusionPipeline(**build_tiny_components()).save_pretrained(root / "synth_model")
    out = root / "synthetic"
    argv = [
        "synthesize", "--model", str(root / "synth_model"), "--dataset", str(export["output"]),
        "--config", "mine", "--num-per-defect-type", "1", "--output", str(out), "--steps", "1",
        "--guidance-scale", "1", "--batch-size", "2", "--no-progress",
    ]  # fmt: skip
    assert axf_main(argv) == 0
    made = sorted(p.relative_to(out / "mvtec").as_posix() for p in (out / "mvtec").glob("*/test/*/*.png"))
    expected = {(c, d) for c, defects in CUSTOM_CATEGORIES.items() for d in defects}
    assert {(p.split("/")[0], p.split("/")[2]) for p in made if "/test/good/" not in p} == expected
