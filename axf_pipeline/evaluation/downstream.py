"""Downstream harness of the paper's tables 3–5: what synthetic anomalies are worth to a detector.

* Localisation / detection: a DRAEM-style discriminative U-Net learns to segment anomalies from normal
  training images (empty masks) plus synthetic image/mask pairs, then segments the real test set (good
  images + evaluation fold); :func:`localization_metrics` scores its maps.
* Classification: a torchvision ResNet-34 learns the defect type from synthetic anomalies; accuracy is
  counted over every image of the real evaluation fold (not over a last batch).

Both train per category, at a chosen resolution, for a chosen number of epochs; nothing is downloaded
(ResNet-34 ImageNet weights are optional, by path or torch hub cache).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .data import Sample
from .images import resize_rgb
from .localization import LocalizationResult, localization_metrics
from .weights import load_backbone_state_dict

__all__ = [
    "ClassificationResult",
    "DiscriminativeUNet",
    "classification_accuracy",
    "evaluate_localization",
    "predict_maps",
    "train_classifier",
    "train_localization",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tqdm(iterable, progress: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress, **kwargs)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> ImageNet-normalised (B, 3, H, W) float; kept uint8 until the batch is used."""
    x = images.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DiscriminativeUNet(nn.Module):
    """DRAEM's discriminative sub-network shape (conv blocks, 2× pooling, skip connections) on RGB input.

    DRAEM feeds it the image and its reconstruction; like AnomalyDiffusion's protocol we train it on the
    (synthetic) image alone, so it judges the generator's anomalies, not a reconstruction model.
    ``base_channels=64, depth=5`` is DRAEM's size; tests use a tiny one.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, depth: int = 5):
        super().__init__()
        widths = [base_channels * 2 ** min(i, 3) for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for w_skip in reversed(widths[:-1]):
            self.up.append(
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(cin, w_skip, 3, padding=1)
                )
            )
            self.fuse.append(_block(2 * w_skip, w_skip))
            cin = w_skip
        self.head = nn.Conv2d(cin, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly logits (B, 1, H, W); H and W must be divisible by 2^(depth-1)."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips[:-1]), strict=True):
            x = fuse(torch.cat([up(x), skip], 1))
        return self.head(x)


def _images(samples: list[Sample], resolution: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 at ``resolution``²."""
    return torch.from_numpy(np.stack([resize_rgb(s.load_image(), resolution) for s in samples]))


