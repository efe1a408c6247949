"""Synthetic anomalies as anomalib's ``Draem`` training source (axf_pipeline/integrations/anomalib.py): the
augmenter's outputs, bad sets, anomalib's data modules on an ``axf synthesize`` output, and a short
``Engine.fit`` + ``Engine.test`` through ``axf evaluate --detector anomalib-draem``. All on a toy set, offline."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from cli_checks import assert_refused

pytest.importorskip("anomalib")

from axf_pipeline import AnomalyXFusionPipeline  # noqa: E402
from axf_pipeline.cli import main  # noqa: E402
from axf_pipeline.demo.toy_data import CATEGORY, make_toy_tree  # noqa: E402
from axf_pipeline.integrations.anomalib import (  # noqa: E402
    SyntheticAnomalyAugmenter,
    draem_with_synthetic,
    load_synthetic,
)
from axf_pipeline.publishing import publishable_name  # noqa: E402
from axf_pipeline.tiny import build_tiny_components  # noqa: E402
from mvtec_caption import export_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PER_TYPE = 2  # synthetic anomalies per toy defect type (8 types)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy MVTec Caption export and the `axf synthesize` output of an untrained tiny pipeline on it."""
    root = tmp_path_factory.mktemp("anomalib")
    os.environ.setdefault("HF_HOME", str(root / "hf_home"))
    tree = make_toy_tree(
        root / "toy", anomalies_per_type=3, train_normals=5, test_normals=2, held_out_normals=0, seed=0
    )
    export_dataset("ad", tree.root, root / "export", tree.captions_path, cache_dir=root / "cache")
    AnomalyXFusionPipeline(**build_tiny_components()).save_pretrained(root / "model")
    code = main(
        [
            "synthesize", "--model", str(root / "model"), "--dataset", str(root / "export"), "--config", "ad",
            "--num-per-defect-type", str(PER_TYPE), "--output", str(root / "synthetic"), "--steps", "2",
            "--guidance-scale", "1", "--batch-size", "8", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    return root


@pytest.fixture(scope="module")
def pool(toy):
    return load_synthetic(toy / "synthetic", CATEGORY)


def test_core_package_never_imports_anomalib():
    code = (
        "import sys, axf_pipeline, axf_pipeline.synthesis, axf_pipeline.evaluation, axf_pipeline.evaluation.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('anomalib', 'lightning')))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_parquet_and_mvtec_folder_give_the_same_anomalies_with_provenance(toy, pool):
    folder = load_synthetic(toy / "synthetic" / "mvtec", CATEGORY)
    assert len(pool) == len(folder) == 8 * PER_TYPE
    assert pool.provenance["defect_types"] == folder.provenance["defect_types"]
    assert set(pool.provenance["defect_types"].values()) == {PER_TYPE}
    for p in (pool, folder):  # from the Parquet's columns / the card beside the folder; never a local path
        assert p.provenance["model"] == publishable_name(toy / "model") and p.provenance["seed"] == 0
    images = sorted(s.load_image().tobytes() for s in pool.samples)
    assert images == sorted(s.load_image().tobytes() for s in folder.samples)


def test_augmenter_pastes_a_synthetic_anomaly_with_its_own_mask(pool):
    images = torch.rand(64, 3, 32, 32)
    augmented, masks = SyntheticAnomalyAugmenter(pool, seed=0)(images)
    assert augmented.shape == images.shape and masks.shape == (64, 1, 32, 32)
    assert augmented.dtype == images.dtype == masks.dtype
    assert 0 <= augmented.min() and augmented.max() <= 1
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    pool_images, pool_masks = pool.tensors((32, 32))
    anomalous = masks.flatten(1).any(1)
    assert 0 < anomalous.sum() < 64
    for i in range(64):
        m = masks[i].bool()
        # outside the mask the normal image is untouched (DRAEM's reconstruction target stays right)
        assert torch.equal(augmented[i][:, ~m[0]], images[i][:, ~m[0]])
        if anomalous[i]:  # inside: the pixels of the very anomaly whose mask this is
            assert any(
                torch.equal(pool_masks[k], masks[i]) and torch.equal(augmented[i] * m, pool_images[k] * m)
                for k in range(len(pool))
            ), f"image {i}: pasted pixels and mask do not come from one synthetic anomaly"


def test_augmenter_resizes_like_draems_pre_processor(toy):
    """Synthetic anomalies reach DRAEM as anomalib's pre-processor would deliver the same file."""
    from anomalib.data.utils.image import read_image, read_mask
    from anomalib.models import Draem

    pool = load_synthetic(toy / "synthetic" / "mvtec", CATEGORY)
    transform = Draem.configure_pre_processor((64, 64)).transform
    images, masks = pool.tensors((64, 64))
    sample = pool.samples[3]
    from torchvision.tv_tensors import Mask

    expected_image, expected_mask = transform(
        read_image(sample.image, as_tensor=True)[None],
        Mask(read_mask(sample.mask, as_tensor=True)[None, None]),
    )
    assert torch.allclose(images[3], expected_image[0], atol=1e-6)
    assert torch.equal(masks[3].bool(), expected_mask[0].bool())
    augmented, out_masks = SyntheticAnomalyAugmenter(pool, probability=1.0, seed=0)(torch.rand(4, 3, 64, 64))
    assert out_masks.shape == (4, 1, 64, 64) and out_masks.flatten(1).any(1).all()


def _binomial_ok(count: int, n: int, p: float) -> bool:
    """Within 5 standard deviations of n·p (fails by chance about once in 3.5 million)."""
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("probability", [0.5, 0.2])
def test_anomaly_probability_within_binomial_bounds(pool, probability):
    augmenter = SyntheticAnomalyAugmenter(pool, probability=probability, seed=1)
    n = 0
    for _ in range(20):
        _, masks = augmenter(torch.rand(100, 3, 8, 8))
        n += int(masks.flatten(1).any(1).sum())
    assert _binomial_ok(n, 2000, probability), n
    assert augmenter.drawn["synthetic"] == n and augmenter.drawn["normal"] == 2000 - n


def test_mixed_mode_draws_the_rest_from_anomalibs_perlin(pool):
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

    torch.manual_seed(0)
    perlin = PerlinAnomalyGenerator(probability=1.0)
    augmenter = SyntheticAnomalyAugmenter(
        pool, probability=1.0, synthetic_fraction=0.5, perlin=perlin, seed=2
    )
    images = torch.rand(200, 3, 32, 32)  # anomalib's Perlin noise needs at least 32 px
    augmented, masks = augmenter(images)
    pool_masks = pool.tensors((32, 32))[1]
    from_pool = torch.tensor([any(torch.equal(masks[i], m) for m in pool_masks) for i in range(200)])
    assert masks.flatten(1).any(1).all()  # Perlin anomalies too carry their mask
    assert 0 <= augmented.min() and augmented.max() <= 1
    assert augmenter.drawn["synthetic"] + augmenter.drawn["perlin"] == 200
    assert _binomial_ok(augmenter.drawn["synthetic"], 200, 0.5)
    assert int(from_pool.sum()) >= augmenter.drawn["synthetic"]  # a Perlin mask may equal a square by chance
    assert int(from_pool.sum()) <= augmenter.drawn["synthetic"] + 5


def test_same_seed_same_anomalies_other_seed_others(pool):
    images = torch.rand(16, 3, 32, 32)

    def run(seed):
        augmenter = SyntheticAnomalyAugmenter(pool, seed=seed)
        return [augmenter(images) for _ in range(3)]

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c, strict=True))


def test_bad_sets_are_refused_naming_them(toy, tmp_path):
    with pytest.raises(ValueError, match=r"synthetic set synthetic has no anomalies of category 'bottle'"):
        load_synthetic(toy / "synthetic", "bottle")
    with pytest.raises(ValueError, match=r"no category 'bottle'.*\['tile'\]"):
        load_synthetic(toy / "synthetic" / "mvtec", "bottle")
    # a mask of another size than its image
    bad = tmp_path / "bad"
    shutil.copytree(toy / "synthetic" / "mvtec", bad / "mvtec")
    mask = next((bad / "mvtec" / CATEGORY / "ground_truth").rglob("*_mask.png"))
    PIL.Image.open(mask).resize((16, 16), PIL.Image.NEAREST).save(mask)
    with pytest.raises(ValueError, match=rf"{mask.name}.*16x16.*32x32"):
        load_synthetic(bad, CATEGORY)
    # an empty set: the category is there, its anomalies are not
    empty = tmp_path / "empty" / "mvtec" / CATEGORY
    (empty / "train" / "good").mkdir(parents=True)
    (empty / "test" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"synthetic set empty has no anomalies of category 'tile'"):
        load_synthetic(tmp_path / "empty", CATEGORY)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        draem_with_synthetic(tmp_path / "nowhere", CATEGORY, image_size=32)


def test_anomalib_mvtecad_datamodule_reads_the_mvtec_folder(toy):
    from anomalib.data import MVTecAD

    module = MVTecAD(
        root=toy / "synthetic" / "mvtec", category=CATEGORY, train_batch_size=2, eval_batch_size=4,
        num_workers=0, val_split_mode="same_as_test",
    )  # fmt: skip
    module.setup()
    test = module.test_data.samples
    anomalous = test[test.label_index == 1]
    assert len(anomalous) == 8 * PER_TYPE and len(test) == 8 * PER_TYPE + 1  # one held-out normal of five
    assert len(module.train_data.samples) == 4
    for image_path, mask_path in zip(anomalous.image_path, anomalous.mask_path, strict=True):
        image, mask = Path(image_path), Path(mask_path)
        assert mask.name == image.stem + "_mask.png" and mask.parent.name == image.parent.name
    batch = next(iter(module.test_dataloader()))
    assert batch.gt_mask is not None and batch.image.shape[-2:] == batch.gt_mask.shape[-2:]


def test_evaluate_detector_anomalib_draem_fits_and_tests_with_anomalibs_engine(toy, tmp_path):
    """Engine.fit + Engine.test for every row (stock, synthetic, 50/50, real fold, real + 1x): finite
    metrics, the table, the maps picture, and the record of seeds, provenance and mix in each run."""
    out = tmp_path / "report"
    code = main(
        [
            "evaluate", "--detector", "anomalib-draem", "--real", str(toy / "export"), "--real-config", "ad",
            "--generated", f"axf={toy / 'synthetic'}", "--output", str(out), "--resolution", "32",
            "--epochs", "1", "--batch-size", "5", "--ratios", "1", "--seed", "3", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]["axf"][CATEGORY]
    assert list(rows) == [
        "stock Draem (Perlin)", "axf", "axf 50/50 Perlin", "real generator fold", "real + 1x axf",
    ]  # fmt: skip
    for row in rows.values():
        assert set(row["metrics"]) >= {
            "image_AUROC",
            "pixel_AUROC",
            "pixel_AUPR",
            "image_F1Max",
            "pixel_F1Max",
        }
        assert all(math.isfinite(v) for v in row["metrics"].values())
    assert rows["axf"]["n_anomalies"] == 8 * PER_TYPE and rows["real generator fold"]["n_anomalies"] == 8
    assert rows["real + 1x axf"]["n_anomalies"] == 16
    record = rows["axf 50/50 Perlin"]["record"]
    assert (
        record["synthetic_fraction"] == 0.5 and record["augmenter_seed"] == 3 and record["global_seed"] == 3
    )
    assert record["synthetic_set"]["model"] == publishable_name(toy / "model")
    assert record["synthetic_set"]["seed"] == 0
    assert sum(record["drawn"].values()) == 5  # one epoch: one batch of the five real train normals
    assert str(tmp_path) not in (out / "report.json").read_text()
    written = sorted((out / "work" / "runs").rglob("synthetic_anomalies.json"))
    assert len(written) == 4 and json.loads(written[0].read_text())["category"] == CATEGORY
    assert "| axf 50/50 Perlin | 16 |" in (out / "report.md").read_text()
    picture = PIL.Image.open(out / f"maps_axf_{CATEGORY}.png")
    assert picture.size == (5 * 96, (8 + 2 + 1) * 96)  # image | truth | 3 maps; 8 types + 2 normals + titles
    assert np.asarray(picture).std() > 0


def test_evaluate_detector_anomalib_draem_refuses_bad_sets_before_training(toy, tmp_path):
    base = [
        "evaluate", "--detector", "anomalib-draem", "--real", str(toy / "export"), "--real-config", "ad",
        "--output", str(tmp_path / "out"), "--resolution", "32", "--epochs", "1",
    ]  # fmt: skip
    other = tmp_path / "other" / "mvtec" / "bottle" / "test" / "broken"
    other.mkdir(parents=True)
    assert_refused(main, [*base, "--generated", f"axf={other.parents[3]}"], ["other", "'tile'"], [tmp_path])
    assert_refused(main, base, "--generated", [tmp_path])
    assert_refused(main, [*base[:-4], "--resolution", "48", "--generated", "a=b"], "--resolution 48")
    with_synthetic = [*base, "--generated", f"axf={toy / 'synthetic'}"]
    assert_refused(main, [*with_synthetic, "--batch-size", "4"], ["--batch-size 4", "'tile'"], [tmp_path])
