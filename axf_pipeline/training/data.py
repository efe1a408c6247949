"""MVTec Caption for training: the few-shot generator fold, prepared on the fly.

Each example is a crop at ``--resolution`` around its defect (large LOCO images train at full
detail), the mask cropped and flipped with it, a caption, and a reference defect (another anomaly
of the same category and defect type) for the textural branch. Every random choice is drawn from
``(seed, epoch, index)``, so an example is the same whichever process or worker makes it, and a
resumed run sees exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mvtec_caption._io import load_source

from ..image_processing import binarize_mask, crop_window, mask_box
from .args import TrainingInputError, check_drop_probs

REQUIRED_COLUMNS = ("image", "mask", "caption", "category", "defect_type", "is_anomaly", "fold")


def load_mvtec_caption(dataset_name: str, config: str | None = None, cache_dir: str | None = None):
    """All splits of MVTec Caption in one ``datasets.Dataset`` (anomalies live in ``test``)."""
    import datasets

    try:
        loaded = load_source(dataset_name, config, cache_dir=cache_dir)
    except Exception as err:
        raise TrainingInputError(
            f"--dataset_name {dataset_name!r} (--dataset_config {config!r}) could not be loaded with "
            f"datasets.load_dataset: {type(err).__name__}: {err}"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.concatenate_datasets(list(loaded.values()))
    return loaded


@dataclass
class TrainingData:
    train: object  # datasets.Dataset of the anomalies to train on
    normals: object  # datasets.Dataset of normal images (validation canvases)


def select_training_data(
    dataset,
    categories=None,
    defect_types=None,
    train_fold: str = "generator",
    source: str = "the dataset",
) -> TrainingData:
    """Checks the schema and keeps the anomalies of the asked fold, categories and defect types."""
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise TrainingInputError(
            f"{source} lacks the column(s) {missing} of the MVTec Caption schema "
            f"(needs {list(REQUIRED_COLUMNS)}; has {dataset.column_names})"
        )
    meta = dataset.select_columns(["category", "defect_type", "is_anomaly", "fold", "caption"]).to_dict()
    have_categories = sorted(set(meta["category"]))
    for name, wanted, have in (
        ("--categories", categories, have_categories),
        ("--defect_types", defect_types, sorted(set(meta["defect_type"]))),
    ):
        unknown = sorted(set(wanted or ()) - set(have))
        if unknown:
            raise TrainingInputError(f"{name} {unknown} not in {source}; it has {have}")
    folds = ("generator",) if train_fold == "generator" else ("generator", "evaluation")
    train_idx, normal_idx = [], []
    for i, (cat, defect, anomalous, fold) in enumerate(
        zip(meta["category"], meta["defect_type"], meta["is_anomaly"], meta["fold"], strict=True)
    ):
        if categories and cat not in categories:
            continue
        if not anomalous:
            normal_idx.append(i)
        elif (not defect_types or defect in defect_types) and fold in folds:
            train_idx.append(i)
    if not train_idx:
        raise TrainingInputError(
            f"No anomalies to train on in {source} with --categories {categories} --defect_types "
            f"{defect_types} --train_fold {train_fold} (categories present: {have_categories})"
        )
    no_caption = [i for i in train_idx if not (meta["caption"][i] or "").strip()]
    if no_caption:
        raise TrainingInputError(
            f"{len(no_caption)} training anomalies of {source} have no caption "
            f"(first: row {no_caption[0]}, {meta['category'][no_caption[0]]}/{meta['defect_type'][no_caption[0]]})"
        )
    return TrainingData(train=dataset.select(train_idx), normals=dataset.select(normal_idx))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def crop_around_mask(
    image: Image.Image,
    mask: Image.Image,
    resolution: int,
    rng: np.random.Generator,
    jitter: float = 0.25,
    flip: bool = False,
) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int, int, bool]]:
    """A ``resolution``² crop holding the defect, at native detail when the defect fits.

    The window is :func:`axf_pipeline.image_processing.crop_window`, the one the pipeline samples in
    (there without jitter), so a defect and its reference have the same scale in training and sampling.
    Image and mask get the same box and flip. Returns the crops and a key ``(w, h, x0, y0, side, flipped)``.
    """
    width, height = image.size
    shift = (jitter * rng.uniform(-1, 1), jitter * rng.uniform(-1, 1)) if jitter else (0.0, 0.0)
    new_w, new_h, x0, y0 = crop_window(
        width, height, mask_box(np.asarray(mask) > 0), (resolution, resolution), shift
    )
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
        mask = mask.resize((new_w, new_h), Image.NEAREST)
    crop = (x0, y0, x0 + resolution, y0 + resolution)
    image, mask = image.crop(crop), mask.crop(crop)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
    return image, mask, (new_w, new_h, x0, y0, resolution, bool(flip))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL → float ``(C, H, W)`` in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class AnomalyTrainingDataset(torch.utils.data.Dataset):
    """Training examples made on the fly from an MVTec Caption ``datasets.Dataset`` of anomalies."""

    def __init__(
        self,
        dataset,
        resolution: int,
        seed: int = 0,
        crop_jitter: float = 0.25,
        random_flip: bool = True,
        caption_drop_prob: float = 0.25,
        reference_drop_prob: float = 0.35,
        joint_drop_prob: float = 0.1,
        reference_mismatch_prob: float = 0.5,
        decoded_cache_mb: float = 1024,
    ):
        self.dataset = dataset
        self.resolution = resolution
        self.seed = seed
        self.crop_jitter = crop_jitter
        self.random_flip = random_flip
        self.drop_probs = check_drop_probs(caption_drop_prob, reference_drop_prob, joint_drop_prob)
        self.reference_mismatch_prob = reference_mismatch_prob
        self.epoch = 0
        meta = dataset.select_columns(["category", "defect_type", "path"] if "path" in dataset.column_names
                                      else ["category", "defect_type"]).to_dict()  # fmt: skip
        self.groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.group_of: list[tuple[str, str]] = []
        for i, key in enumerate(zip(meta["category"], meta["defect_type"], strict=True)):
            self.groups[key].append(i)
            self.group_of.append(key)
        # rows of the other defect types of the same category: the draws of --reference_mismatch_prob
        self.other_types: dict[tuple[str, str], list[int]] = {
            key: [
                j for other, rows in self.groups.items() if other[0] == key[0] and other != key for j in rows
            ]
            for key in self.groups
        }
        self.paths = meta.get("path") or [f"row {i}" for i in range(len(dataset))]
        # Decoded images and masks, kept until the budget is spent: each example is read twice per step
        # (as the item and as another's reference), and PNG decoding was 15 % of a tiny model's step.
        self._decoded: dict[int, tuple[Image.Image, Image.Image, str]] = {}
        self._decoded_budget = int(decoded_cache_mb * 2**20)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, index: int) -> tuple[Image.Image, Image.Image, str]:
        if index in self._decoded:
            return self._decoded[index]
        row = self.dataset[index]
        image, mask = row["image"], row["mask"]
        if image is None or mask is None:
            raise TrainingInputError(f"{self.paths[index]}: missing {'image' if image is None else 'mask'}")
        if image.size != mask.size:
            raise TrainingInputError(
                f"{self.paths[index]}: mask size {mask.size} differs from image size {image.size}"
            )
        loaded = image.convert("RGB"), mask.convert("L"), row["caption"]
        size = 4 * image.size[0] * image.size[1]  # RGB + L bytes
        if size <= self._decoded_budget:
            self._decoded[index] = loaded
            self._decoded_budget -= size
        return loaded

    def _crop(self, index: int, rng: np.random.Generator):
        image, mask, caption = self._load(index)
        flip = self.random_flip and rng.random() < 0.5
        image, mask, key = crop_around_mask(image, mask, self.resolution, rng, self.crop_jitter, flip)
        return to_tensor(image), binarize_mask(to_tensor(mask)), caption, (index, *key)

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, self.epoch, index)
        pixels, mask, caption, key = self._crop(index, rng)
        dropped = draw_dropped_condition(rng, *self.drop_probs)
        mismatched = dropped is None and rng.random() < self.reference_mismatch_prob
        ref_index = self._reference_of(index, rng, mismatched)
        reference, reference_mask, _, _ = self._crop(ref_index, rng)
        return {
            "pixel_values": pixels * 2 - 1,
            "mask": mask,
            "reference": reference,
            "reference_mask": reference_mask,
            "has_reference": torch.tensor(dropped not in ("reference", "both")),
            "caption": "" if dropped in ("caption", "both") else caption,
            "key": key,
        }

    def _reference_of(self, index: int, rng: np.random.Generator, mismatched: bool) -> int:
        """Another anomaly of the same defect type, or (``mismatched``) of another type of the same category
        when the category has one."""
        key = self.group_of[index]
        others = self.other_types[key] if mismatched else []
        if not others:
            group = self.groups[key]
            others = [j for j in group if j != index] or group
        return others[int(rng.integers(len(others)))]


def draw_dropped_condition(
    rng: np.random.Generator, caption: float, reference: float, joint: float
) -> str | None:
    """Which condition an example trains without: ``"caption"`` (reference-only branch of guidance),
    ``"reference"`` (text-only), ``"both"`` (the unconditional branch) or None (the full condition).

    One draw decides, so each branch of two-condition guidance is shown with exactly its own probability
    (independent drops would show the unconditional branch only ``p_caption · p_reference`` of the time)."""
    u = rng.random()
    if u < joint:
        return "both"
    if u < joint + caption:
        return "caption"
    if u < joint + caption + reference:
        return "reference"
    return None


def collate(examples: list[dict]) -> dict:
    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0] if k not in ("caption", "key")}
    batch["caption"] = [e["caption"] for e in examples]
    batch["key"] = [e["key"] for e in examples]
    return batch


class EpochBatchSampler(torch.utils.data.Sampler):
    """This process's batches of one epoch: a permutation drawn from ``(seed, epoch)``, dealt round-robin
    to the processes, wrapped around so every process gets the same number of full batches.

    ``skip`` batches at the start of the epoch are left out: that is how a resumed run picks up at the
    exact batch it stopped at.
    """

    def __init__(self, size: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.size, self.batch_size = size, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return math.ceil(self.size / (self.batch_size * self.num_replicas))

    def __iter__(self):
        order = _rng(self.seed, self.epoch, 0x5EED).permutation(self.size)
        total = len(self) * self.batch_size * self.num_replicas
        order = np.resize(order, total)  # wrap around
        for b in range(self.skip, len(self)):
            start = (b * self.num_replicas + self.rank) * self.batch_size
            yield order[start : start + self.batch_size].tolist()