def _pairs(samples: list[Sample], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and (N, 1, H, W) float masks; a sample without a mask (a normal) gets an empty one."""
    size = (resolution, resolution)
    masks = [s.load_mask(size) if s.mask is not None else np.zeros(size, bool) for s in samples]
    return _images(samples, resolution), torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch of index batches. A last batch of one joins the batch before it: BatchNorm cannot
    train on a single sample, and dropping it would silently skip an anomaly."""
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def train_localization(
    normals: list[Sample],
    anomalies: list[Sample],
    *,
    resolution: int = 256,
    epochs: int = 10,
    batch_size: int = 8,
    lr: float = 1e-4,
    base_channels: int = 64,
    depth: int = 5,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> DiscriminativeUNet:
    """Train the U-Net with DRAEM's focal loss on normals (empty masks) plus synthetic anomalies."""
    from torchvision.ops import sigmoid_focal_loss

    if not anomalies:
        raise ValueError("train_localization: no synthetic anomalies to train on")
    if not normals:
        raise ValueError("train_localization: no normal training images")
    if resolution % 2 ** (depth - 1):
        raise ValueError(
            f"resolution {resolution} must be divisible by {2 ** (depth - 1)} for a depth-{depth} U-Net"
        )
    torch.manual_seed(seed)
    images, masks = _pairs(normals + anomalies, resolution)
    model = DiscriminativeUNet(3, base_channels, depth).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in _tqdm(range(epochs), progress, desc="U-Net epochs"):
        for idx in _batches(len(images), batch_size, generator):
            x, y = _normalise(images[idx]).to(device), masks[idx].to(device)
            if torch.rand((), generator=generator) < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            loss = sigmoid_focal_loss(model(x), y, alpha=-1, gamma=2, reduction="mean")
            optim.zero_grad()
            loss.backward()
            optim.step()
    return model.eval()


@torch.no_grad()
def predict_maps(
    model: nn.Module, samples: list[Sample], *, resolution: int, batch_size: int = 8, device: str = "cpu"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Anomaly maps (sigmoid) and ground-truth masks of ``samples``, both at ``resolution``²."""
    maps, masks = [], []
    for start in range(0, len(samples), batch_size):
        images, gts = _pairs(samples[start : start + batch_size], resolution)
        maps += list(torch.sigmoid(model(_normalise(images).to(device)))[:, 0].float().cpu().numpy())
        masks += list(gts[:, 0].numpy().astype(bool))
    return maps, masks


def evaluate_localization(
    model: nn.Module, test: list[Sample], *, resolution: int, device: str = "cpu"
) -> LocalizationResult:
    """Pixel/image AUROC, AP, F1-max of ``model`` on the real test set (good + evaluation fold)."""
    maps, masks = predict_maps(model, test, resolution=resolution, device=device)
    return localization_metrics(maps, masks)


def build_resnet34(num_classes: int, weights=None) -> nn.Module:
    """torchvision ResNet-34 with a ``num_classes`` head; ``weights``: None (random), "hub" or a path."""
    from torchvision.models import resnet34

    model = resnet34(weights=None)
    if weights is not None:
        state_dict, _ = load_backbone_state_dict("resnet34", None if weights == "hub" else weights)
        model.load_state_dict(state_dict)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def train_classifier(
    anomalies: list[Sample],
    classes: list[str],
    *,
    resolution: int = 224,
    epochs: int = 10,
    batch_size: int = 16,
    lr: float = 1e-4,
    weights=None,
    model: nn.Module | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Train a defect-type classifier (ResNet-34 unless ``model`` is given) on synthetic anomalies."""
    counts = Counter(s.defect_type for s in anomalies)
    if missing := [c for c in classes if counts[c] == 0]:
        raise ValueError(f"train_classifier: no synthetic anomalies of defect type(s) {missing}")
    if unknown := sorted(set(counts) - set(classes)):
        raise ValueError(
            f"train_classifier: synthetic defect type(s) {unknown} are not among the classes {classes}"
        )
    torch.manual_seed(seed)
    model = (model or build_resnet34(len(classes), weights)).to(device)
    images = _images(anomalies, resolution)
    labels = torch.tensor([classes.index(s.defect_type) for s in anomalies])
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in _tqdm(range(epochs), progress, desc="ResNet-34 epochs"):
        for idx in _batches(len(images), batch_size, generator):
            x = _normalise(images[idx]).to(device)
            if torch.rand((), generator=generator) < 0.5:
                x = x.flip(-1)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            optim.zero_grad()
            loss.backward()
            optim.step()
    return model.eval()


@dataclass
class ClassificationResult:
    accuracy: float
    n_correct: int
    n_total: int
    per_defect_type: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "n_correct": self.n_correct,
            "n_total": self.n_total,
            "per_defect_type": self.per_defect_type,
        }


@torch.no_grad()
def classification_accuracy(
    model: nn.Module,
    test: list[Sample],
    classes: list[str],
    *,
    resolution: int = 224,
    batch_size: int = 16,
    device: str = "cpu",
) -> ClassificationResult:
    """Accuracy over every image of ``test`` (the real evaluation fold), accumulated across all batches."""
    test = [s for s in test if s.is_anomaly]
    if not test:
        raise ValueError("classification_accuracy: the real evaluation fold is empty")
    if unknown := sorted({s.defect_type for s in test} - set(classes)):
        raise ValueError(
            f"classification_accuracy: test defect type(s) {unknown} are not among the classes {classes}"
        )
    model.eval()
    correct = np.zeros(len(test), dtype=bool)
    for start in range(0, len(test), batch_size):
        batch = test[start : start + batch_size]
        pred = model(_normalise(_images(batch, resolution)).to(device)).argmax(1).cpu().numpy()
        correct[start : start + len(batch)] = pred == np.array([classes.index(s.defect_type) for s in batch])
    per_type = {}
    for c in classes:
        sel = [i for i, s in enumerate(test) if s.defect_type == c]
        if sel:
            per_type[c] = float(correct[sel].mean())
    return ClassificationResult(float(correct.mean()), int(correct.sum()), len(test), per_type)
