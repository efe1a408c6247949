"""Downstream harness, data sources and the evaluate command, end to end on a tiny generated dataset."""

import json

import datasets
import numpy as np
import pytest
import torch
from cli_checks import assert_refused
from PIL import Image

from axf_pipeline.evaluation import data as data_module
from axf_pipeline.evaluation import harness
from axf_pipeline.evaluation.cli import main as evaluate_main
from axf_pipeline.evaluation.data import RealData, Sample, load_anomalies, load_anomaly_folder
from axf_pipeline.evaluation.downstream import (
    classification_accuracy,
    evaluate_localization,
    train_classifier,
    train_localization,
)
from axf_pipeline.evaluation.harness import HarnessOptions, evaluate_generators

pytestmark = pytest.mark.filterwarnings("ignore:.*NOT A REAL SCORE")


SIZE = 32
DEFECTS = ("spot", "scratch")


def _normal(rng):
    return np.clip(110 + rng.normal(0, 8, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _anomaly(rng, defect):
    """spot: a bright square; scratch: a dark horizontal bar. Learnable in a few epochs."""
    image, mask = _normal(rng), np.zeros((SIZE, SIZE), np.uint8)
    y, x = rng.integers(4, SIZE - 12, 2)
    if defect == "spot":
        mask[y : y + 8, x : x + 8] = 255
        image[mask > 0] = 240
    else:
        mask[y : y + 3, x - 2 : x + 12] = 255
        image[mask > 0] = 15
    return image, mask


def _rows(rng, category, n_train=6, n_good=4, n_generator=2, n_evaluation=3):
    train = [
        (_normal(rng), np.zeros((SIZE, SIZE), np.uint8), category, "good", False, "") for _ in range(n_train)
    ]
    test = [
        (_normal(rng), np.zeros((SIZE, SIZE), np.uint8), category, "good", False, "") for _ in range(n_good)
    ]
    for defect in DEFECTS:
        for fold, n in (("generator", n_generator), ("evaluation", n_evaluation)):
            test += [(*_anomaly(rng, defect), category, defect, True, fold) for _ in range(n)]
    return train, test


def _to_dataset(rows):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "caption": datasets.Value("string"),
            "category": datasets.Value("string"),
            "defect_type": datasets.Value("string"),
            "is_anomaly": datasets.Value("bool"),
            "fold": datasets.Value("string"),
        }
    )
    cols = {k: [] for k in features}
    for image, mask, category, defect, is_anomaly, fold in rows:
        cols["image"].append(Image.fromarray(image))
        cols["mask"].append(Image.fromarray(mask, mode="L"))
        cols["caption"].append(f"a {defect} on a {category}")
        cols["category"].append(category)
        cols["defect_type"].append(defect)
        cols["is_anomaly"].append(is_anomaly)
        cols["fold"].append(fold)
    return datasets.Dataset.from_dict(cols, features=features)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    train, test = _rows(rng, "widget")
    path = tmp_path_factory.mktemp("real") / "mvtec_caption"
    datasets.DatasetDict({"train": _to_dataset(train), "test": _to_dataset(test)}).save_to_disk(str(path))
    return path


def _write_generated(root, category="widget", per_type=6, seed=1):
    rng = np.random.default_rng(seed)
    for defect in DEFECTS:
        folder = root / category / defect
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_type):
            image, mask = _anomaly(rng, defect)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
            Image.fromarray(mask).save(folder / f"{i:03d}_mask.png")
    return root


def test_real_data_splits_and_folder_source(real_dir, tmp_path):
    real = RealData(real_dir)
    assert real.categories == ["widget"]
    assert len(real.normals("widget")) == 6
    test = real.test_set("widget")
    assert len(test) == 4 + 2 * 3 and sum(s.is_anomaly for s in test) == 6  # good + evaluation fold only
    assert len(real.centres("widget")) == 4 and real.defect_types("widget") == ["scratch", "spot"]
    with pytest.raises(ValueError, match="no category 'bolt'"):
        real.test_set("bolt")
    generated = load_anomalies(_write_generated(tmp_path / "gen", per_type=2))
    assert (
        sorted((s.category, s.defect_type) for s in generated)
        == [("widget", "scratch")] * 2 + [("widget", "spot")] * 2
    )
    assert generated[0].load_mask().any()
    (tmp_path / "gen" / "widget" / "spot" / "009.png").write_bytes(
        (tmp_path / "gen/widget/spot/000.png").read_bytes()
    )
    with pytest.raises(FileNotFoundError, match="009.png has no mask 009_mask.png"):
        load_anomaly_folder(tmp_path / "gen")


def test_localization_harness_learns_from_synthetic_pairs(real_dir, tmp_path):
    real = RealData(real_dir)
    synthetic = load_anomalies(_write_generated(tmp_path / "gen", per_type=8))
    model = train_localization(
        real.normals("widget"), synthetic, resolution=SIZE, epochs=30, batch_size=8, lr=3e-3,
        base_channels=8, depth=3, progress=False,
    )  # fmt: skip
    result = evaluate_localization(model, real.test_set("widget"), resolution=SIZE)
    assert result.n_images == 10 and result.n_anomalous_images == 6
    assert result.pixel_auroc > 0.9 and result.image_auroc > 0.9  # chance would be ~0.5


