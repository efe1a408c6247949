"""Downstream harness, data sources and the evaluate command, end to end on a tiny generated dataset."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

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
    code = evaluate_main(
        [
            "--real", str(real_dir), "--generated", f"mine={gen}", "--output", str(out),
            "--resolution", str(SIZE), "--classifier-resolution", str(SIZE), "--epochs", "2",
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
