"""The training data path in isolation (`axf_pipeline.training.data`): what an example shows, which rows are
trained on, and how the random choices of crop, flip, condition dropout and batch order behave."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import axf_pipeline.training.data as data_module
from axf_pipeline.training.args import TrainingInputError, parse_args
from axf_pipeline.training.data import (
    AnomalyTrainingDataset,
    EpochBatchSampler,
    crop_around_mask,
    draw_dropped_condition,
    load_mvtec_caption,
    select_training_data,
    to_tensor,
)

CLI_BASE = ["--pretrained_model_name_or_path", "x", "--image_encoder", "y", "--dataset_name", "z"]
CLI_BASE += ["--output_dir", "o"]


def image_set(rows: list[dict]):
    """A ``datasets.Dataset`` of anomalies from rows of image, mask, caption, category, defect_type (and path)."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    columns = {k: [row[k] for row in rows] for k in rows[0]}
    features = {"image": ImageFeature(), "mask": ImageFeature()}
    features.update({k: Value("string") for k in columns if k not in features})
    return Dataset.from_dict(columns, features=Features(features))


def square_mask(size=(64, 64), box=(24, 24, 40, 40), value=255) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = value
    return Image.fromarray(mask)


def noise_image(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def row(image, mask, caption="a spot", category="tile", defect_type="spot", **extra) -> dict:
    return {"image": image, "mask": mask, "caption": caption, "category": category, "defect_type": defect_type,
            **extra}  # fmt: skip


def colour_rows(colours, defect_type="spot", category="tile", size=(64, 64)) -> list[dict]:
    """Flat-coloured rows: a reference's colour tells which row it came from."""
    return [
        row(
            Image.fromarray(np.full((size[1], size[0], 3), c, np.uint8)),
            square_mask(size),
            f"spot {c}",
            category,
            defect_type,
        )
        for c in colours
    ]


class FixedDraws:
    """A generator whose every uniform draw in [0, 1) is ``u``: puts a draw exactly on a boundary."""

    def __init__(self, u: float):
        self.u, self.rng = u, np.random.default_rng(0)

    def random(self):
        return self.u

    def uniform(self, low=0.0, high=1.0):
        return low + (high - low) * self.u

    def integers(self, *args, **kwargs):
        return self.rng.integers(*args, **kwargs)


# ---- the crop -------------------------------------------------------------------------------------------
def _centred_crop_offsets(jitter: float, draws: int = 300):
    """Offsets of the crop from the centred one, for a 12² defect in the middle of a 200² image."""
    image, mask = noise_image((200, 200)), square_mask((200, 200), (94, 94, 106, 106))
    offsets = []
    for seed in range(draws):
        _, _, (w, h, x0, y0, side, flipped) = crop_around_mask(
            image, mask, 32, np.random.default_rng(seed), jitter=jitter
        )
        assert (w, h, side, flipped) == (200, 200, 32, False)
        offsets.append((x0 - (100 - 16), y0 - (100 - 16)))  # centred: defect centre 100 minus half the side
    return np.array(offsets)


def test_zero_jitter_crops_centred_on_the_defect():
    assert np.all(_centred_crop_offsets(0.0, draws=5) == 0)


@pytest.mark.parametrize("jitter", [0.5, 1.0])
def test_crop_jitter_is_symmetric_and_bounded_by_its_fraction_of_the_room(jitter):
    """The room here is half the side (16 px) each way; jitter moves the window by at most that fraction."""
    offsets = _centred_crop_offsets(jitter)
    bound = jitter * 16
    for axis in (0, 1):
        shifts = offsets[:, axis]
        assert np.abs(shifts).max() <= bound + 0.5  # rounding to whole pixels
        assert shifts.min() <= -0.75 * bound and shifts.max() >= 0.75 * bound  # both ways, near the bound
        assert abs(shifts.mean()) < 0.15 * bound  # symmetric: no side preferred
    assert not np.array_equal(offsets[:, 0], offsets[:, 1])  # the two axes are drawn independently


def test_the_crop_holds_the_image_and_the_whole_defect_at_its_key():
    image, mask = noise_image((200, 200)), square_mask((200, 200), (94, 94, 106, 106))
    pixels, defect = np.asarray(image), np.asarray(mask)
    for seed in range(20):
        image_crop, mask_crop, (_, _, x0, y0, side, flipped) = crop_around_mask(
            image, mask, 32, np.random.default_rng(seed), jitter=0.5, flip=bool(seed % 2)
        )
        expected = slice(y0, y0 + side), slice(x0, x0 + side)
        step = -1 if flipped else 1
        assert np.array_equal(np.asarray(image_crop), pixels[expected][:, ::step])
        assert np.array_equal(np.asarray(mask_crop), defect[expected][:, ::step])
        assert np.asarray(mask_crop).sum() == defect.sum()  # the whole defect is inside


def test_crop_default_jitter_is_the_cli_default():
    args = parse_args(CLI_BASE)
    image, mask = noise_image((200, 200)), square_mask((200, 200), (94, 94, 106, 106))
    for seed in range(10):
        default = crop_around_mask(image, mask, 32, np.random.default_rng(seed))[2]
        explicit = crop_around_mask(image, mask, 32, np.random.default_rng(seed), jitter=args.crop_jitter)[2]
        assert default == explicit


def test_a_zero_one_mask_is_cropped_like_a_zero_255_one():
    """Any non-zero mask value is defect (the project's binarisation rule), so 0/1 masks work as well."""
    image = noise_image((200, 200))
    for scale in (1, 255):
        _, mask_crop, (_, _, x0, y0, *_rest) = crop_around_mask(
            image, square_mask((200, 200), (20, 150, 30, 160), value=scale), 32, np.random.default_rng(0), 0
        )
        assert (x0, y0) == (25 - 16, 155 - 16)
        assert (np.asarray(mask_crop) == scale).sum() == 100


def test_a_defect_larger_than_the_crop_is_scaled_down_bicubic_with_a_nearest_binary_mask():
    image = noise_image((200, 200))
    yy, xx = np.mgrid[:200, :200]
    disc = (((xx - 100) ** 2 + (yy - 100) ** 2) < 40**2).astype(np.uint8) * 255  # 80 px across
    image_crop, mask_crop, (w, h, x0, y0, side, _) = crop_around_mask(
        image, Image.fromarray(disc), 32, np.random.default_rng(0), jitter=0
    )
    assert w == h < 200 and side == 32 and 79 * w / 200 <= 32.5  # scaled so the 79-px defect fits the window
    box = (x0, y0, x0 + side, y0 + side)
    smooth = np.asarray(image.resize((w, h), Image.BICUBIC).crop(box))
    assert np.array_equal(np.asarray(image_crop), smooth)
    assert set(np.unique(np.asarray(mask_crop))) == {0, 255}  # still binary
    assert abs((np.asarray(mask_crop) > 0).mean() - math.pi / 4) < 0.05  # the disc, filling the window


# ---- to_tensor and the example's tensors -----------------------------------------------------------------
def test_to_tensor_is_float32_channels_first_in_zero_one():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0, 0] = (255, 51, 0)
    tensor = to_tensor(Image.fromarray(rgb))
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 4, 6)
    assert tensor[:, 0, 0].tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert tensor.max() == 1.0 and tensor.min() == 0.0
    grey = to_tensor(Image.fromarray(np.full((4, 6), 255, np.uint8)))
    assert grey.dtype == torch.float32 and grey.shape == (1, 4, 6) and torch.all(grey == 1.0)


