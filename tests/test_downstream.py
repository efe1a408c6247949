"""The downstream detectors train on any number of synthetic anomalies."""

import numpy as np
from PIL import Image

from axf_pipeline.evaluation.data import Sample
from axf_pipeline.evaluation.downstream import train_classifier, train_localization


def _samples(n: int, defect_type: str) -> list[Sample]:
    """n random 32² images; anomalies carry a square mask, normals ("good") none."""
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    return [
        Sample(
            image=Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
            mask=None if defect_type == "good" else Image.fromarray(mask),
            category="toy",
            defect_type=defect_type,
        )
        for _ in range(n)
    ]


def test_a_last_batch_of_one_sample_trains_instead_of_crashing():
    # 3 anomalies in batches of 2 leave one sample for the last batch: BatchNorm cannot train on it.
    anomalies = _samples(2, "crack") + _samples(1, "hole")
    model = train_classifier(
        anomalies, ["crack", "hole"], resolution=32, epochs=1, batch_size=2, progress=False
    )
    assert model.fc.out_features == 2
    unet = train_localization(
        _samples(2, "good"), _samples(1, "crack"), resolution=32, epochs=1, batch_size=2,
        base_channels=4, depth=2, progress=False,
    )  # fmt: skip
    assert not unet.training
