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


def test_merge_every_bounds_the_pending_tables_and_merges_no_earlier():
    """``merge_every`` is the memory knob: the per-image tables are merged as soon as more than that many
    entries are pending (two or more tables), never before. Four images of 10 distinct scores each, none
    shared, so every table adds 10 entries and a merge keeps them all."""
    maps = np.arange(4 * 10, dtype=np.float32).reshape(4, 1, 10) / 40
    masks = np.zeros((4, 1, 10), np.uint8)
    masks[1, 0, 3] = masks[3, 0, 7] = 1
    merged_sizes = []
    real_merge = CurveCounts.merge.__func__

    def spy(cls, parts):
        merged_sizes.append(len(parts))
        return real_merge(cls, parts)

    want = localization_metrics(maps, masks).to_dict()
    for merge_every, sizes in [
        (20, [3, 2, 1]),  # 10, 20 (not more than 20), 30 -> merge 3; 30 + 10 -> merge 2; last: 1 table
        (5, [2, 2, 2, 1]),  # more than 5 after each image, but one table alone is never "merged"
        (40, [4]),  # 40 entries in the end: never more than 40 pending, one merge at the end
        (39, [4, 1]),  # 40 > 39 pending after the last image: merged in the loop, then nothing left to do
    ]:
        merged_sizes.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(CurveCounts, "merge", classmethod(spy))
            result = localization_metrics(maps, masks, merge_every=merge_every)
        assert merged_sizes == sizes, merge_every
        assert result.to_dict() == want
        assert result.pixel_counts.values.size == 40


def test_one_pixel_high_maps_and_a_lone_map_keep_their_images():
    """A leading axis of 1 is squeezed only where it is the channel of an (N, 1, H, W) batch or of one
    (1, H, W) map: maps one pixel high stay N images, a lone (H, W) map is one image."""
    rng = np.random.default_rng(2)
    rows = rng.random((4, 1, 30)).astype(np.float32)  # N = 4 images, each 1 x 30
    masks = np.zeros((4, 1, 30), np.uint8)
    masks[1, 0, 5:9] = masks[2, 0, 20:22] = 1
    rows[1, 0, 5:9] += 0.4
    want = localization_metrics(rows, masks)
    assert (want.n_images, want.n_anomalous_images, want.n_pixels) == (4, 2, 120)
    assert localization_metrics(list(rows), list(masks)).to_dict() == want.to_dict()  # (1, W) each
    assert localization_metrics(torch.tensor(rows), torch.tensor(masks)).to_dict() == want.to_dict()
    # the same maps as columns: the square window and the pixel pool do not care about the orientation
    columns = localization_metrics(rows.transpose(0, 2, 1), masks.transpose(0, 2, 1))
    assert columns.to_dict() == want.to_dict()
    # a lone (H, W) map is one image: refused for what it lacks, not for its shape
    maps, masks = _case()
    for form in (maps[1], torch.tensor(maps[1])):
        with pytest.raises(ValueError, match=r"^the test set has no normal image"):
            localization_metrics(form, masks[1])
    with pytest.raises(ValueError, match=r"^the test set has no anomalous image"):
        localization_metrics(maps[0], masks[0])


def test_tensors_with_bad_shapes_get_the_arrays_messages():
    maps, masks = _case()
    with pytest.raises(
        ValueError, match=r"^anomaly_maps must be \(N, H, W\) or \(N, 1, H, W\); got shape \(4, 2, 24, 24\)$"
    ):
        localization_metrics(torch.tensor(np.stack([maps, maps], 1)), masks)
    with pytest.raises(ValueError, match=r"^masks must be \(N, H, W\) or \(N, 1, H, W\); got shape \(24,\)$"):
        localization_metrics(maps, torch.tensor(masks[0, 0]))
    with pytest.raises(
        ValueError, match=r"^anomaly map 2 has shape \(24, 23\) but mask 2 has shape \(24, 24\)\.$"
    ):
        localization_metrics([maps[0], maps[1], maps[2][:, :-1], maps[3]], masks)


def test_integer_and_float64_maps_score_as_their_float32_values():
    """Quantised maps (uint8, 0-255) and float64 maps are read as float32, the precision the metrics compare
    in: the same numbers in any of these dtypes give identical results, the image score included."""
    maps, masks = _case()
    quantised = np.round(maps / maps.max() * 255).astype(np.uint8)
    want = localization_metrics(quantised.astype(np.float32), masks).to_dict()
    assert localization_metrics(quantised, masks).to_dict() == want
    assert localization_metrics(torch.tensor(quantised), masks).to_dict() == want
    assert image_scores(list(quantised)).tolist() == image_scores(list(quantised.astype(np.float32))).tolist()
    fine = maps.astype(np.float64) / 3  # not exactly representable: float32 rounding decides
    assert image_scores(list(fine)).tolist() == image_scores(list(fine.astype(np.float32))).tolist()
    assert (
        localization_metrics(fine, masks).to_dict()
        == localization_metrics(fine.astype(np.float32), masks).to_dict()
    )


def test_the_counts_a_result_carries_are_integer_counts():
    maps, masks = _case()
    result = localization_metrics(maps, masks)
    for counts in (result.pixel_counts, result.image_counts):
        assert counts.positives.dtype == np.int64 and counts.negatives.dtype == np.int64
        assert counts.values.dtype == np.float32
    single = CurveCounts.from_scores([0.2, 0.2, 0.5], [True, False, True])
    assert single.positives.dtype == np.int64 and single.negatives.dtype == np.int64