def test_an_example_is_its_crop_in_minus_one_to_one_with_a_binary_mask():
    pixels = np.asarray(noise_image((64, 64), seed=3)).copy()
    pixels[0, :] = 0
    pixels[-1, :] = 255
    rows = [row(Image.fromarray(pixels), square_mask()), row(noise_image(), square_mask())]
    dataset = AnomalyTrainingDataset(image_set(rows), 32, random_flip=False)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        item = dataset[0]
        index, w, h, x0, y0, side, flipped = item["key"]
        assert (index, w, h, side, flipped) == (0, 64, 64, 32, False)
        expected = torch.from_numpy(pixels[y0 : y0 + 32, x0 : x0 + 32] / 255.0).permute(2, 0, 1) * 2 - 1
        assert item["pixel_values"].dtype == torch.float32
        assert torch.allclose(item["pixel_values"], expected.float(), atol=1e-6)
        assert item["mask"].shape == item["reference_mask"].shape == (1, 32, 32)
        assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
        assert item["reference"].shape == (3, 32, 32)
    full_range = AnomalyTrainingDataset(image_set(rows), 64, random_flip=False)[0]["pixel_values"]
    assert full_range.min() == -1.0 and full_range.max() == 1.0


def test_grayscale_images_and_rgb_masks_give_rgb_pixels_and_a_one_channel_mask():
    grey = Image.fromarray(np.asarray(noise_image())[..., 0])
    rgb_mask = square_mask().convert("RGB")
    dataset = AnomalyTrainingDataset(image_set([row(grey, rgb_mask), row(grey, rgb_mask)]), 32)
    item = dataset[0]
    assert item["pixel_values"].shape == item["reference"].shape == (3, 32, 32)
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() == 16 * 16