class _BrightnessClassifier(torch.nn.Module):
    """Predicts 'spot' (index 1) when the image is brighter than its mean, deterministic and known."""

    def forward(self, x):
        bright = (x.amax(dim=(1, 2, 3)) > 1.5).float()
        return torch.stack([1 - bright, bright], 1)


def test_classification_accuracy_counts_every_test_image():
    rng = np.random.default_rng(3)
    test = [
        Sample(*_anomaly(rng, d), "widget", d, f"t{i}") for i, d in enumerate(["spot"] * 4 + ["scratch"] * 3)
    ]
    test[0].image = _normal(rng)  # a spot the brightness rule misses: 6 of 7 right
    for batch_size in (1, 3, 7, 16):  # 7 is not a multiple of 3: a last-batch-only count would differ
        res = classification_accuracy(
            _BrightnessClassifier(), test, ["scratch", "spot"], resolution=SIZE, batch_size=batch_size
        )
        assert (res.n_correct, res.n_total) == (6, 7)
        assert res.accuracy == pytest.approx(6 / 7)
        assert res.per_defect_type == {"scratch": 1.0, "spot": pytest.approx(0.75)}
    with pytest.raises(ValueError, match=r"not among the classes"):
        classification_accuracy(_BrightnessClassifier(), test, ["spot", "hole"], resolution=SIZE)


def test_resnet34_classifier_trains_on_synthetic_anomalies(real_dir, tmp_path):
    real = RealData(real_dir)
    synthetic = load_anomalies(_write_generated(tmp_path / "gen", per_type=6))
    with pytest.raises(ValueError, match=r"no synthetic anomalies of defect type\(s\) \['hole'\]"):
        train_classifier(synthetic, ["hole", "scratch", "spot"], resolution=SIZE, epochs=1, progress=False)
    model = train_classifier(
        synthetic, ["scratch", "spot"], resolution=SIZE, epochs=4, lr=1e-3, progress=False
    )
    res = classification_accuracy(model, real.test_set("widget"), ["scratch", "spot"], resolution=SIZE)
    assert res.n_total == 6 and res.accuracy >= 5 / 6


def test_harness_compares_generators_including_perlin_baseline(real_dir, tmp_path):
    real = RealData(real_dir)
    options = HarnessOptions(
        metrics=("ic_lpips", "localization"), resolution=SIZE, epochs=2, unet_channels=4, unet_depth=2,
        baseline_per_defect_type=3, random_backbones=True, lpips_resolution=SIZE, progress=False,
    )  # fmt: skip
    generated = {"mine": load_anomalies(_write_generated(tmp_path / "gen", per_type=3))}
    report, curves = evaluate_generators(real, generated, options)
    assert report["generators"] == ["mine", "perlin"]
    for g in ("mine", "perlin"):
        entry = report["results"][g]["widget"]
        assert entry["n_generated"] == 6
        assert entry["ic_lpips"]["real_score"] is False
        assert 0 <= entry["localization"]["pixel_auroc"] <= 1
    assert set(curves["widget"]) == {"mine", "perlin"}
    with pytest.raises(
        ValueError, match=r"generator 'empty' has no anomalies for category/categories \['widget'\]"
    ):
        evaluate_generators(real, {"empty": [s for s in generated["mine"] if s.category == "x"]}, options)


