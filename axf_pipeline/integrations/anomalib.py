"""Synthetic anomalies as a training source for anomalib's ``Draem``.

anomalib's DRAEM draws its training anomalies inside ``training_step`` from ``model.augmenter`` (a
``PerlinAnomalyGenerator``): ``augmented, masks = model.augmenter(batch.image)``. Its data modules put
abnormal images in the test split only, so there is no other door for external anomalies. This module swaps
that augmenter for one that draws anomalies from an ``axf synthesize`` output::

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from axf_pipeline.integrations.anomalib import draem_with_synthetic

    model = draem_with_synthetic("./synthetic", "bottle", image_size=256, seed=0)
    engine = Engine(max_epochs=700)
    engine.fit(model, datamodule=MVTecAD(root="./MVTecAD", category="bottle"))

Per image, with probability ``probability`` (DRAEM's 0.5), the augmenter pastes a synthetic anomaly of the
category into the normal image (``image * (1 - M) + synthetic * M``, M its mask) and returns M; otherwise the
image passes unchanged with an empty mask. Pasting, not replacing, keeps DRAEM's reconstruction target right:
``training_step`` asks the reconstructive network to give back the *input* normal, which is exactly the pasted
image outside M (``placement="replace"`` swaps the whole image instead). A fraction ``1 - synthetic_fraction``
of the anomalies comes from anomalib's own Perlin generator (the mixed mode).

Images and masks are resized to the batch's size with the calls anomalib's pre-processor makes (``Resize``
with antialiasing on [0, 1] floats; nearest for masks), so a synthetic anomaly reaches DRAEM exactly as a real
image of the same size would. Everything is checked when the set is loaded, before training.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..evaluation.data import Sample, check_anomalies, load_anomalies
from ..synthesis.core import atomic_write

__all__ = [
    "AnomalyPool",
    "SyntheticAnomalyAugmenter",
    "SyntheticRunRecord",
    "draem_with_synthetic",
    "load_synthetic",
    "mvtec_folder_samples",
]

PLACEMENTS = ("paste", "replace")
RECORD_FILE = "synthetic_anomalies.json"


@dataclass
class AnomalyPool:
    """Anomalies of one category (evaluation ``Sample``s) with where they came from; checked on creation."""

    samples: list[Sample]
    category: str
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        name = self.provenance.get("source", "the synthetic set")
        if not self.samples:
            raise ValueError(f"{name} holds no anomalies of category {self.category!r}: nothing to train on")
        check_anomalies(self.samples, name, progress=False)  # empty masks, masks of another size

    def __len__(self) -> int:
        return len(self.samples)

    def __add__(self, other: AnomalyPool) -> AnomalyPool:
        if other.category != self.category:
            raise ValueError(f"cannot pool category {self.category!r} with {other.category!r}")
        parts = [p for pool in (self, other) for p in pool.provenance.get("parts", [pool.provenance])]
        return AnomalyPool(self.samples + other.samples, self.category, {"parts": parts})

    def subset(self, n: int, seed: int) -> AnomalyPool:
        """``n`` anomalies drawn without replacement (all of them if ``n`` >= len)."""
        if n >= len(self):
            return self
        keep = sorted(np.random.default_rng(seed).choice(len(self), size=n, replace=False).tolist())
        samples = [self.samples[i] for i in keep]
        return AnomalyPool(samples, self.category, {**self.provenance, **_counts(samples)})

    def tensors(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) float images in [0, 1] and (N, 1, H, W) float {0, 1} masks at ``size``."""
        images, masks = [], []
        for s in self.samples:
            image = (
                torch.from_numpy(s.load_image().copy()).permute(2, 0, 1).float() / 255
            )  # anomalib's read_image
            mask = torch.from_numpy(s.load_mask())[None].float()
            if image.shape[-2:] != size:
                image = TF.resize(image, list(size), antialias=True)  # the pre-processor's Resize
                mask = TF.resize(mask, list(size), interpolation=InterpolationMode.NEAREST)
            images.append(image)
            masks.append(mask)
        return torch.stack(images), torch.stack(masks)


def mvtec_folder_samples(root: str | os.PathLike, category: str, name: str | None = None) -> list[Sample]:
    """Anomalies of ``root/<category>/test/<defect>/<stem>.png`` with ``ground_truth/<defect>/<stem>_mask.png``
    (the ``mvtec/`` folder of ``axf synthesize``, or any MVTec AD tree)."""
    root = Path(root)
    categories = sorted(p.name for p in root.iterdir() if (p / "test").is_dir()) if root.is_dir() else []
    if category not in categories:
        raise ValueError(
            f"synthetic set {name or root.name} has no category {category!r}; it has {categories}"
        )
    samples = []
    for defect in sorted(p for p in (root / category / "test").iterdir() if p.is_dir() and p.name != "good"):
        for image in sorted(defect.glob("*.png")):
            mask = root / category / "ground_truth" / defect.name / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise FileNotFoundError(f"synthetic anomaly {image} has no mask {mask}")
            samples.append(
                Sample(image, mask, category, defect.name, f"{category}/{defect.name}/{image.name}")
            )
    return samples


