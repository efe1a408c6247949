"""Evaluation metrics against independent brute-force references, offline (random backbones are marked)."""

import itertools

import numpy as np
import pytest
import torch

from axf_pipeline.evaluation import (
    MissingWeightsError,
    build_lpips,
    ic_lpips,
    image_scores,
    inception_score,
    localization_metrics,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*NOT A REAL SCORE")


# ----------------------------------------------------------------------------- brute-force references


def brute_auroc(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def brute_ap_f1(scores, labels):
    """AP = sum_k (R_k - R_{k-1}) P_k over descending distinct thresholds; F1-max over every threshold."""
    ap, prev_recall, best_f1 = 0.0, 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp = int((pred & labels).sum())
        fp = int((pred & ~labels).sum())
        fn = int((~pred & labels).sum())
        precision, recall = tp / (tp + fp), tp / labels.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
        best_f1 = max(best_f1, 2 * tp / (2 * tp + fp + fn))
    return ap, best_f1


def brute_image_score(amap, k=21):
    """Direct 21x21 window mean, zero outside the image, always divided by k*k (DRAEM's avg_pool2d)."""
    h, w = amap.shape
    r = k // 2
    best = -np.inf
    for y in range(h):
        for x in range(w):
            window = amap[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
            best = max(best, window.sum() / (k * k))
    return best


def _case(seed, n=6, shape=(22, 25), levels=None):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(n):
        mask = np.zeros(shape, np.uint8)
        if i % 2:
            y, x = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
            mask[y : y + rng.integers(2, 7), x : x + rng.integers(2, 7)] = 255
        amap = rng.random(shape) + 0.6 * (mask > 0) * rng.random()
        if levels:  # quantised scores: many ties across pixels and images
            amap = np.round(amap * levels) / levels
        maps.append(amap.astype(np.float32))
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize("seed,levels", [(0, None), (1, 7), (2, 3)])
def test_localization_metrics_match_brute_force(seed, levels):
    maps, masks = _case(seed, levels=levels)
    result = localization_metrics(maps, masks)
    scores = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    labels = np.concatenate([m.ravel() > 0 for m in masks])
    ap, f1 = brute_ap_f1(scores, labels)
    assert result.pixel_auroc == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
    assert result.pixel_ap == pytest.approx(ap, abs=1e-12)
    assert result.pixel_f1_max == pytest.approx(f1, abs=1e-12)
    img_scores = np.array([brute_image_score(m.astype(np.float64)) for m in maps]).astype(np.float32)
    img_labels = np.array([m.any() for m in masks])
    ap, f1 = brute_ap_f1(img_scores.astype(np.float64), img_labels)
    assert result.image_auroc == pytest.approx(brute_auroc(img_scores, img_labels), abs=1e-12)
    assert result.image_ap == pytest.approx(ap, abs=1e-12)
    assert result.image_f1_max == pytest.approx(f1, abs=1e-12)
    assert result.n_pixels == labels.size and result.n_anomalous_pixels == labels.sum()
    assert result.n_images == 6 and result.n_anomalous_images == 3


def test_merging_in_chunks_changes_nothing_and_keeps_only_distinct_values():
    maps, masks = _case(3, n=8, levels=50)
    whole = localization_metrics(maps, masks)
    chunked = localization_metrics(maps, masks, merge_every=10)
    assert whole.to_dict() == chunked.to_dict()
    distinct = np.unique(np.concatenate([m.ravel() for m in maps]))
    assert chunked.pixel_counts.values.size == distinct.size  # memory ~ distinct scores, not pixels


def test_image_score_pooling_matches_direct_window_means():
    rng = np.random.default_rng(4)
    for shape in [(25, 25), (40, 33), (10, 12)]:  # incl. a map smaller than the 21x21 window
        amap = rng.random(shape)
        amap[rng.integers(shape[0]), rng.integers(shape[1])] = (
            5.0  # a peak near a random spot, maybe a border
        )
        assert image_scores([amap])[0] == pytest.approx(brute_image_score(amap), rel=1e-6)
    assert image_scores([np.ones((30, 30))], kernel_size=3)[0] == pytest.approx(1.0)


def test_f1_max_is_exact_not_a_threshold_grid():
    # one positive pixel at a score a 21-step grid between min and max would never isolate exactly
    scores = np.linspace(0, 1, 1000, dtype=np.float32).reshape(1, 20, 50)
    mask = np.zeros((1, 20, 50), bool)
    mask.flat[-2] = True  # the second-highest score: best F1 = 2/3 (threshold at it takes 1 TP + 1 FP)
    mask_img = np.zeros((1, 20, 50), bool)
    maps = np.concatenate([scores, scores * 0])
    result = localization_metrics(maps, np.concatenate([mask, mask_img]))
    assert result.pixel_f1_max == pytest.approx(2 / 3)


def test_localization_bad_input_says_what_is_wrong():
    maps, masks = _case(5)
    with pytest.raises(ValueError, match="shape"):
        localization_metrics(maps, [m[:-1] for m in masks])
    soft = [m.astype(np.float32) / 255 * 0.7 for m in masks]
    with pytest.raises(ValueError, match="not binary"):
        localization_metrics(maps, soft)
    with pytest.raises(ValueError, match="no anomalous image"):
        localization_metrics(maps, [np.zeros_like(m) for m in masks])
    with pytest.raises(ValueError, match="no normal image"):
        localization_metrics(maps, [np.ones_like(m) for m in masks])
    with pytest.raises(ValueError, match="6 anomaly maps but 5 masks"):
        localization_metrics(maps, masks[:5])
    with pytest.raises(ValueError, match="empty"):
        localization_metrics([], [])


# ----------------------------------------------------------------------------- IC-LPIPS


def _flat(value, size=16):
    return np.full((size, size, 3), value, np.uint8)


def abs_distance(a, b):
    """|mean difference| of constant images: a known, hand-computable stand-in for LPIPS."""
    return (a - b).abs().mean(dim=(1, 2, 3))


def d(u, v):  # the distance of two flat images of grey levels u, v after scaling to [-1, 1]
    return abs(u - v) / 127.5


def test_ic_lpips_hand_made_clusters():
    gens = [_flat(v) for v in (10, 30, 50, 190, 170, 100)]
    centres = [_flat(0), _flat(200), _flat(100)]
    with pytest.warns(UserWarning, match="NOT A REAL SCORE"):
        res = ic_lpips(
            {"crack": gens}, {"crack": centres}, distance=abs_distance, progress=False, resolution=16
        )
    rows = res.clusters["crack"]
    assert [r["size"] for r in rows] == [3, 2, 1]
    c0 = (d(10, 30) + d(10, 50) + d(30, 50)) / 3
    c1 = d(190, 170)
    assert rows[0]["score"] == pytest.approx(c0) and rows[1]["score"] == pytest.approx(c1)
    assert rows[2]["score"] is None  # fewer than 2 members: left out
    assert res.score == pytest.approx((c0 + c1) / 2)
    assert res.real_score is False
    zero = ic_lpips(
        {"crack": gens},
        {"crack": centres},
        distance=abs_distance,
        progress=False,
        resolution=16,
        small_clusters="zero",
    )
    assert zero.score == pytest.approx((c0 + c1 + 0) / 3)


def test_ic_lpips_category_is_mean_over_defect_types_and_cap_is_a_seeded_sample():
    gens = {"a": [_flat(v) for v in (10, 20, 40, 80, 160)], "b": [_flat(v) for v in (0, 100)]}
    centres = {"a": [_flat(0)], "b": [_flat(50)]}
    kw = dict(distance=abs_distance, progress=False, resolution=16, max_cluster_size=3)
    res = ic_lpips(gens, centres, seed=1, **kw)
    row = res.clusters["a"][0]
    assert row["size"] == 5 and row["used"] == 3
    subset_means = [
        np.mean([d(u, v) for u, v in itertools.combinations(c, 2)])
        for c in itertools.combinations((10, 20, 40, 80, 160), 3)
    ]
    assert min(abs(row["score"] - m) for m in subset_means) < 1e-6
    assert res.per_defect_type["b"] == pytest.approx(d(0, 100))
    assert res.score == pytest.approx((row["score"] + d(0, 100)) / 2)
    assert ic_lpips(gens, centres, seed=1, **kw).score == res.score  # seeded
    scores = {ic_lpips(gens, centres, seed=s, **kw).per_defect_type["a"] for s in range(8)}
    assert len(scores) > 1  # the sample really depends on the seed


def test_ic_lpips_bad_input():
    kw = dict(distance=abs_distance, progress=False, resolution=16)
    with pytest.raises(ValueError, match="empty"):
        ic_lpips([], [_flat(0)], **kw)
    with pytest.raises(ValueError, match="no centres for defect type 'hole'"):
        ic_lpips({"hole": [_flat(1), _flat(2)]}, {"crack": [_flat(0)]}, **kw)
    with pytest.raises(ValueError, match="at least 2 members"):
        ic_lpips({"hole": [_flat(1), _flat(2)]}, {"hole": [_flat(0), _flat(3)]}, **kw)


@pytest.fixture(scope="module")
def random_lpips():
    model, _ = build_lpips("vgg", random_backbone=True)
    return model


def test_ic_lpips_real_lpips_model_zero_for_identical_and_grows_with_diversity(random_lpips):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (32, 32, 3)).astype(np.float64)
    centre = [base.astype(np.uint8)]

    def spread(noise):
        return [np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8) for _ in range(4)]

    kw = dict(distance=random_lpips, progress=False, resolution=32)
    same = ic_lpips([base.astype(np.uint8)] * 4, centre, **kw).score
    low, high = ic_lpips(spread(5), centre, **kw).score, ic_lpips(spread(60), centre, **kw).score
    assert same == pytest.approx(0.0, abs=1e-6)
    assert 0 < low < high


def test_ic_lpips_runs_the_backbone_once_per_image_with_the_values_of_pairwise_lpips(random_lpips):
    """Same clusters and scores (1e-6) as lpips.LPIPS(a, b) on every pair, but each image's VGG features once."""
    rng = np.random.default_rng(3)
    res = 16
    centres = [rng.integers(0, 256, (res, res, 3), dtype=np.uint8) for _ in range(3)]
    gens = [
        np.clip(centres[i % 3] + rng.normal(0, 40, (res, res, 3)), 0, 255).astype(np.uint8) for i in range(8)
    ]

    def unit(images):
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)

    with torch.no_grad():  # the reference: the lpips package's own forward, image pair by image pair
        g, c = unit(gens), unit(centres)
        to_centre = np.array(
            [[random_lpips(g[i : i + 1], c[j : j + 1]).item() for j in range(3)] for i in range(8)]
        )
        nearest = to_centre.argmin(1)
        expected = []
        for k in range(3):
            members = np.flatnonzero(nearest == k)
            pair_d = [
                random_lpips(g[i : i + 1], g[j : j + 1]).item() for i, j in itertools.combinations(members, 2)
            ]
            expected.append(np.mean(pair_d) if len(members) >= 2 else None)
    images_through_backbone = []
    hook = random_lpips.net.slice1.register_forward_hook(
        lambda m, x, out: images_through_backbone.append(len(x[0]))
    )
    try:
        kw = dict(distance=random_lpips, progress=False, resolution=res, max_cluster_size=None, batch_size=4)
        got = ic_lpips(gens, centres, **kw)
        n_default = sum(images_through_backbone)
        tight = ic_lpips(gens, centres, feature_memory_gb=1e-6, **kw)  # one image per block: recomputes
    finally:
        hook.remove()
    assert [r["size"] for r in got.clusters["all"]] == np.bincount(nearest, minlength=3).tolist()
    for result in (got, tight):
        for row, want in zip(result.clusters["all"], expected, strict=True):
            assert (row["score"] is None) == (want is None)
            if want is not None:
                assert abs(row["score"] - want) < 1e-6
    used = sum(r["used"] for r in got.clusters["all"] if r["used"] >= 2)
    assert n_default == 1 + len(gens) + len(centres) + used  # a probe, each image once per phase
    assert sum(images_through_backbone) > n_default