def test_cli_writes_json_markdown_and_plots(real_dir, tmp_path):
    gen = _write_generated(tmp_path / "gen", per_type=5)
    out = tmp_path / "report"
    (out / "plots").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")  # a user's files in --output stay as they are
    (out / "plots" / "mine.txt").write_text("mine too")
    (out / "report.json").write_text("{}")  # an older report is replaced
    code = evaluate_main(
        [
            "--real", str(real_dir), "--generated", f"mine={gen}", "--output", str(out),
            "--resolution", str(SIZE), "--classifier-resolution", "64", "--epochs", "2",
            "--classifier-epochs", "1", "--unet-channels", "4", "--unet-depth", "2",
            "--lpips-resolution", str(SIZE), "--random-backbones", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    entry = report["results"]["mine"]["widget"]
    assert set(entry) >= {"inception_score", "ic_lpips", "localization", "classification"}
    assert entry["inception_score"]["real_score"] is False and entry["classification"]["n_total"] == 6
    md = (out / "report.md").read_text()
    assert "NOT REAL SCORES" in md and "| mine, AUC-P |" in md and "## widget" in md
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "curves_widget.png" in pngs and "bars_auc_p.png" in pngs and "bars_acc.png" in pngs
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "plots" / "mine.txt").read_text() == "mine too"
    assert not list(out.rglob("*.tmp"))


# ---- bad input: one line, exit code 2, nothing written, before any compute (issue 11 items 8, 14) -------------
def _evaluate_argv(real_dir, gen, out, *extra):
    return [
        "--real", str(real_dir), "--generated", f"mine={gen}", "--output", str(out), "--resolution", str(SIZE),
        "--epochs", "1", "--classifier-epochs", "1", "--unet-channels", "4", "--unet-depth", "2",
        "--lpips-resolution", str(SIZE), "--random-backbones", "--no-progress", *extra,
    ]  # fmt: skip


def test_generated_masks_of_another_size_or_all_zero_are_refused(real_dir, tmp_path):
    gen = _write_generated(tmp_path / "gen", per_type=2)
    wrong_size = gen / "widget" / "spot" / "001_mask.png"
    mask = np.zeros((SIZE, SIZE + 8), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(wrong_size)
    out = tmp_path / "report"
    argv = _evaluate_argv(real_dir, gen, out)
    line = assert_refused(evaluate_main, argv, [str(wrong_size), "40x32", "32x32"], [gen, out])
    assert str(gen / "widget" / "spot" / "001.png") in line

    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(wrong_size)
    assert_refused(evaluate_main, argv, [str(wrong_size), "all zero"], [gen, out])
    # The same check for a dataset source of generated anomalies, named by its row.
    rows = _rows(np.random.default_rng(5), "widget", n_train=0, n_good=0)[1]
    rows[0] = (rows[0][0], np.zeros((SIZE, SIZE), np.uint8), *rows[0][2:])
    _to_dataset(rows).save_to_disk(str(tmp_path / "gen_ds"))
    argv = _evaluate_argv(real_dir, tmp_path / "gen_ds", out)
    assert_refused(evaluate_main, argv, [f"mask of {tmp_path / 'gen_ds'}[0]", "all zero"], [out])


@pytest.mark.parametrize(
    "extra, mentions",
    [
        (["--classifier-resolution", "32"], "--classifier-resolution must be at least 64, got 32"),
        (["--lpips-resolution", "8"], "--lpips-resolution must be at least 32"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--resolution", "36", "--unet-depth", "4"], "--resolution 36 must be a multiple of 8"),
        (["--generated", "mine=elsewhere"], "['mine'] given more than once"),
        (
            ["--baseline-per-defect-type", "2", "--generated", "perlin=elsewhere"],
            "'perlin' is the baseline's",
        ),
        (
            ["--inception-weights", "missing.safetensors"],
            "--inception-weights: weights file missing.safetensors",
        ),
        (["--device", "cuda:0" if not torch.cuda.is_available() else "nodevice"], "--device"),
        (["output-is-a-file"], "is a file"),
        (["report.json-is-a-folder"], "report.json is in the way"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(real_dir, tmp_path, monkeypatch, extra, mentions):
    def never(*args, **kwargs):
        raise AssertionError("data was read or evaluated before the arguments were checked")

    monkeypatch.setattr(harness, "evaluate_generators", never)
    monkeypatch.setattr(data_module, "RealData", never)
    gen = _write_generated(tmp_path / "gen", per_type=1)
    out = tmp_path / "report"
    if extra == ["output-is-a-file"]:
        out, extra = tmp_path / "report.txt", []
        out.write_text("a file of the user's")
    elif extra == ["report.json-is-a-folder"]:
        (out / "report.json").mkdir(parents=True)
        extra = []
    assert_refused(evaluate_main, _evaluate_argv(real_dir, gen, out, *extra), mentions, [tmp_path])


def test_report_is_replaced_atomically(tmp_path, monkeypatch):
    from axf_pipeline.evaluation import report as report_module

    out = tmp_path / "report"
    old = {
        "generators": ["g"],
        "categories": ["c"],
        "settings": {},
        "results": {"g": {"c": {"n_generated": 1}}},
    }
    report_module.write_report(old, {}, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    new = {**old, "results": {"g": {"c": {"n_generated": 2}}}}

    def failing_dumps(*args, **kwargs):  # the write of report.json fails half-way
        raise OSError("disk full")

    monkeypatch.setattr(report_module.json, "dumps", failing_dumps)
    with pytest.raises(OSError, match="disk full"):
        report_module.write_report(new, {}, out)
    assert json.loads((out / "report.json").read_bytes()) == old  # the old report, whole
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    report_module.write_report(new, {}, out)
    assert json.loads((out / "report.json").read_text()) == new and set(before) == {
        "report.json",
        "report.md",
    }


def test_missing_pretrained_backbone_is_refused_before_any_work(real_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no cached backbones
    monkeypatch.setattr(harness, "evaluate_generators", None)  # never reached
    gen = _write_generated(tmp_path / "gen", per_type=1)
    argv = [a for a in _evaluate_argv(real_dir, gen, tmp_path / "report") if a != "--random-backbones"]
    assert_refused(evaluate_main, argv, ["--inception-weights", "weights-inception-2015-12-05"], [tmp_path])
    argv += ["--metrics", "localization", "classification", "--classifier-weights", "hub"]
    assert_refused(evaluate_main, argv, ["--classifier-weights", "resnet34-b627a593.pth"], [tmp_path])
