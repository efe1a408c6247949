"""Generation metrics of the paper's tables 1–2: Inception Score and IC-LPIPS.

* Inception Score follows torch-fidelity's protocol exactly: its TF-compatible InceptionV3 on the full
  images (resized to 299 inside the extractor), ``logits_unbiased``, 10 splits, samples shuffled with
  ``numpy.random.RandomState(2020)``; the score itself is torch-fidelity's ``isc_features_to_metric``.
* IC-LPIPS (intra-cluster pairwise LPIPS, DFMGAN / AnomalyDiffusion): LPIPS v0.1 from the ``lpips``
  package on 256×256 images scaled to [-1, 1], the same for generated images and centres. The backbone
  runs once per image and only the cheap per-layer comparison runs per pair (same values as
  ``lpips.LPIPS.forward``, which would run the backbone twice for every pair).
"""

from __future__ import annotations

import functools
import io
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .images import resize_rgb, to_rgb_uint8
from .weights import load_backbone_state_dict

__all__ = [
    "ICLPIPSResult",
    "InceptionScoreResult",
    "build_lpips",
    "ic_lpips",
    "inception_score",
]

NOT_REAL_LABEL = "NOT A REAL SCORE (random backbone or injected distance)"


def _tqdm(iterable, progress: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress, **kwargs)


# ----------------------------------------------------------------------------- Inception Score


@dataclass
class InceptionScoreResult:
    mean: float
    std: float
    n_images: int
    splits: int
    real_score: bool
    backbone: str

    @property
    def label(self) -> str:
        return "inception score" if self.real_score else NOT_REAL_LABEL

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


def _inception_extractor(weights, random_backbone: bool):
    """torch-fidelity's InceptionV3 with a state dict we read (safetensors / hub cache) or random weights."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _InceptionV3(FeatureExtractorInceptionV3):
        # torch-fidelity reads its weights with an unrestricted torch.load of a path or buffer it is given;
        # we hand it an empty buffer, keep the random init, and load the tensors we read ourselves.
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if not state_dict:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    if random_backbone:
        state_dict, source = None, "random InceptionV3"
    else:
        state_dict, source = load_backbone_state_dict("inception", weights)
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    model = _InceptionV3("inception-v3-compat", ["logits_unbiased"], feature_extractor_weights_path=empty)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval(), source


def inception_score(
    images: Sequence,
    *,
    weights=None,
    splits: int = 10,
    seed: int = 2020,
    batch_size: int = 32,
    device: str = "cpu",
    random_backbone: bool = False,
    progress: bool = True,
) -> InceptionScoreResult:
    """Inception Score of ``images`` (paths, PIL images, arrays or tensors) by torch-fidelity's protocol.

    Args:
        weights: a ``.safetensors`` copy of ``weights-inception-2015-12-05-6726825d.pth``; by default that
            file is read from the torch hub cache. Nothing is downloaded.
        splits, seed: torch-fidelity's ``isc_splits`` (10) and ``rng_seed`` (2020) for the shuffle.
        random_backbone: for tests only; the result then has ``real_score=False``.
    """
    import torch
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    images = list(images)
    if not images:
        raise ValueError("inception_score: the generated image set is empty.")
    if len(images) < splits:
        raise ValueError(
            f"inception_score: {len(images)} images cannot fill {splits} splits; pass more images."
        )
    model, source = _inception_extractor(weights, random_backbone)
    model.to(device)
    logits = []
    batch: list[np.ndarray] = []

    def flush():
        if batch:
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)
            with torch.no_grad():
                logits.append(model(x)[0].double().cpu())
            batch.clear()

    for i, image in enumerate(_tqdm(images, progress, desc="Inception Score")):
        rgb = to_rgb_uint8(image, name=f"images[{i}]")
        if batch and (rgb.shape != batch[0].shape or len(batch) == batch_size):
            flush()  # the extractor resizes each batch to 299; batch only same-sized full images
        batch.append(rgb)
    flush()
    out = isc_features_to_metric(torch.cat(logits), splits=splits, shuffle=True, rng_seed=seed)
    if random_backbone:
        warnings.warn(f"inception_score: {NOT_REAL_LABEL}", stacklevel=2)
    return InceptionScoreResult(
        mean=out[KEY_METRIC_ISC_MEAN],
        std=out[KEY_METRIC_ISC_STD],
        n_images=len(images),
        splits=splits,
        real_score=not random_backbone,
        backbone=source,
    )


# ----------------------------------------------------------------------------- IC-LPIPS

_LPIPS_BACKBONE = {"vgg": "vgg16", "alex": "alexnet"}


def build_lpips(net: str = "vgg", weights=None, random_backbone: bool = False):
    """``lpips.LPIPS`` v0.1 with its shipped linear layers and a backbone read offline (see weights.py)."""
    import lpips

    if net not in _LPIPS_BACKBONE:
        raise ValueError(f"lpips net {net!r} is not supported; choose one of {sorted(_LPIPS_BACKBONE)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for `pretrained=False`
        model = lpips.LPIPS(net=net, version="0.1", pnet_rand=True, verbose=False)
    source = f"random {net}"
    if not random_backbone:
        state_dict, source = load_backbone_state_dict(_LPIPS_BACKBONE[net], weights)
        features = {
            k.removeprefix("features."): v for k, v in state_dict.items() if not k.startswith("classifier.")
        }
        # lpips splits torchvision's `features` into slices that keep the layer indices: sliceK.<i>.<param>
        target = {}
        for key in model.net.state_dict():
            _, index, param = key.split(".")
            if f"{index}.{param}" not in features:
                raise ValueError(
                    f"{source} has no tensor features.{index}.{param}; is it a torchvision {net}?"
                )
            target[key] = features[f"{index}.{param}"]
        model.net.load_state_dict(target)
    return model.eval().requires_grad_(False), source


@dataclass
class ICLPIPSResult:
    """Category score (mean over defect types), per-defect-type scores and every cluster's details."""

    score: float
    per_defect_type: dict[str, float | None]
    clusters: dict[str, list[dict]] = field(repr=False)
    real_score: bool = True
    backbone: str = "vgg16"
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "IC-LPIPS" if self.real_score else NOT_REAL_LABEL

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label}


