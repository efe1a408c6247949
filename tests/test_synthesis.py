"""`axf synthesize` end to end on a tiny model and a small MVTec Caption export (no network): the dataset,
the MVTec folder, previews, no leakage, byte-identical results over 1 / 2 processes and a kill -9, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
from cli_checks import assert_refused

from axf_pipeline import AnomalyXFusionPipeline
from axf_pipeline.cli import main
from axf_pipeline.publishing import publishable_name
from axf_pipeline.synthesis.core import plan_batches
from axf_pipeline.synthesis.fingerprint import content_hash
from axf_pipeline.synthesis.plan import plan_items, select
from axf_pipeline.synthesis.source import SourceData
from axf_pipeline.tiny import build_tiny_components, stable_diffusion_pipeline
from mvtec_caption import export_dataset, make_sample_tree

REPO = Path(__file__).resolve().parents[1]
N = 2


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf_home"), OMP_NUM_THREADS="1"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    os.environ.setdefault("HF_HOME", str(root / "hf_home"))
    # bottle (object, 32 px) and grid (texture, grayscale); 5 train normals: the last is held out
    tree = make_sample_tree(
        root / "raw", "ad", categories=["bottle", "grid"], scale=32 / 900, n_train=5,
        captions_path=root / "captions.json",
    )  # fmt: skip
    export_dataset("ad", tree.root, root / "export", tree.captions_path, cache_dir=root / "cache")
    AnomalyXFusionPipeline(**build_tiny_components()).save_pretrained(root / "model")
    return root


def argv(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(root / "model"), "--dataset", str(root / "export"), "--config", "ad",
        "--num-per-defect-type", str(N), "--output", str(out), "--steps", "2", "--guidance-scale", "1",
        "--batch-size", "2", "--padding-mask-crop", "4", "--no-progress", *extra,
    ]  # fmt: skip


def item_files(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted((out / "mvtec").rglob("*.png"))
        if "/test/good/" not in p.as_posix() and "/train/" not in p.as_posix()
    }


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "out_one"
    assert main(["synthesize", *argv(setup, out)]) == 0
    return out


def test_output_is_a_dataset_with_provenance_that_loads_in_a_fresh_process(setup, reference):
    code = (
        "import json, sys, datasets, numpy as np\n"
        "ds = datasets.load_dataset(sys.argv[1])['train']\n"
        "print(json.dumps({'n': ds.num_rows, 'columns': ds.column_names, 'rows': [\n"
        "  {k: v for k, v in r.items() if k not in ('image', 'mask')} | {'image_mode': r['image'].mode,\n"
        "  'mask': np.asarray(r['mask']).tolist()} for r in ds]}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(reference)], env=_env(setup), capture_output=True, text=True,
        timeout=300, cwd=setup,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.splitlines()[-1])
    assert loaded["n"] == 4 * N  # bottle x2 types, grid x2 types
    assert set(loaded["columns"]) >= {
        "image", "mask", "caption", "category", "defect_type", "is_anomaly",
        "source_image", "reference", "mask_source", "seed", "model", "mask_fallback",
    }  # fmt: skip
    model_name = f"model@sha256:{content_hash(setup / 'model')[:12]}"  # no local path in provenance
    source = datasets.load_dataset(str(setup / "export"), "ad")
    test = source["test"].select_columns(["path", "fold", "caption", "defect_type"]).to_list()
    generator = {r["path"]: r for r in test if r["fold"] == "generator"}
    evaluation = {r["path"] for r in test if r["fold"] == "evaluation"}
    train_paths = source["train"]["path"]
    for row in loaded["rows"]:
        assert row["is_anomaly"] and row["image_mode"] == "RGB" and row["model"] == model_name
        assert isinstance(row["mask_fallback"], bool)
        # the mask in the dataset is exactly the one on disk, binary and not empty
        on_disk = np.asarray(
            PIL.Image.open(
                reference / row["path"].replace(".png", "_mask.png").replace("/test/", "/ground_truth/")
            )
        )
        assert np.array_equal(np.asarray(row["mask"], np.uint8), on_disk) and set(np.unique(on_disk)) == {
            0,
            255,
        }
        # no leakage: references, mask sources and captions come from the generator fold of the same type
        for key in ("reference", "mask_source"):
            assert row[key] in generator and row[key] not in evaluation
            assert generator[row[key]]["defect_type"] == row["defect_type"]
        assert row["caption"] in {
            g["caption"] for g in generator.values() if g["defect_type"] == row["defect_type"]
        }
        assert row["source_image"] in train_paths and row["source_image"].startswith(
            f"{row['category']}/train/good/"
        )
        assert not row["source_image"].endswith("004.png")  # the held-out normal is never a base
    card = (reference / "README.md").read_text()
    # the source is a generated sample tree: toy data, the project's licence; the model by name and hash
    assert (
        "license: apache-2.0" in card and "Toy data" in card and "| `bottle` | `broken_large` | 2 |" in card
    )
    assert f"| model | `{publishable_name(setup / 'model')}` |" in card and str(setup) not in card


def test_anomalies_keep_the_normal_outside_the_mask_and_change_inside(setup, reference):
    rows = datasets.load_dataset(str(reference))["train"]
    source = datasets.load_dataset(str(setup / "export"), "ad")["train"]
    by_path = {p: i for i, p in enumerate(source["path"])}
    changed_inside = 0
    for row in rows:
        image = np.asarray(row["image"]).astype(int)
        normal = np.asarray(source[by_path[row["source_image"]]]["image"].convert("RGB")).astype(int)
        mask = np.asarray(row["mask"]) > 0
        assert image.shape == normal.shape and mask.any()
        assert np.array_equal(image[~mask], normal[~mask])
        changed_inside += int(np.abs(image[mask] - normal[mask]).max() > 0)
    assert changed_inside == len(rows)


def test_mvtec_folder_layout_and_previews(setup, reference):
    mvtec = reference / "mvtec"
    for category, types in (("bottle", ("broken_large", "contamination")), ("grid", ("bent", "broken"))):
        assert sorted(p.name for p in (mvtec / category / "train" / "good").iterdir()) == [
            f"{i:03d}.png" for i in range(4)
        ]
        assert [p.name for p in (mvtec / category / "test" / "good").iterdir()] == ["000.png"]
        assert sorted(p.name for p in (mvtec / category / "test").iterdir()) == sorted(["good", *types])
        for defect in types:
            images = sorted(p.name for p in (mvtec / category / "test" / defect).iterdir())
            masks = sorted(p.name for p in (mvtec / category / "ground_truth" / defect).iterdir())
            assert images == [f"{k:03d}.png" for k in range(N)]
            assert masks == [f"{k:03d}_mask.png" for k in range(N)]
            preview = PIL.Image.open(reference / "previews" / category / f"{defect}.png")
            assert preview.height == 128 * N and preview.width == 3 * 128  # normal | mask | generated
    # the held-out normal is the 5th train normal of the source
    source = datasets.load_dataset(str(setup / "export"), "ad")["train"]
    fifth = next(r for r in source if r["path"] == "bottle/train/good/004.png")
    held = PIL.Image.open(mvtec / "bottle" / "test" / "good" / "000.png")
    assert np.array_equal(np.asarray(held.convert("RGB")), np.asarray(fifth["image"].convert("RGB")))


def test_rerun_resumes_skips_everything_and_changes_no_item(setup, reference, capsys):
    before = item_files(reference)
    assert main(["synthesize", *argv(setup, reference)]) == 0
    assert f"made 0, skipped {4 * N}" in capsys.readouterr().out
    assert item_files(reference) == before


def test_kill_9_then_rerun_gives_the_same_bytes(setup, reference):
    out = setup / "out_killed"
    cmd = [sys.executable, "-m", "axf_pipeline.synthesize", *argv(setup, out)]
    proc = subprocess.Popen(
        cmd, env=_env(setup), cwd=setup, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("mvtec/*/test/*/*.png")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = item_files(out)
    assert 0 < len(partial) < 2 * 4 * N, "the kill came too late to test a resume"
    assert not (out / "README.md").exists()  # no export before every item is done
    for name, data in partial.items():  # whatever is under a final name is complete
        assert data == item_files(reference)[name]
    (out / "mvtec" / "bottle" / "test" / "broken_large" / ".001.png.axf-tmp-99").write_bytes(b"half")
    proc = subprocess.run(cmd, env=_env(setup), cwd=setup, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert item_files(out) == item_files(reference)
    assert not list(out.rglob("*.axf-tmp-*"))


def test_two_processes_give_the_same_bytes(setup, reference):
    out = setup / "out_two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "axf_pipeline.synthesize", *argv(setup, out)]  # fmt: skip
    proc = subprocess.run(
        cmd,
        env={**_env(setup), "ACCELERATE_USE_CPU": "1"},
        cwd=setup,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert item_files(out) == item_files(reference)
    assert proc.stdout.count("axf synthesize: made") == 1  # one summary, from the main process
    assert f"made {4 * N}, skipped 0" in proc.stdout
    assert datasets.load_dataset(str(out))["train"].num_rows == 4 * N


def test_evaluate_reads_the_output_as_it_is(setup, reference, tmp_path):
    from axf_pipeline.evaluation.cli import main as evaluate_main

    out = tmp_path / "report"
    code = evaluate_main(
        [
            "--real", str(setup / "export"), "--real-config", "ad", "--categories", "bottle",
            "--generated", f"axf={reference}", "--output", str(out), "--metrics", "localization",
            "--resolution", "32", "--epochs", "1", "--unet-channels", "4", "--unet-depth", "2",
            "--random-backbones", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["results"]["axf"]["bottle"]["n_generated"] == 2 * N


def test_anomalib_folder_datamodule_reads_one_category(reference):
    pytest.importorskip("anomalib")
    from anomalib.data import Folder

    root = reference / "mvtec" / "bottle"
    module = Folder(
        name="bottle", root=root, normal_dir="train/good", abnormal_dir=["test/broken_large", "test/contamination"],
        normal_test_dir="test/good", mask_dir=["ground_truth/broken_large", "ground_truth/contamination"],
        train_batch_size=2, eval_batch_size=2, num_workers=0, val_split_mode="same_as_test",
    )  # fmt: skip
    module.setup()
    samples = module.test_data.samples
    anomalous = samples[samples.label_index == 1]
    assert len(anomalous) == 2 * N and len(samples) == 2 * N + 1
    for image_path, mask_path in zip(anomalous.image_path, anomalous.mask_path, strict=True):
        image, mask = Path(image_path), Path(mask_path)
        assert mask.name == image.stem + "_mask.png" and mask.parent.name == image.parent.name
    batch = next(iter(module.test_dataloader()))
    assert batch.gt_mask is not None and batch.image.shape[-2:] == batch.gt_mask.shape[-2:]


# ---------------------------------------------------------------- bad input: one line, nothing written
def _save_to_disk(setup: Path, name: str, edit) -> Path:
    source = datasets.load_dataset(str(setup / "export"), "ad")
    folder = setup / name
    if not folder.exists():
        edit(source).save_to_disk(str(folder))
    return folder


def test_bad_inputs_are_refused_naming_the_thing(setup, tmp_path):
    out = tmp_path / "out"
    base = argv(setup, out)

    def with_(flag, value, args=base):
        args = list(args)
        args[args.index(flag) + 1] = value
        return args

    components = build_tiny_components()
    stable_diffusion_pipeline(components).save_pretrained(tmp_path / "sd")

    def refused(args, mentions):
        return assert_refused(main, ["synthesize", *args], mentions, [tmp_path, setup / "export"])

    refused(with_("--model", str(tmp_path / "sd")), [str(tmp_path / "sd"), "mif"])
    refused(with_("--model", str(tmp_path / "nowhere")), str(tmp_path / "nowhere"))
    refused(with_("--num-per-defect-type", "0"), "--num-per-defect-type")
    refused([*base, "--categories", "bottel"], ["bottel", "bottle, grid"])
    refused([*base, "--defect-types", "dent"], ["dent", "bent, broken, broken_large, contamination"])
    refused(with_("--config", "loco"), "loco")
    refused([*base, "--texture-categories", "bottel"], ["--texture-categories", "bottel"])
    refused([*base, "--padding-mask-crop", "-1"], "--padding-mask-crop")

    no_fold = _save_to_disk(
        setup, "no_fold", lambda d: datasets.DatasetDict({s: d[s].remove_columns("fold") for s in d})
    )
    refused(with_("--dataset", str(no_fold)), ["fold", "test"])
    no_caption = _save_to_disk(
        setup, "no_caption", lambda d: datasets.DatasetDict({s: d[s].remove_columns("caption") for s in d})
    )
    refused(with_("--dataset", str(no_caption)), "caption")

    def drop_generator(d):
        fold = ["evaluation" if r["defect_type"] == "bent" and r["fold"] == "generator" else r["fold"]
                for r in d["test"].select_columns(["defect_type", "fold"]).to_list()]  # fmt: skip
        return datasets.DatasetDict(
            {"train": d["train"], "test": d["test"].remove_columns("fold").add_column("fold", fold)}
        )

    no_gen = _save_to_disk(setup, "no_generator", drop_generator)
    refused(with_("--dataset", str(no_gen)), ["grid/bent", "generator"])

    # an output folder with a file this command did not write: refused, the file left alone
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(base, [str(out), "notes.txt"])
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_with_other_settings_is_refused(setup, reference):
    assert_refused(main, ["synthesize", *argv(setup, reference, "--seed", "1")], ["seed"], [reference])
    stray = reference / "mvtec" / "bottle" / "test" / "broken_large" / "extra.png"
    stray.write_bytes(b"x")
    try:
        assert_refused(main, ["synthesize", *argv(setup, reference)], ["extra.png"], [reference])
    finally:
        stray.unlink()


def test_help_lists_every_flag_with_its_default(capsys):
    from axf_pipeline.synthesis.cli import main as synthesize_main

    with pytest.raises(SystemExit) as stop:
        synthesize_main(["--help"])
    assert stop.value.code == 0
    proc = capsys.readouterr()
    text = " ".join(proc.out.split())
    for flag in ("--model", "--dataset", "--config", "--num-per-defect-type", "--output", "--categories",
                 "--defect-types", "--seed", "--steps", "--guidance-scale", "--padding-mask-crop",
                 "--batch-size", "--dtype", "--prompt", "--no-reference", "--texture-categories"):  # fmt: skip
        assert flag in text
    assert "denoising steps (default: 50)" in text and "pipeline call (default: 8)" in text
    assert "accelerate launch -m axf_pipeline.synthesize" in text


def test_an_item_made_in_the_same_batch_is_the_same_bytes_whatever_else_is_made(setup, reference, tmp_path):
    """What holds: an item's bytes follow from its seed and the batch it is generated in (batched floating
    point). Made for a subset of categories in the same batches, it is the same bytes; in another batch
    composition (another --batch-size, or other items of its image size) its last bits may differ, which
    --batch-size 1 rules out (tests/test_synthesis_generate.py)."""
    source = SourceData(str(setup / "export"), "ad")

    def batches(categories):
        items = plan_items(source, select(source, categories, None), N, 0)
        return {tuple(items[i].image_path for i in batch) for batch in plan_batches(items, 2)}

    assert batches(["grid"]) <= batches(None)  # the premise: grid-only batches are batches of the full run
    out = tmp_path / "grid_only"
    assert main(["synthesize", *argv(setup, out, "--categories", "grid")]) == 0
    grid = {k: v for k, v in item_files(reference).items() if k.startswith("mvtec/grid/")}
    assert item_files(out) == grid
    other = tmp_path / "seed_1"
    assert main(["synthesize", *argv(setup, other, "--categories", "grid", "--seed", "1")]) == 0
    changed = [k for k, v in item_files(other).items() if v != grid[k]]
    assert len(changed) == len(grid)


def test_resume_follows_the_contents_of_model_and_dataset_not_their_paths(setup, reference, tmp_path, capsys):
    """A moved copy of the same model and data resumes; weights retrained in place or rows rebuilt under the
    same folder are refused in one line naming what changed, before anything is written."""
    import shutil

    import pyarrow.parquet as pq

    model, data = tmp_path / "model", tmp_path / "export"
    shutil.copytree(setup / "model", model)
    shutil.copytree(setup / "export", data)
    moved = [*argv(setup, reference)]
    moved[moved.index("--model") + 1], moved[moved.index("--dataset") + 1] = str(model), str(data)
    capsys.readouterr()
    assert main(["synthesize", *moved]) == 0
    assert f"made 0, skipped {4 * N}" in capsys.readouterr().out
    assert str(setup) not in (reference / ".axf-synthesis.json").read_text()  # the record names no path

    shard = sorted(p for p in data.rglob("*.parquet") if "test" in p.name)[0]
    original = shard.read_bytes()
    table = pq.read_table(shard)
    captions = table.column("caption").to_pylist()
    captions[0] = captions[0] + " (recaptioned)"
    pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption", [captions]), shard)
    assert_refused(
        main, ["synthesize", *moved], [str(reference), "content of --dataset changed"], [reference]
    )
    shard.write_bytes(original)

    weights = next((model / "unet").glob("*.safetensors"))
    raw = weights.read_bytes()
    weights.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert_refused(main, ["synthesize", *moved], [str(reference), "content of --model changed"], [reference])