def test_ic_lpips_random_backbone_is_marked_and_missing_weights_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"vgg16-397923af\.pth.*hub.checkpoints"):
        ic_lpips([_flat(1), _flat(2)], [_flat(0)], progress=False)
    with pytest.warns(UserWarning, match="NOT A REAL SCORE"):
        res = ic_lpips([_flat(1), _flat(2)], [_flat(0)], random_backbone=True, progress=False, resolution=32)
    assert res.real_score is False and res.to_dict()["label"].startswith("NOT A REAL SCORE")


def test_lpips_vgg_weights_load_from_safetensors(tmp_path, random_lpips):
    from safetensors.torch import save_file

    # a torchvision-style VGG-16 `features.<i>.<param>` file with distinct values, from the random model
    features = {f"features.{k.split('.', 1)[1]}": v + 1.0 for k, v in random_lpips.net.state_dict().items()}
    path = tmp_path / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in features.items()}, str(path))
    model, source = build_lpips("vgg", weights=path)
    assert source == str(path)
    assert torch.equal(model.net.slice3._modules["14"].weight, features["features.14.weight"])
    (tmp_path / "vgg16.pth").write_bytes(b"0")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        build_lpips("vgg", weights=tmp_path / "vgg16.pth")


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_protocol_marks_random_backbone_and_names_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    images = [np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8) for i in range(10)]
    with pytest.raises(
        MissingWeightsError, match=r"weights-inception-2015-12-05-6726825d\.pth.*hub.checkpoints"
    ):
        inception_score(images, progress=False)
    with pytest.raises(ValueError, match="empty"):
        inception_score([], random_backbone=True, progress=False)
    with pytest.raises(ValueError, match="10 splits"):
        inception_score(images[:5], random_backbone=True, progress=False)
    with pytest.warns(UserWarning, match="NOT A REAL SCORE"):
        res = inception_score(images, random_backbone=True, progress=False)
    assert res.real_score is False and res.n_images == 10 and res.splits == 10
    assert res.mean >= 1.0 - 1e-9  # an IS is at least 1 (exp of a KL divergence)