# ---- bad rows name themselves ------------------------------------------------------------------------------
@pytest.mark.parametrize("with_path", [True, False])
def test_a_bad_row_is_named_by_its_path_or_row_number(with_path):
    good = row(noise_image(), square_mask())
    rows = [
        good,
        row(None, square_mask()),
        row(noise_image(), None),
        row(noise_image((64, 48)), square_mask()),
    ]
    if with_path:
        rows = [{**r, "path": f"tile/spot/{i:03d}.png"} for i, r in enumerate(rows)]
    dataset = AnomalyTrainingDataset(image_set(rows), 32)
    name = (lambda i: f"tile/spot/{i:03d}.png") if with_path else (lambda i: f"row {i}")
    with pytest.raises(TrainingInputError, match=f"^{name(1)}: missing image$"):
        dataset._load(1)
    with pytest.raises(TrainingInputError, match=f"^{name(2)}: missing mask$"):
        dataset._load(2)
    with pytest.raises(
        TrainingInputError, match=rf"^{name(3)}: mask size \(64, 64\) differs from image size \(64, 48\)"
    ):
        dataset._load(3)


# ---- randomness: seed, epoch, index ------------------------------------------------------------------------
def _two_type_rows():
    return colour_rows([(255, 0, 0), (200, 0, 0), (150, 0, 0)], "red") + colour_rows(
        [(0, 0, 255), (0, 0, 200)], "blue"
    )


def _examples(dataset, epochs=range(6)):
    out = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        out.extend(dataset[i] for i in range(len(dataset)))
    return out


def _same_examples(a, b) -> bool:
    return all(
        x["key"] == y["key"]
        and x["caption"] == y["caption"]
        and all(
            torch.equal(x[k], y[k])
            for k in ("pixel_values", "mask", "reference", "reference_mask", "has_reference")
        )
        for x, y in zip(a, b, strict=True)
    )


def test_dataset_and_sampler_defaults_are_the_cli_defaults():
    """Building the dataset or the sampler in code without options trains the documented recipe."""
    args = parse_args(CLI_BASE)
    data = image_set(_two_type_rows())
    default = AnomalyTrainingDataset(data, 32)
    explicit = AnomalyTrainingDataset(
        data, 32, seed=args.seed, crop_jitter=args.crop_jitter, random_flip=args.random_flip,
        caption_drop_prob=args.caption_drop_prob, reference_drop_prob=args.reference_drop_prob,
        joint_drop_prob=args.joint_drop_prob, reference_mismatch_prob=args.reference_mismatch_prob,
    )  # fmt: skip
    assert _same_examples(_examples(default, range(20)), _examples(explicit, range(20)))
    sampler, explicit_sampler = EpochBatchSampler(10, 2), EpochBatchSampler(10, 2, 1, 0, args.seed)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        explicit_sampler.set_epoch(epoch)
        assert list(sampler) == list(explicit_sampler)


