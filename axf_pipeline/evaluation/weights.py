"""Finding pretrained backbone weights without ever downloading them.

Each backbone the metrics need has one expected file. A user either passes its path (a
``.safetensors`` file) or leaves the library's own file in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, i.e. ``torch.hub.get_dir()/checkpoints``). Hub-cache ``.pth`` files
are read with ``torch.load(weights_only=True)``: tensors only, no pickled code. When neither is there the
error says which file is expected and where to put it. Tests may ask for a random backbone instead; the
metrics then mark their result as not a real score.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BACKBONES",
    "BackboneFile",
    "MissingWeightsError",
    "backbone_file",
    "load_backbone_state_dict",
    "hub_checkpoint_dir",
]


class MissingWeightsError(FileNotFoundError):
    """A pretrained backbone file is needed and is neither at the given path nor in the torch hub cache."""


@dataclass(frozen=True)
class BackboneFile:
    key: str
    filename: str
    url: str
    used_for: str


BACKBONES = {
    "inception": BackboneFile(
        "inception",
        "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        "the Inception Score (torch-fidelity's InceptionV3)",
    ),
    "vgg16": BackboneFile(
        "vgg16",
        "vgg16-397923af.pth",
        "https://download.pytorch.org/models/vgg16-397923af.pth",
        "IC-LPIPS (the VGG-16 backbone of LPIPS v0.1)",
    ),
    "alexnet": BackboneFile(
        "alexnet",
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "IC-LPIPS with --lpips-net alex",
    ),
    "resnet34": BackboneFile(
        "resnet34",
        "resnet34-b627a593.pth",
        "https://download.pytorch.org/models/resnet34-b627a593.pth",
        "the ResNet-34 defect-type classifier (optional ImageNet initialisation)",
    ),
}


def hub_checkpoint_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def backbone_file(key: str, path: str | os.PathLike | None = None) -> Path:
    """The file :func:`load_backbone_state_dict` would read, without reading it: a check before any work."""
    spec = BACKBONES[key]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingWeightsError(f"weights file {path} for {spec.used_for} does not exist.")
        if path.suffix != ".safetensors":
            raise ValueError(
                f"weights file {path}: pass a .safetensors file (pickled .pth files are only read from the "
                f"torch hub cache, as {hub_checkpoint_dir() / spec.filename})."
            )
        return path
    cached = hub_checkpoint_dir() / spec.filename
    if cached.is_file():
        return cached
    raise MissingWeightsError(
        f"{spec.used_for} needs pretrained weights, and nothing is downloaded at run time. Expected the file "
        f"{spec.filename} (from {spec.url}) in the torch hub cache at {cached}, or pass a .safetensors copy of "
        f"it by path. Place the file there (set TORCH_HOME to move the cache) and run again."
    )


def load_backbone_state_dict(key: str, path: str | os.PathLike | None = None) -> tuple[dict, str]:
    """State dict of backbone ``key`` from ``path`` (safetensors) or the torch hub cache; never downloads.

    Returns ``(state_dict, source)`` where ``source`` says which file was read.
    """
    file = backbone_file(key, path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file)), str(file)
    import torch

    return torch.load(file, map_location="cpu", weights_only=True), str(file)