def test_inception_weights_load_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    from axf_pipeline.evaluation.generation import _inception_extractor

    random_model, _ = _inception_extractor(None, random_backbone=True)
    state = {k: v.contiguous() for k, v in random_model.state_dict().items()}
    save_file(state, str(tmp_path / "inception.safetensors"))
    loaded, source = _inception_extractor(tmp_path / "inception.safetensors", random_backbone=False)
    assert source.endswith("inception.safetensors")
    assert torch.equal(loaded.fc.weight, random_model.fc.weight)


# ----------------------------------------------------------------------------- evaluate modules


def test_evaluate_modules_load_offline_and_wrap_the_same_functions(tmp_path, monkeypatch):
    import evaluate

    from axf_pipeline.evaluation.metrics import metric_path

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    maps, masks = _case(6)
    metric = evaluate.load(metric_path("localization"), cache_dir=str(tmp_path))
    out = metric.compute(predictions=maps, references=[m // 255 for m in masks])
    direct = localization_metrics(maps, masks).to_dict()
    assert out == {k: direct[k] for k in out} and len(out) == 6

    il = evaluate.load(metric_path("ic_lpips"), cache_dir=str(tmp_path))
    from PIL import Image

    gens = [Image.fromarray(_flat(v)) for v in (10, 30, 50)]
    with pytest.warns(UserWarning, match="NOT A REAL SCORE"):
        res = il.compute(
            predictions=gens,
            defect_types=["crack"] * 3,
            centres={"crack": [_flat(0)]},
            distance=abs_distance,
            resolution=16,
        )
    assert res["ic_lpips"] == pytest.approx((d(10, 30) + d(10, 50) + d(30, 50)) / 3)
    assert res["real_score"] is False
