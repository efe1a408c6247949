"""Localisation metrics: the input forms they accept, the scores' float32 comparison, the image-score window
at the border, and what a refusal says (the metric values themselves: test_evaluation_metrics.py)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from axf_pipeline.evaluation.localization import (
    CurveCounts,
    binary_mask,
    f1_max,
    image_scores,
    localization_metrics,
)


def _case():
    rng = np.random.default_rng(0)
    maps = rng.random((4, 24, 24)).astype(np.float32)
    masks = np.zeros((4, 24, 24), np.uint8)
    masks[1, 3:9, 4:12] = 255
    masks[3, 10:20, 10:14] = 255
    maps[1, 3:9, 4:12] += 0.5
    maps[3, 10:20, 10:14] += 0.3
    return maps, masks


def test_arrays_tensors_lists_and_channel_dims_give_the_same_result():
    maps, masks = _case()
    want = localization_metrics(maps, masks).to_dict()
    as_tensor = torch.tensor(maps, requires_grad=True)  # a model's output: detached, not refused
    forms = [
        (as_tensor, masks),
        (as_tensor[:, None], torch.tensor(masks)[:, None]),  # (N, 1, H, W)
        (maps[:, None], masks[:, None]),
        (list(as_tensor[:, None]), [torch.tensor(m)[None] for m in masks]),  # (1, H, W) each
        (list(maps), list(masks)),
    ]
    for m, g in forms:
        assert localization_metrics(m, g).to_dict() == want
    # one (H, W) map alone is one image
    single = localization_metrics(np.stack([maps[0], maps[1]]), np.stack([masks[0], masks[1]]))
    assert localization_metrics([maps[0], maps[1]], [masks[0], masks[1]]).to_dict() == single.to_dict()
    result = localization_metrics(maps, masks)
    assert (result.n_images, result.n_anomalous_images, result.n_pixels) == (4, 2, 4 * 24 * 24)
    assert result.n_anomalous_pixels == 48 + 40
    assert result.image_counts.n_positive == 2 and result.image_counts.n_negative == 2


def test_bad_shapes_and_values_are_named():
    maps, masks = _case()
    with pytest.raises(
        ValueError, match=r"^anomaly_maps must be \(N, H, W\) or \(N, 1, H, W\); got shape \(4, 2, 24, 24\)$"
    ):
        localization_metrics(np.stack([maps, maps], 1), masks)
    with pytest.raises(
        ValueError, match=r"^masks must be \(N, H, W\) or \(N, 1, H, W\); got shape \(4, 2, 24, 24\)$"
    ):
        localization_metrics(maps, np.stack([masks, masks], 1))
    with pytest.raises(
        ValueError, match=r"^masks\[1\] must be a 2-D \(H, W\) array; got shape \(2, 24, 24\)$"
    ):
        localization_metrics(list(maps), [masks[0], np.stack([masks[1]] * 2), masks[2], masks[3]])
    with pytest.raises(ValueError, match=r"^anomaly_maps\[0\] must be a 2-D"):
        localization_metrics([maps[0][None, None]], [masks[0]])
    soft = masks.copy()
    soft[2, 0, 0] = 7
    with pytest.raises(
        ValueError, match=r"^mask 2 is not binary: found values \[0, 7\]; expected only \{0, 1\} or"
    ):
        localization_metrics(maps, soft)
    bad = maps.copy()
    bad[3, 1, 1] = np.nan
    with pytest.raises(ValueError, match=r"^anomaly map 3 contains NaN or infinite values\.$"):
        localization_metrics(bad, masks)
    with pytest.raises(ValueError, match=r"^anomaly_maps is empty: need the maps of the test images"):
        localization_metrics([], [])
    with pytest.raises(
        ValueError, match=r"every mask is empty\): AUROC is undefined; include the real anomalies"
    ):
        localization_metrics(maps, np.zeros_like(masks))
    with pytest.raises(
        ValueError, match=r"image AUROC is undefined; include the good test images with empty masks"
    ):
        localization_metrics(maps, np.ones_like(masks))


def test_binary_mask_accepts_0_1_0_255_and_bool_and_lists_what_it_found():
    assert binary_mask(np.array([0, 1, 1])).tolist() == [False, True, True]
    assert binary_mask(np.array([0, 255])).tolist() == [False, True]
    assert binary_mask(np.array([True, False])).dtype == bool
    with pytest.raises(
        ValueError,
        match=r"^mask is not binary: found values \[0, 1, 255\]; .* Resize masks with "
        r"nearest-neighbour interpolation and do not blur them\.$",
    ):
        binary_mask(np.array([0, 1, 255]))
    eight = np.arange(8)
    with pytest.raises(ValueError, match=r"found values \[0, 1, 2, 3, 4, 5, 6, 7\]; expected"):
        binary_mask(eight, name="m")
    with pytest.raises(ValueError, match=r"found values \[0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5 \.\.\.\]; expected"):
        binary_mask(np.arange(9) / 2, name="m")


def test_scores_are_compared_in_float32_and_labels_are_booleans():
    a = np.float64(0.1)
    counts = CurveCounts.from_scores([a, a + 1e-12, 0.7], [1, 0, 255])  # equal in float32: one value
    assert counts.values.dtype == np.float32 and counts.values.size == 2
    assert counts.positives.tolist() == [1, 1] and counts.negatives.tolist() == [1, 0]
    merged = CurveCounts.merge([counts, CurveCounts.from_scores([0.7, 0.2], [0, 0])])
    assert merged.values.tolist() == pytest.approx([0.1, 0.2, 0.7])
    assert merged.positives.tolist() == [1, 0, 1] and merged.negatives.tolist() == [1, 1, 1]
    assert merged.positives.dtype == np.int64 and merged.negatives.dtype == np.int64


def test_roc_curve_of_counts_is_scikit_learns_on_the_raw_scores():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 60, 400).astype(np.float32)  # enough points for some to lie on a line
    labels = rng.random(400) < 0.3
    fpr, tpr, thresholds = CurveCounts.from_scores(scores, labels).roc_curve()
    want = roc_curve(labels, scores, drop_intermediate=False)
    for got, ref in zip((fpr, tpr, thresholds), want, strict=True):
        np.testing.assert_allclose(got, ref)


def test_f1_max_counts_small_precision_and_recall_and_zero_over_zero_as_zero():
    assert f1_max(np.array([0.4, 0.0]), np.array([0.4, 0.0])) == pytest.approx(0.4)
    assert f1_max([0.0, 0.0], [0.0, 0.0]) == 0.0


def test_image_score_window_counts_the_zero_padding_at_the_border():
    """DRAEM divides every window by 21 x 21, padding included: for a map of -1 the best window is a corner
    one with 11 x 11 pixels inside the image, scoring -121/441 (not -1, as a mean over the inside only)."""
    assert image_scores([-np.ones((30, 30))])[0] == pytest.approx(-121 / 441)
    assert image_scores([-np.ones((30, 30))], kernel_size=3)[0] == pytest.approx(-4 / 9)
    # the image score uses the kernel size it is given: a warm 5 x 5 defect against one hot pixel
    maps = np.zeros((2, 30, 30), np.float32)
    masks = np.zeros((2, 30, 30), bool)
    masks[0, 10:15, 10:15] = True
    maps[0, 10:15, 10:15] = 0.3  # anomalous: 0.3 * 25 / 441 after the window
    maps[1, 20, 20] = 0.9  # normal: 0.9 / 441
    assert localization_metrics(maps, masks).image_auroc == 1.0
    assert localization_metrics(maps, masks, kernel_size=1).image_auroc == 0.0  # the raw maximum
