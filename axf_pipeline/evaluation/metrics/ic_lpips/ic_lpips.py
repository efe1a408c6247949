"""`evaluate` wrapper of axf_pipeline.evaluation.ic_lpips (intra-cluster pairwise LPIPS)."""

from collections import defaultdict

import datasets
import evaluate

from axf_pipeline.evaluation import ic_lpips

_DESCRIPTION = """IC-LPIPS (DFMGAN / AnomalyDiffusion): each generated image joins its nearest real anomaly
(centre) of the same defect type by LPIPS (VGG, v0.1, 256x256, [-1, 1]); clusters keep at most 50 members
(seeded sample); a cluster scores the mean LPIPS over its unique pairs; clusters under 2 members are left
out; a defect type scores the mean over its clusters and the category the mean over defect types."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated images (PIL images or image file paths).
    defect_types: the defect type of each generated image.
    centres: {defect_type: [real anomaly images of the generator fold]} (compute keyword).
    Any keyword of axf_pipeline.evaluation.ic_lpips (weights, max_cluster_size, small_clusters, seed,
    device, ...) is passed through.
Returns:
    ic_lpips (category score), per_defect_type (dict), real_score (bool).
Example:
    >>> metric = evaluate.load(metric_path("ic_lpips"))
    >>> metric.compute(predictions=images, defect_types=types, centres={"crack": real_cracks})
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class IcLpips(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Image(), "defect_types": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, defect_types, centres=None, **kwargs):
        if centres is None:
            raise ValueError("ic_lpips needs centres={defect_type: [real anomalies of the generator fold]}.")
        groups = defaultdict(list)
        for image, defect_type in zip(predictions, defect_types, strict=True):
            groups[defect_type].append(image)
        kwargs.setdefault("progress", False)
        result = ic_lpips(dict(groups), centres, **kwargs)
        return {
            "ic_lpips": result.score,
            "per_defect_type": result.per_defect_type,
            "real_score": result.real_score,
        }