def _as_groups(images, what: str) -> dict[str, list]:
    if isinstance(images, Mapping):
        return {str(k): list(v) for k, v in images.items()}
    return {"all": list(images)}


def _lpips_tensor(images: list, resolution: int, what: str) -> np.ndarray:
    """(N, H, W, 3) uint8 at resolution × resolution; scaled to [-1, 1] per batch in `_features`."""
    return np.stack(
        [resize_rgb(to_rgb_uint8(im, name=f"{what}[{i}]"), resolution) for i, im in enumerate(images)]
    )


class _PairScorer:
    """A distance split in two: ``features`` of each image once, ``compare`` of two feature sets per pair.

    For an ``lpips.LPIPS`` model this is its ``forward`` (v0.1, not spatial) taken apart operation by
    operation, so every pair gets the same value while the backbone runs once per image, not twice per pair.
    Any other ``distance(a, b) -> (B,)`` keeps the image itself as its "feature" and runs per pair.
    """

    def __init__(self, distance):
        import lpips

        self.lpips = distance if isinstance(distance, lpips.LPIPS) else None
        if self.lpips is not None and (
            self.lpips.spatial or not self.lpips.lpips or self.lpips.version != "0.1"
        ):
            self.lpips = None  # other LPIPS variants: run them per pair, as given
        self.distance = distance

    def features(self, x):
        if self.lpips is None:
            return [x]
        import lpips

        outs = self.lpips.net.forward(self.lpips.scaling_layer(x))
        return [lpips.normalize_tensor(outs[k]) for k in range(self.lpips.L)]

    def compare(self, fa: list, fb: list):
        if self.lpips is None:
            return self.distance(fa[0], fb[0])
        from lpips.lpips import spatial_average

        val = 0
        for k in range(self.lpips.L):
            val += spatial_average(self.lpips.lins[k]((fa[k] - fb[k]) ** 2), keepdim=True)
        return val


def _unit_range(images: np.ndarray, device: str):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)


def _features(scorer: _PairScorer, images: np.ndarray, idx: np.ndarray, batch_size: int, device: str) -> list:
    import torch

    parts = []
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            parts.append(scorer.features(_unit_range(images[idx[start : start + batch_size]], device)))
    return [torch.cat(layer) for layer in zip(*parts, strict=True)]