def _card_provenance(card: Path) -> dict:
    """Model and seed from the card `axf synthesize` writes (its provenance table)."""
    if not card.is_file():
        return {}
    text = card.read_text()
    found = {}
    for key in ("model", "seed"):
        if match := re.search(rf"^\| {key} \| `?([^`|]+?)`? \|", text, re.MULTILINE):
            found[key] = int(match.group(1)) if key == "seed" and match.group(1).isdigit() else match.group(1)
    return found


def load_synthetic(
    source, category: str, *, config: str | None = None, model: str | None = None, seed: int | None = None
) -> AnomalyPool:
    """The anomalies of ``category`` in an ``axf synthesize`` output, checked.

    ``source``: the output folder (its Parquet dataset is read when present, else its ``mvtec/`` folder), the
    ``mvtec/`` folder itself, or a ``datasets`` dataset with the MVTec Caption columns. ``model``/``seed``
    record the generator when the source does not name it (a bare ``mvtec/`` folder).
    """
    import datasets

    if isinstance(source, datasets.Dataset | datasets.DatasetDict):
        name, samples, card = "dataset", load_anomalies(source, config), None
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"synthetic set {path} does not exist")
        name = path.name
        if (path / "data").is_dir() or (path / "dataset_dict.json").is_file() or path.suffix == ".parquet":
            samples, card = load_anomalies(str(path), config), path / "README.md"
        elif (path / "mvtec").is_dir():
            samples, card = mvtec_folder_samples(path / "mvtec", category, name), path / "README.md"
        else:
            samples, card = mvtec_folder_samples(path, category, name), path.parent / "README.md"
    available = sorted({s.category for s in samples})
    samples = [s for s in samples if s.category == category]
    if not samples:
        raise ValueError(
            f"synthetic set {name} has no anomalies of category {category!r}; it has {available}"
        )
    provenance = {"source": name, **(_card_provenance(card) if card else {})}
    models = sorted({_column(s, "model") for s in samples} - {None})
    if models:
        provenance["model"] = models[0] if len(models) == 1 else models
    provenance.update({k: v for k, v in (("model", model), ("seed", seed)) if v is not None})
    provenance.setdefault("model", "unknown (not recorded in the source)")
    provenance.setdefault("seed", "unknown (not recorded in the source)")
    if isinstance(provenance["model"], str) and os.path.isabs(provenance["model"]):
        provenance["model"] = Path(provenance["model"]).name  # a local path never reaches a report
    return AnomalyPool(samples, category, {**provenance, **_counts(samples)})


def _counts(samples: list[Sample]) -> dict:
    return {"n": len(samples), "defect_types": dict(sorted(Counter(s.defect_type for s in samples).items()))}


def _column(sample: Sample, column: str):
    if isinstance(sample.image, tuple) and column in sample.image[0].column_names:
        dataset, row = sample.image
        return dataset[row][column]
    return None


