"""Training drops the caption, the reference, or both, each with its own probability: the three branches of
two-condition guidance are each shown as often as asked."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from axf_pipeline.training.args import TrainingInputError, check_drop_probs, parse_args
from axf_pipeline.training.data import AnomalyTrainingDataset, draw_dropped_condition


def within_binomial_bounds(count: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


def tiny_anomaly_set(n: int = 6):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    rows = {"image": [], "mask": [], "caption": [], "category": [], "defect_type": []}
    for i in range(n):
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 8:20] = 255
        rows["image"].append(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        rows["mask"].append(Image.fromarray(mask))
        rows["caption"].append(f"a red spot {i}")
        rows["category"].append("tile")
        rows["defect_type"].append("red")
    features = Features(
        image=ImageFeature(), mask=ImageFeature(), caption=Value("string"),
        category=Value("string"), defect_type=Value("string"),
    )  # fmt: skip
    return Dataset.from_dict(rows, features=features)


def test_each_condition_is_dropped_with_its_own_probability_through_the_dataset():
    probs = {"caption": 0.2, "reference": 0.3, "both": 0.1}
    dataset = AnomalyTrainingDataset(
        tiny_anomaly_set(), 32, crop_jitter=0, random_flip=False,
        caption_drop_prob=probs["caption"], reference_drop_prob=probs["reference"], joint_drop_prob=probs["both"],
    )  # fmt: skip
    counts = {"caption": 0, "reference": 0, "both": 0, None: 0}
    n = 0
    for epoch in range(250):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            no_caption, no_reference = item["caption"] == "", not bool(item["has_reference"])
            kind = {(True, True): "both", (True, False): "caption", (False, True): "reference"}.get(
                (no_caption, no_reference)
            )
            counts[kind] += 1
            n += 1
            if not no_caption:
                assert item["caption"] == dataset._load(i)[2]  # the example's own caption when kept
    for kind, p in probs.items():
        assert within_binomial_bounds(counts[kind], n, p), (kind, counts[kind], n * p)
    assert within_binomial_bounds(counts[None], n, 1 - sum(probs.values()))


def test_the_draw_is_exclusive_and_deterministic_under_a_seed():
    draws = [draw_dropped_condition(np.random.default_rng(s), 0.25, 0.25, 0.25) for s in range(4000)]
    again = [draw_dropped_condition(np.random.default_rng(s), 0.25, 0.25, 0.25) for s in range(4000)]
    assert draws == again
    for kind in ("caption", "reference", "both", None):
        assert within_binomial_bounds(draws.count(kind), 4000, 0.25), kind
    assert set(draw_dropped_condition(np.random.default_rng(s), 0, 0, 0) for s in range(50)) == {None}
    assert set(draw_dropped_condition(np.random.default_rng(s), 0, 0, 1) for s in range(50)) == {"both"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--caption_drop_prob", "0.6", "--reference_drop_prob", "0.5"], "exceed 1"),
        (["--joint_drop_prob", "-0.1"], "--joint_drop_prob must be in"),
        (["--reference_drop_prob", "1.5"], "--reference_drop_prob must be in"),
        (["--reference_mismatch_prob", "1.5"], "--reference_mismatch_prob must lie in"),
    ],
)
def test_bad_dropout_probabilities_are_refused_by_name(flags, message):
    base = [
        "--pretrained_model_name_or_path",
        "x",
        "--image_encoder",
        "y",
        "--dataset_name",
        "z",
        "--output_dir",
        "o",
    ]
    with pytest.raises(TrainingInputError, match=message):
        parse_args(base + flags)
    with pytest.raises(TrainingInputError):
        check_drop_probs(0.5, 0.5, 0.5)
    assert check_drop_probs(0.2, 0.3, 0.5) == (0.2, 0.3, 0.5)


def two_type_set(per_type: int = 4):
    """Category ``tile`` with a red and a blue defect type whose images are flat red / flat blue."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rows = {"image": [], "mask": [], "caption": [], "category": [], "defect_type": []}
    for colour, rgb in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        for _ in range(per_type):
            mask = np.zeros((32, 32), np.uint8)
            mask[8:20, 8:20] = 255
            rows["image"].append(Image.fromarray(np.full((32, 32, 3), rgb, np.uint8)))
            rows["mask"].append(Image.fromarray(mask))
            rows["caption"].append(f"a {colour} spot")
            rows["category"].append("tile")
            rows["defect_type"].append(colour)
    features = Features(
        image=ImageFeature(), mask=ImageFeature(), caption=Value("string"),
        category=Value("string"), defect_type=Value("string"),
    )  # fmt: skip
    return Dataset.from_dict(rows, features=features)


@pytest.mark.parametrize("mismatch", [0.0, 0.5, 1.0])
def test_a_mismatched_reference_comes_only_with_both_conditions_and_at_its_rate(mismatch):
    dataset = AnomalyTrainingDataset(
        two_type_set(), 32, crop_jitter=0, random_flip=False, caption_drop_prob=0.2, reference_drop_prob=0.2,
        joint_drop_prob=0.1, reference_mismatch_prob=mismatch,
    )  # fmt: skip
    both = other = 0
    for epoch in range(60):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            own_is_red = dataset.group_of[i][1] == "red"
            ref_is_red = bool(item["reference"][0].mean() > item["reference"][2].mean())
            keeps_both = item["caption"] != "" and bool(item["has_reference"])
            if not keeps_both:  # a reference-only example must show its own type's reference
                assert ref_is_red == own_is_red
                continue
            both += 1
            other += ref_is_red != own_is_red
    assert within_binomial_bounds(other, both, mismatch), (other, both)
