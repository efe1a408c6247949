"""Evaluation of synthetic anomalies: the paper's generation and downstream metrics, offline.

Reads images, masks, folders and ``datasets`` datasets only; it never imports the pipeline or the
training code, so any generator's output can be measured the same way.
"""

from .generation import ICLPIPSResult, InceptionScoreResult, build_lpips, ic_lpips, inception_score
from .localization import LocalizationResult, binary_mask, f1_max, image_scores, localization_metrics
from .weights import MissingWeightsError

__all__ = [
    "ICLPIPSResult",
    "InceptionScoreResult",
    "LocalizationResult",
    "MissingWeightsError",
    "binary_mask",
    "build_lpips",
    "f1_max",
    "ic_lpips",
    "image_scores",
    "inception_score",
    "localization_metrics",
]