class SyntheticAnomalyAugmenter(nn.Module):
    """DRAEM's augmenter contract, ``(images) -> (augmented_images, anomaly_masks)``, drawing from ``pool``.

    Args:
        pool: the anomalies to draw (:func:`load_synthetic`, optionally ``+`` real few-shot ones).
        probability: chance that an image becomes an anomaly (DRAEM's 0.5).
        synthetic_fraction: share of those anomalies taken from ``pool``; the rest come from ``perlin``.
        perlin: anomalib's ``PerlinAnomalyGenerator`` for the mixed mode (needed when the fraction < 1).
        placement: "paste" the anomaly's masked region into the image, or "replace" the whole image.
        seed: seeds the augmenter's own draws (which images, which anomalies); Perlin uses torch's global
            generator, as in anomalib.
    """

    def __init__(
        self,
        pool: AnomalyPool,
        *,
        probability: float = 0.5,
        synthetic_fraction: float = 1.0,
        perlin: nn.Module | None = None,
        placement: str = "paste",
        seed: int = 0,
    ):
        super().__init__()
        if not 0 <= probability <= 1:
            raise ValueError(f"probability must lie in [0, 1], got {probability}")
        if not 0 <= synthetic_fraction <= 1:
            raise ValueError(f"synthetic_fraction must lie in [0, 1], got {synthetic_fraction}")
        if synthetic_fraction < 1 and perlin is None:
            raise ValueError("synthetic_fraction < 1 needs anomalib's PerlinAnomalyGenerator as `perlin`")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.pool, self.probability, self.synthetic_fraction = pool, probability, synthetic_fraction
        self.perlin, self.placement, self.seed = perlin, placement, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = Counter({"normal": 0, "synthetic": 0, "perlin": 0})
        self._cache: dict = {}

    def _pool_at(self, size: tuple[int, int], device: torch.device):
        key = (size, str(device))
        if key not in self._cache:
            images, masks = self.pool.tensors(size)
            self._cache[key] = images.to(device), masks.to(device)
        return self._cache[key]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` (B, 3, H, W) floats in [0, 1] -> augmented images and (B, 1, H, W) {0, 1} masks."""
        b, _, h, w = images.shape
        anomalous = torch.rand(b, generator=self.generator) < self.probability
        from_pool = torch.rand(b, generator=self.generator) < self.synthetic_fraction
        picks = torch.randint(len(self.pool), (b,), generator=self.generator)
        augmented, masks = images.clone(), images.new_zeros(b, 1, h, w)
        pooled = (anomalous & from_pool).nonzero().flatten()
        if len(pooled):
            pool_images, pool_masks = self._pool_at((h, w), images.device)
            chosen = picks[pooled].to(images.device)
            synthetic, mask = pool_images[chosen].to(images.dtype), pool_masks[chosen].to(images.dtype)
            target = pooled.to(images.device)
            if self.placement == "paste":
                augmented[target] = images[target] * (1 - mask) + synthetic * mask
            else:
                augmented[target] = synthetic
            masks[target] = mask
        perlin = (anomalous & ~from_pool).nonzero().flatten().to(images.device)
        if len(perlin):
            augmented[perlin], masks[perlin] = self.perlin(images[perlin])
        self.drawn.update(
            normal=int((~anomalous).sum()), synthetic=len(pooled), perlin=len(perlin)
        )  # fmt: skip
        return augmented, masks

    def record(self) -> dict:
        """What this augmenter trains on: for the run's output."""
        return {
            "synthetic_set": self.pool.provenance,
            "category": self.pool.category,
            "n_anomalies": len(self.pool),
            "probability": self.probability,
            "synthetic_fraction": self.synthetic_fraction,
            "perlin_fraction": 1 - self.synthetic_fraction,
            "placement": self.placement,
            "augmenter_seed": self.seed,
            "global_seed": _global_seed(),
            "drawn": dict(self.drawn),
        }


def _global_seed():
    """Lightning's ``seed_everything`` seed, when one was set."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else None


class SyntheticRunRecord(Callback):
    """Writes the augmenter's :meth:`~SyntheticAnomalyAugmenter.record` to ``<run>/synthetic_anomalies.json``
    when fitting starts and ends, and into every checkpoint (key ``synthetic_anomalies``)."""

    def __init__(self, augmenter: SyntheticAnomalyAugmenter):
        self.augmenter = augmenter

    def _write(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        text = json.dumps(self.augmenter.record(), indent=2, default=str)
        atomic_write(Path(trainer.default_root_dir) / RECORD_FILE, lambda tmp: tmp.write_text(text))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["synthetic_anomalies"] = self.augmenter.record()


def draem_with_synthetic(
    synthetic,
    category: str,
    *,
    probability: float = 0.5,
    synthetic_fraction: float = 1.0,
    image_size: int | tuple[int, int] = 256,
    placement: str = "paste",
    seed: int = 0,
    dtd_dir: str | os.PathLike | None = None,
    config: str | None = None,
    model: str | None = None,
    synthesis_seed: int | None = None,
    **draem_kwargs,
):
    """anomalib's ``Draem`` whose training anomalies come from ``synthetic`` (an ``axf synthesize`` output, a
    dataset, or an :class:`AnomalyPool`); use it with anomalib's ``Engine`` as is.

    ``image_size`` sets DRAEM's pre-processor (resize only, no normalisation) unless ``pre_processor`` is
    given. ``dtd_dir``: DTD textures for the Perlin share of a mixed run; ``None`` uses Perlin noise and
    downloads nothing. ``model``/``synthesis_seed`` name the generator when the source does not. The
    augmenter's record (seeds, provenance, mix) is written to ``<run>/synthetic_anomalies.json``.
    """
    from anomalib.models import Draem

    pool = (
        synthetic
        if isinstance(synthetic, AnomalyPool)
        else load_synthetic(synthetic, category, config=config, model=model, seed=synthesis_seed)
    )
    if synthetic_fraction < 1 and dtd_dir is not None and not Path(dtd_dir).is_dir():
        raise FileNotFoundError(f"dtd_dir {dtd_dir} does not exist (anomalib would try to download DTD)")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    draem_kwargs.setdefault("pre_processor", Draem.configure_pre_processor(size))
    with tempfile.TemporaryDirectory() as empty:  # no textures: Perlin noise, and no DTD download
        draem = Draem(dtd_dir=dtd_dir if dtd_dir is not None else empty, **draem_kwargs)
    perlin = draem.augmenter
    perlin.probability = 1.0  # the augmenter below decides which images become anomalies
    augmenter = SyntheticAnomalyAugmenter(
        pool,
        probability=probability,
        synthetic_fraction=synthetic_fraction,
        perlin=perlin,
        placement=placement,
        seed=seed,
    )
    draem.augmenter = augmenter
    record = SyntheticRunRecord(augmenter)
    model_callbacks = draem.configure_callbacks
    # Lightning asks the module for its callbacks, so a plain Engine() picks up the record.
    draem.configure_callbacks = lambda: [*model_callbacks(), record]
    return draem