def _pair_distances(
    scorer: _PairScorer,
    a: np.ndarray,
    b: np.ndarray,
    pairs: np.ndarray,
    batch_size: int,
    device: str,
    block: int,
) -> np.ndarray:
    """Distance of each ``(i, j)`` in ``pairs`` between ``a[i]`` and ``b[j]``.

    Features are computed per block of at most ``block`` images of each side and reused for every pair in
    the block; with ``a is b`` a block is shared by both sides. When a side fits in one block (the centres
    of a defect type, a cluster), each of its images goes through the backbone exactly once.
    """
    import torch

    same = a is b
    out = np.empty(len(pairs), dtype=np.float64)
    if same:
        a_ids = b_ids = np.union1d(pairs[:, 0], pairs[:, 1])
    else:
        a_ids, b_ids = np.unique(pairs[:, 0]), np.unique(pairs[:, 1])
    a_blocks = [a_ids[s : s + block] for s in range(0, len(a_ids), block)]
    b_blocks = a_blocks if same else [b_ids[s : s + block] for s in range(0, len(b_ids), block)]
    held: dict[tuple[str, int], list] = {}  # the current a block and the latest b block, no more
    current_a = None

    def feats(side: str, k: int) -> list:
        nonlocal current_a
        key = ("ab" if same else side, k)
        if key not in held:
            for old in [kk for kk in held if (kk == current_a) == (side == "a")]:
                del held[old]
            ids = (a_blocks if side == "a" else b_blocks)[k]
            held[key] = _features(scorer, a if side == "a" else b, ids, batch_size, device)
        if side == "a":
            current_a = key
        return held[key]

    a_block_of = np.searchsorted(a_ids, pairs[:, 0]) // block
    b_block_of = np.searchsorted(b_ids, pairs[:, 1]) // block
    for ka in range(len(a_blocks)):
        for kb in range(len(b_blocks)):
            here = np.flatnonzero((a_block_of == ka) & (b_block_of == kb))
            if not len(here):
                continue
            fa, fb = feats("a", ka), feats("b", kb)
            ra = np.searchsorted(a_blocks[ka], pairs[here, 0])
            rb = np.searchsorted(b_blocks[kb], pairs[here, 1])
            for start in range(0, len(here), batch_size):
                ia = torch.from_numpy(ra[start : start + batch_size]).to(device)
                ib = torch.from_numpy(rb[start : start + batch_size]).to(device)
                with torch.no_grad():
                    d = scorer.compare([f[ia] for f in fa], [f[ib] for f in fb])
                out[here[start : start + batch_size]] = d.reshape(len(ia)).double().cpu().numpy()
    return out


def _ic_lpips_groups(generated, centres, max_cluster_size, min_cluster_size, small_clusters):
    """The settings checked and the images grouped by defect type; every generated type needs centres."""
    if small_clusters not in ("skip", "zero"):
        raise ValueError(f"small_clusters must be 'skip' or 'zero'; got {small_clusters!r}")
    if min_cluster_size < 2:
        raise ValueError("min_cluster_size must be at least 2: a cluster needs a pair to score.")
    if max_cluster_size is not None and max_cluster_size < min_cluster_size:
        raise ValueError(
            f"max_cluster_size ({max_cluster_size}) is below min_cluster_size ({min_cluster_size})."
        )
    gen_groups = _as_groups(generated, "generated")
    centre_groups = _as_groups(centres, "centres")
    if not gen_groups or all(len(v) == 0 for v in gen_groups.values()):
        raise ValueError("ic_lpips: the generated image set is empty.")
    for dt, images in gen_groups.items():
        if not images:
            raise ValueError(f"ic_lpips: no generated images for defect type {dt!r}.")
        if dt not in centre_groups or not centre_groups[dt]:
            raise ValueError(
                f"ic_lpips: no centres for defect type {dt!r}: pass the real anomalies of its generator fold "
                f"(centres have defect types {sorted(centre_groups)})."
            )
    return gen_groups, centre_groups


def _feature_block(scorer, resolution: int, device: str, feature_memory_gb: float) -> int:
    """How many images' LPIPS features fit in half of ``feature_memory_gb`` (one image's features say)."""
    import torch

    with torch.no_grad():
        probe = scorer.features(_unit_range(np.zeros((1, resolution, resolution, 3), np.uint8), device))
    per_image = sum(f.nelement() * f.element_size() for f in probe)
    return max(1, int(feature_memory_gb * 2**30 / (2 * per_image)))


def _score_cluster(
    members, distances, rng, centre, max_cluster_size, min_cluster_size, small_clusters
) -> dict:
    """One cluster's row: its mean pairwise distance over at most ``max_cluster_size`` seeded members, or
    None (``"skip"``) / 0 (``"zero"``) when it has fewer than ``min_cluster_size``."""
    size = len(members)
    if max_cluster_size is not None and size > max_cluster_size:
        members = np.sort(rng.choice(members, max_cluster_size, replace=False))
    row = {"centre": centre, "size": size, "used": len(members), "score": None}
    if len(members) < min_cluster_size:
        if small_clusters == "zero":
            row["score"] = 0.0
    else:
        iu, ju = np.triu_indices(len(members), k=1)
        row["score"] = float(distances(np.stack([members[iu], members[ju]], -1)).mean())
    return row