def test_a_new_dataset_and_sampler_start_at_epoch_zero_from_the_first_batch():
    data = image_set(_two_type_rows())
    fresh, reset = AnomalyTrainingDataset(data, 32), AnomalyTrainingDataset(data, 32)
    reset.set_epoch(5)
    reset.set_epoch(0)
    assert _same_examples([fresh[i] for i in range(len(fresh))], [reset[i] for i in range(len(reset))])
    sampler, again = EpochBatchSampler(10, 2, seed=4), EpochBatchSampler(10, 2, seed=4)
    again.set_epoch(0)
    assert list(sampler) == list(again) and len(list(sampler)) == 5


def test_examples_are_drawn_per_seed_epoch_and_index():
    """Two identical rows get their own crops; another seed or epoch gives other crops."""
    same = row(noise_image((128, 128)), square_mask((128, 128), (56, 56, 72, 72)))
    data = image_set([same, same])

    def keys(seed, epoch):
        dataset = AnomalyTrainingDataset(data, 32, seed=seed, crop_jitter=1.0)
        dataset.set_epoch(epoch)
        return [dataset[i]["key"][1:] for i in range(2)]

    draws = [keys(seed, epoch) for seed in range(3) for epoch in range(3)]
    assert any(a != b for a, b in draws)  # index 0 and 1 differ
    assert len({tuple(d) for d in draws}) == len(draws)  # every (seed, epoch) its own
    assert keys(1, 2) == keys(1, 2)


def test_dataset_jitter_and_flip_follow_their_options():
    data = image_set([row(noise_image((128, 128)), square_mask((128, 128), (56, 56, 72, 72)))] * 2)
    fixed = _examples(AnomalyTrainingDataset(data, 32, crop_jitter=0, random_flip=False), range(40))
    assert {e["key"][1:] for e in fixed} == {(128, 128, 48, 48, 32, False)}  # centred, never flipped
    moving = _examples(AnomalyTrainingDataset(data, 32, crop_jitter=0.5, random_flip=True), range(100))
    positions = {e["key"][3:5] for e in moving}
    assert len(positions) > 10 and all(abs(x - 48) <= 8 and abs(y - 48) <= 8 for x, y in positions)
    flips = sum(e["key"][-1] for e in moving)
    assert abs(flips - 100) <= 4.5 * math.sqrt(200 * 0.25)  # half of 200 examples
    flipped = next(e for e in moving if e["key"][-1])
    _, w, h, x0, y0, side, _ = flipped["key"]
    assert (w, h) == (128, 128)
    crop = np.asarray(data[0]["image"])[y0 : y0 + side, x0 : x0 + side][:, ::-1]
    assert torch.allclose(
        flipped["pixel_values"], torch.from_numpy(crop / 127.5 - 1).permute(2, 0, 1).float(), atol=1e-6
    )


def test_the_reference_is_another_row_of_the_same_type_unless_it_is_alone():
    colours = [(255, 0, 0), (200, 0, 0), (150, 0, 0), (100, 0, 0)]
    rows = colour_rows(colours, "red") + colour_rows([(0, 0, 255)], "blue")
    dataset = AnomalyTrainingDataset(
        image_set(rows), 32, reference_mismatch_prob=0, caption_drop_prob=0, reference_drop_prob=0,
        joint_drop_prob=0,
    )  # fmt: skip
    seen = set()
    for epoch in range(20):
        dataset.set_epoch(epoch)
        for i in range(len(colours)):
            red = round(float(dataset[i]["reference"][0].mean()) * 255)  # the reference is in [0, 1]
            assert red in {c[0] for c in colours} and red != colours[i][0]
            seen.add((i, red))
        assert dataset[4]["reference"][2].mean() == 1.0  # alone in its type: its own image
    assert len(seen) == len(colours) * (len(colours) - 1)  # every other row of the type is drawn


def test_a_zero_mismatch_probability_never_mismatches_even_on_a_zero_draw(monkeypatch):
    dataset = AnomalyTrainingDataset(
        image_set(_two_type_rows()), 32, crop_jitter=0, random_flip=False, caption_drop_prob=0,
        reference_drop_prob=0, joint_drop_prob=0, reference_mismatch_prob=0,
    )  # fmt: skip
    monkeypatch.setattr(data_module, "_rng", lambda *key: FixedDraws(0.0))
    for i in range(len(dataset)):
        item = dataset[i]
        own_is_red = dataset.group_of[i][1] == "red"
        assert item["caption"] != "" and bool(item["has_reference"])
        assert bool(item["reference"][0].mean() > item["reference"][2].mean()) == own_is_red


