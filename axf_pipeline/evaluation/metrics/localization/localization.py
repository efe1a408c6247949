"""`evaluate` wrapper of axf_pipeline.evaluation.localization_metrics (pixel/image AUROC, AP, F1-max)."""

import datasets
import evaluate
import numpy as np

from axf_pipeline.evaluation import localization_metrics

_DESCRIPTION = """Pixel AUROC/AP/F1-max over all pixels of all test images and image AUROC/AP/F1-max with
the image score = max of the anomaly map after a 21x21 mean filter (DRAEM's protocol). F1-max is taken
from the exact precision-recall curve. Values are in [0, 1]."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: anomaly maps, one (H, W) float array per test image (higher = more anomalous).
    references: ground-truth masks, one (H, W) binary array per image ({0, 1} or {0, 255}).
    kernel_size: mean-filter size of the image score (default 21).
Returns:
    pixel_auroc, pixel_ap, pixel_f1_max, image_auroc, image_ap, image_f1_max (floats in [0, 1]).
Example:
    >>> metric = evaluate.load(metric_path("localization"))
    >>> metric.compute(predictions=maps, references=masks)["pixel_auroc"]
"""

_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "image_auroc", "image_ap", "image_f1_max")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Localization(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))),
                }
            ),
        )

    def _compute(self, predictions, references, kernel_size=21):
        maps = [np.asarray(p, dtype=np.float32) for p in predictions]
        masks = [np.asarray(r, dtype=np.uint8) for r in references]
        result = localization_metrics(maps, masks, kernel_size=kernel_size).to_dict()
        return {key: result[key] for key in _KEYS}