def _clusters_of_type(gen, cen, distances, seed_key, max_cluster_size, min_cluster_size, small_clusters):
    """One defect type: each generated image joins its nearest real centre, then each cluster is scored
    (cluster ``c`` samples its members with ``default_rng([*seed_key, c])``)."""
    pairs = np.stack(np.meshgrid(np.arange(len(gen)), np.arange(len(cen)), indexing="ij"), -1).reshape(-1, 2)
    # ties go to the lower centre index
    nearest = distances(gen, cen, pairs).reshape(len(gen), len(cen)).argmin(axis=1)
    return [
        _score_cluster(
            np.flatnonzero(nearest == c),
            lambda pair_idx: distances(gen, gen, pair_idx),
            np.random.default_rng([*seed_key, c]),
            c,
            max_cluster_size,
            min_cluster_size,
            small_clusters,
        )
        for c in range(len(cen))
    ]


def ic_lpips(
    generated,
    centres,
    *,
    net: str = "vgg",
    weights=None,
    max_cluster_size: int | None = 50,
    min_cluster_size: int = 2,
    small_clusters: str = "skip",
    seed: int = 0,
    resolution: int = 256,
    batch_size: int = 16,
    device: str = "cpu",
    random_backbone: bool = False,
    distance: Callable | None = None,
    feature_memory_gb: float = 2.0,
    progress: bool = True,
) -> ICLPIPSResult:
    """Intra-cluster pairwise LPIPS of generated anomalies around real ones (diversity, higher = more diverse).

    Args:
        generated: images of one defect type, or ``{defect_type: images}`` for a category.
        centres: the real anomalies of the generator fold, same structure (a dict needs every defect type
            of ``generated``).
        max_cluster_size: each cluster keeps at most this many members, a seeded random sample (None: all).
        min_cluster_size, small_clusters: clusters with fewer members are left out (``"skip"``) or count
            as 0 (``"zero"``).
        weights: ``.safetensors`` copy of torchvision's VGG-16 (or AlexNet) weights; by default the torch
            hub cache file (see :mod:`axf_pipeline.evaluation.weights`).
        distance: replace LPIPS by ``distance(a, b) -> (B,)`` on [-1, 1] batches (tests); the result is
            then marked not a real score, as with ``random_backbone``. An ``lpips.LPIPS`` model given here is
            split like the built one (backbone once per image); any other callable runs once per pair.
        feature_memory_gb: LPIPS features (about 32 MB per 256 px image for VGG) are held for at most this
            much; a side of a comparison that fits in half of it goes through the backbone once per image.
    """
    gen_groups, centre_groups = _ic_lpips_groups(
        generated, centres, max_cluster_size, min_cluster_size, small_clusters
    )
    real = distance is None and not random_backbone
    if distance is None:
        model, backbone = build_lpips(net, weights, random_backbone)
        model.to(device)

        distance = model
    else:
        backbone = "injected distance"
    scorer = _PairScorer(distance)
    block = _feature_block(scorer, resolution, device, feature_memory_gb)

    per_type: dict[str, float | None] = {}
    clusters: dict[str, list[dict]] = {}
    notes: list[str] = []
    for dt in _tqdm(sorted(gen_groups), progress, desc="IC-LPIPS"):
        gen = _lpips_tensor(gen_groups[dt], resolution, f"generated[{dt!r}]")
        cen = _lpips_tensor(centre_groups[dt], resolution, f"centres[{dt!r}]")
        distances = functools.partial(
            _pair_distances, scorer, batch_size=batch_size, device=device, block=block
        )
        rows = _clusters_of_type(
            gen, cen, distances, (seed, zlib.crc32(dt.encode())),
            max_cluster_size, min_cluster_size, small_clusters,
        )  # fmt: skip
        scores = [r["score"] for r in rows if r["score"] is not None]
        clusters[dt] = rows
        per_type[dt] = float(np.mean(scores)) if scores else None
        if not scores:
            notes.append(
                f"defect type {dt!r}: no cluster has {min_cluster_size}+ members; left out of the mean."
            )
    scored = [v for v in per_type.values() if v is not None]
    if not scored:
        raise ValueError(
            "ic_lpips: no cluster of any defect type has at least "
            f"{min_cluster_size} members (cluster sizes: "
            + "; ".join(f"{dt}: {[r['size'] for r in rows]}" for dt, rows in clusters.items())
            + "); generate more images per defect type."
        )
    if not real:
        warnings.warn(f"ic_lpips: {NOT_REAL_LABEL}", stacklevel=2)
    return ICLPIPSResult(
        score=float(np.mean(scored)),
        per_defect_type=per_type,
        clusters=clusters,
        real_score=real,
        backbone=backbone,
        notes=notes,
    )