# ---- condition dropout at its boundaries -------------------------------------------------------------------
def test_dropout_probabilities_are_half_open_intervals_of_one_draw():
    """``joint`` covers [0, joint), caption the next ``caption``, reference the next: a probability of 0 never
    drops, even on a draw of exactly 0; a draw on a boundary belongs to the next interval."""
    assert draw_dropped_condition(FixedDraws(0.0), 0, 0, 0) is None
    assert draw_dropped_condition(FixedDraws(0.0), 0, 0.5, 0) == "reference"
    assert draw_dropped_condition(FixedDraws(0.0), 0.5, 0, 0) == "caption"
    joint, caption, reference = 0.125, 0.25, 0.375  # exact in binary: the sums are too
    expected = {
        0.0: "both",
        0.125: "caption",
        0.25: "caption",
        0.375: "reference",
        0.5: "reference",
        0.75: None,
    }
    for u, kind in expected.items():
        assert draw_dropped_condition(FixedDraws(u), caption, reference, joint) == kind, u


# ---- which rows are trained on ----------------------------------------------------------------------------
def schema_set(rows):
    """Rows of (category, defect_type, is_anomaly, fold, caption) in the MVTec Caption schema, with an id."""
    from datasets import Dataset

    names = ("category", "defect_type", "is_anomaly", "fold", "caption")
    columns = {k: [r[j] for r in rows] for j, k in enumerate(names)}
    return Dataset.from_dict({"id": list(range(len(rows))), "image": [None] * len(rows),
                              "mask": [None] * len(rows), **columns})  # fmt: skip


SCHEMA_ROWS = [
    ("bottle", "scratch", True, "generator", "a scratch"),  # 0
    ("bottle", "scratch", True, "evaluation", "a scratch"),  # 1
    ("bottle", "dent", True, "generator", "a dent"),  # 2
    ("bottle", "good", False, "", ""),  # 3
    ("cable", "scratch", True, "generator", "a cut"),  # 4
    ("cable", "scratch", True, "evaluation", "a cut"),  # 5
    ("cable", "good", False, "", ""),  # 6
    ("cable", "dent", True, "evaluation", "a dent"),  # 7
]


@pytest.mark.parametrize(
    "options, train, normals",
    [
        ({}, [0, 2, 4], [3, 6]),
        ({"train_fold": "all"}, [0, 1, 2, 4, 5, 7], [3, 6]),
        ({"categories": ["cable"]}, [4], [6]),
        ({"categories": ["cable"], "train_fold": "all"}, [4, 5, 7], [6]),
        ({"defect_types": ["scratch"]}, [0, 4], [3, 6]),
        ({"defect_types": ["dent"], "train_fold": "all"}, [2, 7], [3, 6]),
    ],
)
def test_selection_keeps_the_asked_fold_categories_and_defect_types(options, train, normals):
    selected = select_training_data(schema_set(SCHEMA_ROWS), **options)
    assert selected.train["id"] == train and selected.normals["id"] == normals


def test_selection_refusals_name_the_flag_and_the_source():
    data = schema_set(SCHEMA_ROWS)
    with pytest.raises(TrainingInputError, match=r"^--defect_types \['bent'\] not in the dataset; it has "):
        select_training_data(data, defect_types=["bent"])
    with pytest.raises(TrainingInputError, match=r"^--categories \['grid'\] not in my data; it has "):
        select_training_data(data, categories=["grid"], source="my data")
    with pytest.raises(TrainingInputError, match=r"^No anomalies to train on in the dataset"):
        select_training_data(data, categories=["cable"], defect_types=["dent"])


def test_uncaptioned_anomalies_are_refused_naming_the_first():
    rows = list(SCHEMA_ROWS)
    rows[2] = ("bottle", "dent", True, "generator", None)
    rows[4] = ("cable", "scratch", True, "generator", "   ")
    with pytest.raises(
        TrainingInputError,
        match=r"^2 training anomalies of the dataset have no caption \(first: row 2, bottle/dent\)$",
    ):
        select_training_data(schema_set(rows))


