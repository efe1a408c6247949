"""Pixel- and image-level AUROC, AP and F1-max, computed exactly as DRAEM / AnomalyDiffusion report them.

Pixel metrics pool every pixel of every test image. An image's score is the maximum of its anomaly map
after a 21×21 mean filter (DRAEM's ``avg_pool2d(map, 21, stride=1, padding=10)``): the window is
zero-padded at the border and always divided by 21·21 = 441 (``count_include_pad=True``), exactly as
DRAEM's reference evaluation does.

Exactness with bounded memory: the ROC and PR curves of a score array depend only on, for each distinct
score value, how many positive and negative pixels carry it. We therefore reduce the maps image by image
to ``(distinct float32 value, #positive, #negative)`` triples, merging them as we go, and hand those to
scikit-learn's curves as ``sample_weight``. The result is identical to calling scikit-learn on the raw
pixels (tested against brute force), while memory scales with the number of distinct float32 scores
plus one image rather than with the pixel count: for quantised maps (e.g. 256 levels) a 60×256² test set
needs ~1 % of raw scikit-learn's peak memory; for maps whose every pixel is a distinct float32 it is about
1.3× (benchmarks/bench_evaluation_localization.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "CurveCounts",
    "LocalizationResult",
    "binary_mask",
    "f1_max",
    "image_scores",
    "localization_metrics",
]

IMAGE_SCORE_KERNEL = 21


def binary_mask(mask, *, name: str = "mask") -> np.ndarray:
    """Return ``mask`` as a bool array; refuse anything but {0, 1} / {0, 255} / bool masks.

    Masks are ground truth: a soft or resized (interpolated) mask would silently move the threshold,
    so we refuse it and say which values we found.
    """
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    values = np.unique(arr)
    if values.size > 2 or not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = ", ".join(f"{v:g}" for v in values[:8].tolist()) + (" ..." if values.size > 8 else "")
        raise ValueError(
            f"{name} is not binary: found values [{shown}]; expected only {{0, 1}} or {{0, 255}}. "
            "Resize masks with nearest-neighbour interpolation and do not blur them."
        )
    return arr > 0


def image_scores(anomaly_maps: Iterable, kernel_size: int = IMAGE_SCORE_KERNEL) -> np.ndarray:
    """Per-image score: max of the map after a ``kernel_size``² mean filter (zero padding, /k², DRAEM)."""
    import torch
    import torch.nn.functional as F

    scores = []
    for amap in anomaly_maps:
        t = torch.as_tensor(np.asarray(amap, dtype=np.float32))[None, None]
        pooled = F.avg_pool2d(t, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
        scores.append(float(pooled.max()))
    return np.asarray(scores, dtype=np.float64)


@dataclass
class CurveCounts:
    """Scores reduced to distinct values with their positive/negative counts (sorted ascending)."""

    values: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray

    @classmethod
    def from_scores(cls, scores, labels) -> CurveCounts:
        scores = np.asarray(scores, dtype=np.float32).ravel()
        labels = np.asarray(labels, dtype=bool).ravel()
        values, inverse = np.unique(scores, return_inverse=True)
        positives = np.bincount(inverse, weights=labels, minlength=values.size).astype(np.int64)
        total = np.bincount(inverse, minlength=values.size).astype(np.int64)
        return cls(values, positives, total - positives)

    @classmethod
    def merge(cls, parts: Sequence[CurveCounts]) -> CurveCounts:
        if len(parts) == 1:
            return parts[0]
        values, inverse = np.unique(np.concatenate([p.values for p in parts]), return_inverse=True)
        positives = np.bincount(
            inverse, weights=np.concatenate([p.positives for p in parts]), minlength=values.size
        )
        negatives = np.bincount(
            inverse, weights=np.concatenate([p.negatives for p in parts]), minlength=values.size
        )
        return cls(values, positives.astype(np.int64), negatives.astype(np.int64))

    @property
    def n_positive(self) -> int:
        return int(self.positives.sum())

    @property
    def n_negative(self) -> int:
        return int(self.negatives.sum())

    def _weighted(self):
        """(y_true, y_score, sample_weight) for scikit-learn: one entry per (value, label) with a count."""
        pos, neg = self.positives > 0, self.negatives > 0
        y_true = np.concatenate([np.ones(int(pos.sum()), bool), np.zeros(int(neg.sum()), bool)])
        y_score = np.concatenate([self.values[pos], self.values[neg]])
        weight = np.concatenate([self.positives[pos], self.negatives[neg]]).astype(np.float64)
        return y_true, y_score, weight

    def roc_curve(self):
        from sklearn.metrics import roc_curve

        y_true, y_score, weight = self._weighted()
        return roc_curve(y_true, y_score, sample_weight=weight, drop_intermediate=False)

    def pr_curve(self):
        from sklearn.metrics import precision_recall_curve

        y_true, y_score, weight = self._weighted()
        return precision_recall_curve(y_true, y_score, sample_weight=weight)

    def metrics(self) -> dict[str, float]:
        from sklearn.metrics import average_precision_score, roc_auc_score

        y_true, y_score, weight = self._weighted()
        precision, recall, _ = self.pr_curve()
        return {
            "auroc": float(roc_auc_score(y_true, y_score, sample_weight=weight)),
            "ap": float(average_precision_score(y_true, y_score, sample_weight=weight)),
            "f1_max": f1_max(precision, recall),
        }


def f1_max(precision: np.ndarray, recall: np.ndarray) -> float:
    """Largest F1 over every threshold of an exact precision–recall curve (0/0 counts as 0)."""
    precision = np.asarray(precision, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


@dataclass
class LocalizationResult:
    """Metrics in [0, 1] plus the reduced curves (for plots) and the counts behind them."""

    pixel_auroc: float
    pixel_ap: float
    pixel_f1_max: float
    image_auroc: float
    image_ap: float
    image_f1_max: float
    n_images: int
    n_anomalous_images: int
    n_pixels: int
    n_anomalous_pixels: int
    pixel_counts: CurveCounts | None = field(default=None, repr=False)
    image_counts: CurveCounts | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("pixel_counts")
        out.pop("image_counts")
        return out


def _as_map_list(anomaly_maps, what: str) -> list:
    if isinstance(anomaly_maps, np.ndarray) or hasattr(anomaly_maps, "detach"):
        arr = np.asarray(anomaly_maps.detach().cpu() if hasattr(anomaly_maps, "detach") else anomaly_maps)
        if arr.ndim == 4 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(f"{what} must be (N, H, W) or (N, 1, H, W); got shape {arr.shape}")
        return list(arr)
    items = []
    for i, m in enumerate(anomaly_maps):
        m = np.asarray(m.detach().cpu() if hasattr(m, "detach") else m)
        m = m[0] if m.ndim == 3 and m.shape[0] == 1 else m
        if m.ndim != 2:
            raise ValueError(f"{what}[{i}] must be a 2-D (H, W) array; got shape {m.shape}")
        items.append(m)
    return items


def localization_metrics(
    anomaly_maps,
    masks,
    *,
    kernel_size: int = IMAGE_SCORE_KERNEL,
    merge_every: int = 4_000_000,
) -> LocalizationResult:
    """Pixel and image AUROC / AP / F1-max of anomaly maps against ground-truth masks.

    Args:
        anomaly_maps: (N, H, W) array/tensor or a sequence of (H, W) maps (sizes may differ per image).
            Higher means more anomalous. Scores are compared in float32.
        masks: matching binary masks ({0, 1}, {0, 255} or bool). An image is anomalous when its mask
            has any positive pixel.
        kernel_size: mean-filter size for the image score (21 in DRAEM's protocol).
        merge_every: merge the per-image score tables once this many entries are pending (memory knob;
            the result does not depend on it).
    """
    maps = _as_map_list(anomaly_maps, "anomaly_maps")
    gts = _as_map_list(masks, "masks")
    if len(maps) == 0:
        raise ValueError("anomaly_maps is empty: need the maps of the test images (good and anomalous).")
    if len(maps) != len(gts):
        raise ValueError(f"got {len(maps)} anomaly maps but {len(gts)} masks; they must pair one to one.")

    parts: list[CurveCounts] = []
    pending = 0
    image_labels = np.zeros(len(maps), dtype=bool)
    for i, (amap, gt) in enumerate(zip(maps, gts, strict=True)):
        if amap.shape != gt.shape:
            raise ValueError(f"anomaly map {i} has shape {amap.shape} but mask {i} has shape {gt.shape}.")
        if not np.isfinite(amap).all():
            raise ValueError(f"anomaly map {i} contains NaN or infinite values.")
        gt = binary_mask(gt, name=f"mask {i}")
        image_labels[i] = gt.any()
        parts.append(CurveCounts.from_scores(amap, gt))
        pending += parts[-1].values.size
        if pending > merge_every and len(parts) > 1:
            parts = [CurveCounts.merge(parts)]
            pending = parts[0].values.size
    pixel_counts = CurveCounts.merge(parts)

    n_anom = int(image_labels.sum())
    if n_anom == 0:
        raise ValueError(
            "the test set has no anomalous image (every mask is empty): AUROC is undefined; "
            "include the real anomalies of the evaluation fold."
        )
    if n_anom == len(maps):
        raise ValueError(
            "the test set has no normal image (every mask has positive pixels): image AUROC is undefined; "
            "include the good test images with empty masks."
        )
    image_counts = CurveCounts.from_scores(image_scores(maps, kernel_size).astype(np.float32), image_labels)
    pixel = pixel_counts.metrics()
    image = image_counts.metrics()
    return LocalizationResult(
        pixel_auroc=pixel["auroc"],
        pixel_ap=pixel["ap"],
        pixel_f1_max=pixel["f1_max"],
        image_auroc=image["auroc"],
        image_ap=image["ap"],
        image_f1_max=image["f1_max"],
        n_images=len(maps),
        n_anomalous_images=n_anom,
        n_pixels=pixel_counts.n_positive + pixel_counts.n_negative,
        n_anomalous_pixels=pixel_counts.n_positive,
        pixel_counts=pixel_counts,
        image_counts=image_counts,
    )