# ---- loading --------------------------------------------------------------------------------------------
def test_the_dataset_config_and_cache_dir_reach_the_loader(monkeypatch):
    from datasets import Dataset, DatasetDict

    calls = []

    def loader(source, config=None, cache_dir=None):
        calls.append((source, config, cache_dir))
        return DatasetDict(train=Dataset.from_dict({"id": [0]}), test=Dataset.from_dict({"id": [1, 2]}))

    monkeypatch.setattr(data_module, "load_source", loader)
    loaded = load_mvtec_caption("some/mvtec_caption", "loco", "/tmp/hf-cache")
    assert calls == [("some/mvtec_caption", "loco", "/tmp/hf-cache")]
    assert sorted(loaded["id"]) == [0, 1, 2]  # every split in one dataset


def test_a_dataset_that_cannot_be_loaded_is_named_with_its_error(monkeypatch):
    def loader(source, config=None, cache_dir=None):
        raise FileNotFoundError("no such folder: data/x")

    monkeypatch.setattr(data_module, "load_source", loader)
    with pytest.raises(TrainingInputError) as refused:
        load_mvtec_caption("data/x", "ad")
    assert str(refused.value) == (
        "--dataset_name 'data/x' (--dataset_config 'ad') could not be loaded with datasets.load_dataset: "
        "FileNotFoundError: no such folder: data/x"
    )


# ---- the decoded-image cache ----------------------------------------------------------------------------
class CountingReads:
    """A ``datasets.Dataset`` that counts the reads of each row."""

    def __init__(self, dataset):
        self.dataset, self.reads = dataset, [0] * len(dataset)
        self.column_names = dataset.column_names

    def select_columns(self, columns):
        return self.dataset.select_columns(columns)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads[index] += 1
        return self.dataset[index]


@pytest.mark.parametrize("fits", [0, 2, 4])
def test_the_decoded_cache_keeps_exactly_the_rows_its_mib_budget_holds(fits):
    """A 32×16 row takes 4 bytes a pixel decoded (RGB + L): a budget of ``fits`` such rows keeps that many."""
    rows = [row(noise_image((32, 16), seed=i), square_mask((32, 16), (8, 4, 16, 12))) for i in range(4)]
    reads = CountingReads(image_set(rows))
    dataset = AnomalyTrainingDataset(reads, 32, decoded_cache_mb=fits * 4 * 32 * 16 / 2**20)
    _examples(dataset, range(3))
    assert sum(n == 1 for n in reads.reads) == fits  # cached rows are decoded once, the others every time


# ---- the batch order --------------------------------------------------------------------------------------
def _orders(seed: int, epochs=range(3), size: int = 20) -> list[list[list[int]]]:
    sampler = EpochBatchSampler(size, 4, seed=seed)
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_the_order_is_reshuffled_every_epoch_and_depends_on_the_seed():
    orders = [_orders(seed) for seed in range(3)]
    flat = [sum(epoch, []) for seed in orders for epoch in seed]
    assert all(sorted(o) == list(range(20)) for o in flat)  # one process: every row once per epoch
    assert len({tuple(o) for o in flat}) == len(flat)  # each (seed, epoch) its own order
    assert _orders(1) == orders[1]


@pytest.mark.parametrize("size, batch_size, replicas", [(10, 2, 3), (7, 3, 2), (12, 4, 3)])
def test_every_process_gets_full_batches_that_together_cover_the_epoch(size, batch_size, replicas):
    per_rank = []
    for rank in range(replicas):
        sampler = EpochBatchSampler(size, batch_size, replicas, rank, seed=2)
        sampler.set_epoch(1)
        per_rank.append(list(sampler))
    steps = math.ceil(size / (batch_size * replicas))
    assert all(len(batches) == steps for batches in per_rank)
    assert all(len(batch) == batch_size for batches in per_rank for batch in batches)
    dealt = [i for b in range(steps) for batches in per_rank for i in batches[b]]
    assert sorted(dealt[:size]) == list(range(size))  # the epoch's rows first, then the wrap-around
