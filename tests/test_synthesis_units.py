"""The synthesis core, plan and source, one function at a time (no pipeline: fast enough for mutation testing).

The end-to-end behaviour is in test_synthesis.py; here each promise is checked where it is made: per-item
seeds, batching, atomic writes, resume refusals, what the plan reads and what the source refuses.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from axf_pipeline.synthesis import core
from axf_pipeline.synthesis.core import (
    MARKER,
    Item,
    Prepared,
    Summary,
    SynthesisError,
    atomic_write,
    check_model,
    check_output,
    claim_output,
    image_size,
    item_seed,
    plan_batches,
    report_input_error,
    run_items,
)
from axf_pipeline.synthesis.fingerprint import content_hash, files_fingerprint, publishable_name
from axf_pipeline.synthesis.masks import TEXTURE_CATEGORIES
from axf_pipeline.synthesis.plan import digits, mark_fallbacks, plan_items, select, texture_categories_of
from axf_pipeline.synthesis.source import SourceData

# ------------------------------------------------------------------ a tiny source dataset
SIDE = 24


def _png(array: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(array)


def _normal(i: int) -> PIL.Image.Image:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 20, (SIDE, SIDE, 3)).astype(np.uint8)
    pixels[6:18, 6:18] = 100 + 3 * i  # an object, a different grey per image
    return _png(pixels)


def _mask(y: int, x: int, height: int = 4, width: int = 6) -> PIL.Image.Image:
    m = np.zeros((SIDE, SIDE), np.uint8)
    m[y : y + height, x : x + width] = 255
    return _png(m)


BROKEN_SIZES = [(2, 2), (6, 6), (3, 9)]  # areas 4, 36, 27: a sampled mask tells which one it transformed


def _source_dict(root: Path, *, fold_eval_all: bool = False, by_path: bool = False) -> datasets.DatasetDict:
    """bottle (object) with two defect types, grid (texture) with one, an evaluation-fold row per type; cable
    has train normals only, wood anomalies only. ``by_path``: every image and mask is a PNG file under
    ``root/files`` and the Image columns hold its path (as a dataset built from files and written to parquet
    does), not its bytes."""
    train = {"image": [], "category": [], "is_anomaly": [], "path": []}
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    for category, n in (("bottle", 6), ("grid", 4), ("cable", 2)):
        for i in range(n):
            image = _normal(i if category == "bottle" else 10 + i)
            if category == "grid":
                image = image.convert("L")  # MVTec's grid is grayscale
            elif category == "cable":  # built from files (save_to_disk embeds their bytes)
                image.save(files / f"cable_{i}.png")
                image = str(files / f"cable_{i}.png")
            train["image"].append(image)
            train["category"].append(category)
            train["is_anomaly"].append(False)
            train["path"].append(f"{category}/train/good/{i:03d}.png")
    test = {
        k: [] for k in ("image", "mask", "caption", "category", "defect_type", "is_anomaly", "fold", "path")
    }

    def add(category, defect, fold, i, y, x, anomaly=True, size=(4, 6)):
        image = _normal(40 + len(test["image"]))
        test["image"].append(image.convert("L") if category == "grid" else image)
        mask = _mask(y, x, *size) if anomaly else _png(np.zeros((SIDE, SIDE), np.uint8))
        if defect == "crack":
            mask = _png(np.asarray(mask) // 255)  # a 0/1 mask
        elif category == "wood":
            mask = mask.convert("RGB")  # a mask saved with three channels
        test["mask"].append(mask)
        test["caption"].append(f"a {defect} {category} #{i}")
        test["category"].append(category)
        test["defect_type"].append(defect if anomaly else "good")
        test["is_anomaly"].append(anomaly)
        test["fold"].append("evaluation" if fold_eval_all else fold)
        test["path"].append(f"{category}/test/{defect}/{i:03d}.png")

    for i in range(3):
        add("bottle", "broken", "generator", i, 8 + i, 8, size=BROKEN_SIZES[i])
    add("bottle", "broken", "evaluation", 3, 2, 2)
    for i in range(2):
        add("bottle", "crack", "generator", i, 10, 6 + i)
    add("bottle", "crack", "evaluation", 2, 2, 2)
    for i in range(2):
        add("grid", "bent", "generator", i, 4 + 2 * i, 4)
    add("grid", "bent", "evaluation", 2, 2, 2)
    add("grid", "good", "evaluation", 3, 0, 0, anomaly=False)
    add("wood", "hole", "generator", 0, 5, 5)
    features = datasets.Features(
        {"image": datasets.Image(), "category": datasets.Value("string"), "is_anomaly": datasets.Value("bool"),
         "path": datasets.Value("string")}
    )  # fmt: skip
    test_features = datasets.Features(
        {"image": datasets.Image(), "mask": datasets.Image(), "caption": datasets.Value("string"),
         "category": datasets.Value("string"), "defect_type": datasets.Value("string"),
         "is_anomaly": datasets.Value("bool"), "fold": datasets.Value("string"), "path": datasets.Value("string")}
    )  # fmt: skip
    if by_path:
        for split, rows in (("train", train), ("test", test)):
            for column in ("image", "mask") if split == "test" else ("image",):
                for i, image in enumerate(rows[column]):
                    if not isinstance(image, str):
                        image.save(files / f"{split}_{column}_{i}.png")
                        rows[column][i] = str(files / f"{split}_{column}_{i}.png")
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(train, features),
            "test": datasets.Dataset.from_dict(test, test_features),
        }
    )


def _build(root: Path, *, fold_eval_all: bool = False) -> Path:
    """The source of ``_source_dict`` saved with ``save_to_disk`` (which embeds every image's bytes)."""
    folder = root / ("all_eval" if fold_eval_all else "source")
    _source_dict(root, fold_eval_all=fold_eval_all).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("source"))


@pytest.fixture  # per test: mutation testing maps SourceData's code to every test that builds one
def source(source_dir) -> SourceData:
    return SourceData(str(source_dir), "ad")


# ------------------------------------------------------------------ seeds: one per item, from the item alone
def test_item_seed_differs_for_every_item_and_depends_on_its_identity_alone():
    keys = [
        (s, c, t, k)
        for s in (0, 1)
        for c in ("bottle", "grid")
        for t in ("broken", "crack")
        for k in range(8)
    ]
    seeds = [item_seed(*key) for key in keys]
    assert len(set(seeds)) == len(keys)  # each of seed, category, type and k changes the seed
    assert seeds == [item_seed(*key) for key in keys]  # a pure function: same identity, same seed
    assert all(0 <= s < 2**63 for s in seeds)  # fits torch.Generator.manual_seed and numpy
    assert item_seed(0, "bottle", "crack", 1) != item_seed(0, "crack", "bottle", 1)  # order is identity too
    # spread over the 63 bits, not a small counter
    assert max(seeds) > 2**60 and len({s >> 59 for s in seeds}) > 4


def test_plan_seeds_every_item_from_seed_category_type_k_alone(source):
    pairs = [("bottle", "broken"), ("bottle", "crack"), ("grid", "bent")]
    items = plan_items(source, pairs, 4, seed=7)
    assert [(i.record["category"], i.record["defect_type"]) for i in items] == [
        p for p in pairs for _ in range(4)
    ]
    for item in items:
        category, defect = item.record["category"], item.record["defect_type"]
        k = int(Path(item.image_path).stem)
        assert item.seed == item.record["seed"] == item_seed(7, category, defect, k)
    assert len({item.seed for item in items}) == len(items)
    # an item does not depend on what else is planned: alone, with fewer items, it is the same item
    alone = plan_items(source, [("grid", "bent")], 2, seed=7)
    for a, b in zip(alone, items[8:10], strict=True):
        assert (a.seed, a.record, a.image_path, a.mask_path, a.size) == (
            b.seed,
            b.record,
            b.image_path,
            b.mask_path,
            b.size,
        )
        pa, pb = a.prepare(), b.prepare()
        assert np.array_equal(np.asarray(pa.mask), np.asarray(pb.mask))
        assert np.array_equal(np.asarray(pa.image), np.asarray(pb.image)) and pa.prompt == pb.prompt
    other = plan_items(source, [("grid", "bent")], 2, seed=8)
    assert [o.seed for o in other] != [a.seed for a in alone]


def test_every_item_gets_its_own_noise_whatever_the_batch(tmp_path):
    class NoisePipe:
        """Returns, per item, an image of the first noise its generator draws (what diffusion starts from)."""

        def __init__(self):
            self.calls = []

        def __call__(self, *, prompt, image, mask_image, reference_image, reference_mask, generator, **kw):
            self.calls.append({"prompt": prompt, "n": len(image), "ref": reference_image, "kw": kw})
            noise = [torch.randn(4, generator=g) for g in generator]
            images = [PIL.Image.new("L", (2, 2), int(n.abs().sum() * 40) % 256) for n in noise]
            self.noise = getattr(self, "noise", []) + noise
            return type("Out", (), {"images": images})()

    def items():
        return [
            Item(f"img/{k}.png", f"mask/{k}.png", item_seed(0, "bottle", "broken", k), (2, 2),
                 lambda: Prepared(PIL.Image.new("RGB", (2, 2)), PIL.Image.new("L", (2, 2), 255), "p"))
            for k in range(5)
        ]  # fmt: skip

    state = type("State", (), {"num_processes": 1, "process_index": 0,
                               "split_between_processes": staticmethod(lambda b: _Ctx(b))})()  # fmt: skip
    one, many = NoisePipe(), NoisePipe()
    run_items(one, items(), tmp_path / "a", 1, {"num_inference_steps": 2}, progress=False, state=state)
    summary = run_items(
        many, items(), tmp_path / "b", 3, {"num_inference_steps": 2}, progress=False, state=state
    )
    assert [c["n"] for c in one.calls] == [1] * 5 and [c["n"] for c in many.calls] == [3, 2]
    assert many.calls[0]["kw"] == {"num_inference_steps": 2} and many.calls[0]["prompt"] == ["p"] * 3
    assert many.calls[0]["ref"] is None
    noise = [n.tolist() for n in many.noise]
    assert len({tuple(n) for n in noise}) == 5  # distinct items, distinct noise
    assert noise == [n.tolist() for n in one.noise]  # the same noise in batches of 1 and of 3
    assert (summary.made, summary.skipped) == (5, 0)
    for k in range(5):
        assert (tmp_path / "b" / f"mask/{k}.png").is_file() and (tmp_path / "b" / f"img/{k}.png").is_file()
    assert not list((tmp_path / "b").rglob(".*"))  # no temporary file left behind
    # a rerun skips what is finished; a batch with one missing image reruns only that file's batch
    (tmp_path / "b" / "img/4.png").unlink()
    again = NoisePipe()
    summary = run_items(again, items(), tmp_path / "b", 3, {}, progress=False, state=state)
    assert (summary.made, summary.skipped) == (1, 4) and [c["n"] for c in again.calls] == [2]


class _Ctx:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------ batching, summary, files
def test_batches_group_same_sized_items_in_item_order():
    sizes = [(4, 4), (8, 8), (4, 4), (4, 4), (8, 8), (4, 4), (4, 4)]
    items = [Item("i", "m", 0, s, lambda: None) for s in sizes]
    assert plan_batches(items, 2) == [[0, 2], [1, 4], [3, 5], [6]]  # full batches as they fill
    assert plan_batches(items, 3) == [[0, 2, 3], [1, 4], [5, 6]]
    assert plan_batches(items, 1) == [[i] for i in range(7)]
    with pytest.raises(SynthesisError, match="--batch-size must be at least 1, got 0"):
        plan_batches(items, 0)


def test_summary_line_and_rate(capsys):
    s = Summary(made=6, skipped=2, seconds=3.0)
    assert s.images_per_second == 2.0
    assert (
        s.line("axf synthesize")
        == "axf synthesize: made 6, skipped 2 (already finished), 3.0 s, 2.00 images/s"
    )
    assert Summary(3, 0, 0.0).images_per_second == 0.0
    assert report_input_error("axf generate", SynthesisError("bad\n  thing")) == 2
    assert capsys.readouterr().err == "axf generate: error: bad thing\n"


def test_atomic_write_replaces_whole_files_and_cleans_up_on_failure(tmp_path):
    path = tmp_path / "deep" / "a.txt"
    atomic_write(path, lambda tmp: tmp.write_text("one"))
    assert path.read_text() == "one"

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "one" and sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_image_size_reads_the_header_or_names_the_file(tmp_path):
    PIL.Image.new("RGB", (7, 5)).save(tmp_path / "a.png")
    assert image_size(tmp_path / "a.png") == (7, 5)
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(SynthesisError, match=r"cannot read image .*b\.png: UnidentifiedImageError"):
        image_size(tmp_path / "b.png")


def test_check_model_needs_an_axf_pipeline(tmp_path, monkeypatch):
    good = tmp_path / "axf"
    good.mkdir()
    (good / "model_index.json").write_text(json.dumps({"mif": ["axf_pipeline", "MultiModalInFusion"]}))
    check_model(str(good))
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(SynthesisError, match=r"is not an AnomalyXFusion pipeline: .* no mif"):
        check_model(str(sd))
    (sd / "model_index.json").write_text(json.dumps({"mif": [None, None]}))
    with pytest.raises(SynthesisError, match="no mif"):
        check_model(str(sd))
    (sd / "model_index.json").write_text("{")
    with pytest.raises(SynthesisError, match=r"model_index.json is not valid JSON"):
        check_model(str(sd))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        SynthesisError, match="has no model_index.json: not a saved diffusers pipeline folder"
    ):
        check_model(str(tmp_path / "empty"))
    for missing in (str(tmp_path / "nowhere"), "./x/y", "a/b/c"):
        with pytest.raises(SynthesisError, match=r"does not exist \(neither a folder nor a Hub id\)"):
            check_model(missing)
    with pytest.raises(
        SynthesisError, match=r"--model plain: cannot fetch its model_index.json from the Hub"
    ):
        check_model("plain")  # a bare name may be a (legacy) Hub id: offline, an error naming it
    # a Hub id is checked through its model_index.json; offline: an error naming the model
    import huggingface_hub

    def offline(repo, name, **kwargs):
        assert (repo, name) == ("org/model", "model_index.json")
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(
        SynthesisError, match=r"--model org/model: cannot fetch its model_index.json from the Hub \(OSError\)"
    ):
        check_model("org/model")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kwargs: str(good / name))
    check_model("org/model")


def test_output_folder_is_claimed_resumed_or_refused(tmp_path):
    out = tmp_path / "out"
    settings = {"seed": 0, "steps": 2}
    check_output(out, "axf synthesize", settings, ["a.png"])  # absent: fine
    out.mkdir()
    check_output(out, "axf synthesize", settings, ["a.png"])  # empty: fine
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        SynthesisError, match=rf"it holds notes.txt, which `axf synthesize` did not write \(no {MARKER}\)"
    ):
        check_output(out, "axf synthesize", settings, ["a.png"])
    (out / "notes.txt").unlink()
    (out / "sub").mkdir()
    (out / "sub" / f".a.png{core._TMP}123").write_text("half")  # a killed run's temporary file
    claim_output(out, "axf synthesize", settings)
    assert not (out / "sub" / f".a.png{core._TMP}123").exists()
    assert json.loads((out / MARKER).read_text()) == {"command": "axf synthesize", "settings": settings}
    (out / "sub" / f".b.png{core._TMP}9").write_text("half")
    (out / "a.png").write_text("done")
    check_output(out, "axf synthesize", settings, ["a.png"])  # resume: our files and temporaries pass
    with pytest.raises(SynthesisError, match=r"seed=0, this run has seed=1"):
        check_output(out, "axf synthesize", {"seed": 1, "steps": 2}, ["a.png"])
    with pytest.raises(SynthesisError, match=r"made with extra=None, this run has extra=1"):
        check_output(out, "axf synthesize", {**settings, "extra": 1}, ["a.png"])
    with pytest.raises(SynthesisError, match="written by `axf synthesize`, not `axf generate`"):
        check_output(out, "axf generate", settings, ["a.png"])
    with pytest.raises(SynthesisError, match=r"it holds a.png, which this run would not write"):
        check_output(out, "axf synthesize", settings, ["b.png"])
    (out / MARKER).write_text("{")
    with pytest.raises(SynthesisError, match=rf"{MARKER} is unreadable"):
        check_output(out, "axf synthesize", settings, ["a.png"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SynthesisError, match="is a file, not a folder"):
        check_output(tmp_path / "file", "axf synthesize", settings, [])


def test_resume_is_by_content_and_a_change_names_what_changed(tmp_path):
    out = tmp_path / "out"
    made = {"seed": 0, "content": {"--model": "sha256:" + "a" * 64, "--dataset": "sha256:" + "b" * 64}}
    claim_output(out, "axf synthesize", made)
    assert "/" not in (out / MARKER).read_text()  # no path in the record, contents only
    check_output(out, "axf synthesize", json.loads(json.dumps(made)), [])  # same contents: resumes
    retrained = {**made, "content": {**made["content"], "--model": "sha256:" + "c" * 64}}
    with pytest.raises(SynthesisError) as err:
        check_output(out, "axf synthesize", retrained, [])
    assert str(err.value) == (
        f"Refusing to resume {out}: the content of --model changed since it was made "
        "(sha256:aaaaaaaaaaaa then, sha256:cccccccccccc now); rerun with the same --model or choose another --output"
    )
    claim_output(out, "axf synthesize", {"seed": 0, "content": {"--model": made["content"]["--model"]}})
    with pytest.raises(SynthesisError, match=r"content of --dataset changed .*\(none recorded then"):
        check_output(out, "axf synthesize", made, [])


def test_content_hash_follows_the_weights_not_the_path(tmp_path):
    model = tmp_path / "model"
    for name in ("unet", "vae", "checkpoint-5"):
        (model / name).mkdir(parents=True)
        (model / name / "weights.safetensors").write_bytes(name.encode())
    (model / "model_index.json").write_text(
        json.dumps({"unet": ["diffusers", "U"], "vae": ["diffusers", "V"]})
    )
    first = content_hash(model)
    (model / "README.md").write_text("a card")  # neither the card, nor a checkpoint beside the pipeline,
    (model / "checkpoint-5" / "weights.safetensors").write_bytes(b"other")  # nor a hidden file counts
    (model / "unet" / ".cache").write_text("x")
    assert content_hash(model) == first
    import shutil

    shutil.copytree(model, tmp_path / "moved" / "model")
    assert content_hash(tmp_path / "moved" / "model") == first  # the same bytes elsewhere: the same hash
    (model / "unet" / "weights.safetensors").write_bytes(b"retrained")  # retrained in place
    assert content_hash(model) != first
    name = publishable_name(model)
    assert name == f"model@sha256:{content_hash(model)[:12]}" and str(tmp_path) not in name
    assert publishable_name("org/model") == "org/model"  # a Hub id as typed
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    assert files_fingerprint([("x", a)]) != files_fingerprint([("x", b)])
    assert files_fingerprint([("x", a)]) != files_fingerprint([("y", a)])


# ------------------------------------------------------------------ plan
def test_digits_widen_past_three_only_when_needed():
    assert [digits(n) for n in (0, 1, 1000, 1001, 10001)] == [3, 3, 3, 4, 5]


def test_select_checks_names_and_keeps_only_pairs_with_a_generator_fold(source, source_dir, tmp_path):
    pairs = [("bottle", "broken"), ("bottle", "crack"), ("grid", "bent")]
    assert select(source, ["bottle", "grid"], None) == pairs
    assert select(source, ["grid"], None) == [("grid", "bent")]  # 4 normals: none held out, all bases
    assert select(source, ["bottle"], ["crack"]) == [("bottle", "crack")]
    with pytest.raises(SynthesisError, match=r"unknown category 'bottel'; .* has bottle, cable, grid, wood$"):
        select(source, ["bottel"], None)
    with pytest.raises(
        SynthesisError, match=r"unknown defect type 'bent' in categories bottle; available: broken, crack"
    ):
        select(source, ["bottle"], ["bent"])
    with pytest.raises(SynthesisError, match=r"unknown defect type 'x' in categories cable; available: $"):
        select(source, ["cable"], ["x"])
    with pytest.raises(
        SynthesisError, match=r"'hole' in categories bottle, grid; available: bent, broken, crack$"
    ):
        select(source, ["bottle", "grid"], ["hole"])
    with pytest.raises(SynthesisError, match=r"category 'grid' of .* has no anomalies \(test split\)"):
        select(source, ["bottle", "grid"], ["crack"])
    with pytest.raises(SynthesisError, match=r"category 'cable' of .* has no anomalies \(test split\)"):
        select(source, None, None)  # every category by default: cable has normals only
    with pytest.raises(SynthesisError, match=r"category 'wood' of .* has no train normals to start from"):
        select(source, ["wood"], None)
    no_gen = SourceData(str(_build(tmp_path, fold_eval_all=True)), "ad")
    with pytest.raises(
        SynthesisError,
        match=r"defect type bottle/broken has no generator-fold anomaly in .*; drop it with --defect-types$",
    ):
        select(no_gen, ["bottle"], None)


def test_plan_reads_train_normals_and_generator_fold_only(source):
    items = plan_items(source, [("bottle", "broken"), ("grid", "bent")], 12, seed=0, model="m")
    bases, held = source.bases_and_held_out("bottle")
    assert len(bases) == 5 and len(held) == 1  # 6 normals: the last is held out
    for item in items:
        r = item.record
        assert r["source_image"].split("/")[:3] == [r["category"], "train", "good"]
        assert r["source_image"] != "bottle/train/good/005.png"  # never the held-out normal
        assert (
            r["mask_source"].split("/")[2] == r["defect_type"]
            and r["reference"].split("/")[2] == r["defect_type"]
        )
        assert int(r["mask_source"][-7:-4]) < 3 and int(r["reference"][-7:-4]) < 3  # generator rows only
        assert r["caption"].startswith(f"a {r['defect_type']} {r['category']} #")
        assert r["is_anomaly"] is True and r["model"] == "m"
        assert item.image_path == f"mvtec/{r['category']}/test/{r['defect_type']}/{item.image_path[-7:]}"
        assert item.mask_path == item.image_path.replace("/test/", "/ground_truth/").replace(
            ".png", "_mask.png"
        )
        assert item.size == (SIDE, SIDE)
        assert item.context["base"] == int(r["source_image"][-7:-4]) + (6 if r["category"] == "grid" else 0)
        assert source.path("test", source.generator[(r["category"], r["defect_type"])][
            item.context["mask_source"]]) == r["mask_source"]  # fmt: skip
    # draws vary over items: several normals, masks, captions and references are used
    for key in ("source_image", "mask_source", "caption", "reference"):
        assert len({i.record[key] for i in items[:12]}) >= 2, key
    assert [Path(i.image_path).stem for i in items[:12]] == [f"{k:03d}" for k in range(12)]


def test_prepared_item_has_its_normal_a_new_mask_on_it_and_its_reference(source):
    items = plan_items(source, [("bottle", "broken")], 3, seed=0)
    for item in items:
        p = item.prepare()
        assert np.array_equal(np.asarray(p.image), np.asarray(source.normal(item.context["base"])))
        mask = np.asarray(p.mask)
        assert p.mask.mode == "L" and set(np.unique(mask)) <= {0, 255} and (mask > 0).any()
        assert p.prompt == item.record["caption"]
        index = int(item.record["reference"][-7:-4])
        ref, ref_mask = source.anomaly(index)
        assert np.array_equal(np.asarray(p.reference), np.asarray(ref))
        assert np.array_equal(np.asarray(p.reference_mask), np.asarray(ref_mask))
    plain = plan_items(source, [("bottle", "broken")], 1, seed=0, prompt="a scratch", reference=False)[0]
    p = plain.prepare()
    assert p.prompt == plain.record["caption"] == "a scratch" and plain.record["reference"] == ""
    assert p.reference is None and p.reference_mask is None
    with pytest.raises(SynthesisError, match="--num-per-defect-type must be at least 1, got 0"):
        plan_items(source, [("bottle", "broken")], 0, seed=0)


# ------------------------------------------------------------------ source
def test_source_indexes_by_category_and_fold(source, source_dir):
    assert source.name == f"{source_dir} (ad)"
    assert source.categories == ["bottle", "cable", "grid", "wood"]
    assert dict(source.all_types) == {"bottle": {"broken", "crack"}, "grid": {"bent"}, "wood": {"hole"}}
    assert source.generator[("bottle", "broken")] == [0, 1, 2] and source.generator[("grid", "bent")] == [
        7,
        8,
    ]
    assert source.normals["bottle"] == list(range(6)) and source.normals["grid"] == list(range(6, 10))
    assert source.bases_and_held_out("bottle") == ([0, 1, 2, 3, 4], [5])  # the last floor(6 / 5)
    assert source.bases_and_held_out("grid") == ([6, 7, 8, 9], [])
    assert source.bases_and_held_out("none") == ([], [])
    assert (
        source.path("train", 3) == "bottle/train/good/003.png" and source.caption(1) == "a broken bottle #1"
    )
    assert source.normal_size(0) == (SIDE, SIDE)
    assert np.array_equal(np.asarray(source.normal(2)), np.asarray(_normal(2)))
    assert PIL.Image.open(io.BytesIO(source.normal_bytes(2))).convert("RGB").tobytes() == _normal(2).tobytes()
    image, mask = source.anomaly(1)
    assert (
        image.mode == "RGB"
        and mask.mode == "L"
        and np.array_equal(np.asarray(mask), np.asarray(_mask(9, 8, 6, 6)))
    )
    masks = source.generator_masks("bottle", "crack")
    assert len(masks) == 2 and all(m.dtype == bool for m in masks)
    assert np.array_equal(masks[1], np.asarray(_mask(10, 7)) > 0)
    assert source.generator_masks("bottle", "crack") is masks  # decoded once


def test_source_never_reads_the_evaluation_fold(source):
    for index in (3, 6, 9, 10):  # evaluation rows (and the good one)
        with pytest.raises(SynthesisError, match=r"test/.* is not in the generator fold"):
            source.anomaly(index)


def test_source_refuses_what_it_cannot_use(source_dir, tmp_path):
    with pytest.raises(
        SynthesisError, match=rf"--dataset {tmp_path / 'nothing'} \(config 'ad'\) cannot be loaded"
    ):
        SourceData(str(tmp_path / "nothing"), "ad")
    d = datasets.load_from_disk(str(source_dir))
    d["train"].save_to_disk(str(tmp_path / "one"))  # one Dataset, not a DatasetDict
    with pytest.raises(
        SynthesisError,
        match=rf"--dataset {tmp_path / 'one'} \(ad\) must have train and test splits, got one Dataset",
    ):
        SourceData(str(tmp_path / "one"), "ad")
    datasets.DatasetDict({"train": d["train"]}).save_to_disk(str(tmp_path / "no_test"))
    with pytest.raises(SynthesisError, match=r"has no 'test' split; it has \['train'\]"):
        SourceData(str(tmp_path / "no_test"), "ad")
    datasets.DatasetDict(
        {"train": d["train"], "test": d["test"].remove_columns(["fold", "caption"])}
    ).save_to_disk(str(tmp_path / "no_fold"))
    with pytest.raises(
        SynthesisError,
        match=r"the test split lacks the column\(s\) caption, fold \(synthesis needs image, mask",
    ):
        SourceData(str(tmp_path / "no_fold"), "ad")
    # an empty generator-fold mask is refused by name
    test = d["test"].map(lambda r, i: {"mask": _png(np.zeros((SIDE, SIDE), np.uint8))} if i == 4 else {},
                         with_indices=True)  # fmt: skip
    datasets.DatasetDict({"train": d["train"], "test": test}).save_to_disk(str(tmp_path / "empty_mask"))
    empty = SourceData(str(tmp_path / "empty_mask"), "ad")
    with pytest.raises(SynthesisError, match=r"generator-fold mask of bottle/test/crack/000.png is empty"):
        empty.generator_masks("bottle", "crack")


def _centres(source, pairs, n, **plan_kwargs):
    """Centres of the transformed masks of a plan (the real-mask fallback keeps its own place: left out)."""
    out = []
    reals = [r for c, d in pairs for r in source.generator_masks(c, d)]
    for item in plan_items(source, pairs, n, seed=0, **plan_kwargs):
        mask = np.asarray(item.prepare().mask) > 0
        if any(np.array_equal(mask, r) for r in reals):
            continue  # the fallback
        ys, xs = np.nonzero(mask)
        out.append(((ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2))
    return out


def _on_object(centres) -> bool:
    return all(5 <= y <= 18 and 5 <= x <= 18 for y, x in centres)


def _off_object(centres) -> int:
    return sum(not (6 <= y < 18 and 6 <= x < 18) for y, x in centres)


def test_prepared_masks_sit_on_the_object_for_objects_anywhere_for_textures(source):
    """bottle is an object: its masks are centred on the object (the bright square 6:18); grid is a texture,
    so its transformed masks also land off it."""
    bottle = _centres(source, [("bottle", "crack")], 10)
    assert len(bottle) >= 5 and _on_object(bottle)
    grid = _centres(source, [("grid", "bent")], 20)
    assert len(grid) >= 5 and _off_object(grid) >= 2, grid


def test_texture_categories_name_a_datasets_own_textures(source):
    """``--texture-categories``: bottle named a texture gets masks off the object; grid left out is an object."""
    bottle = _centres(source, [("bottle", "crack")], 20, texture_categories=frozenset({"bottle"}))
    assert len(bottle) >= 5 and _off_object(bottle) >= 2, bottle
    grid = _centres(source, [("grid", "bent")], 10, texture_categories=frozenset())
    assert len(grid) >= 5 and _on_object(grid), grid
    assert texture_categories_of(source, None) == TEXTURE_CATEGORIES  # MVTec AD's, by default
    assert texture_categories_of(source, []) == frozenset()  # the flag alone: no textures
    assert texture_categories_of(source, ["bottle"]) == {"bottle"}
    with pytest.raises(SynthesisError, match=r"--texture-categories: bottel not in .*bottle, cable, grid"):
        texture_categories_of(source, ["bottle", "bottel"])
    with pytest.raises(
        SynthesisError, match=r"--texture-categories: bottel, gird not in .*; it has bottle, "
    ):
        texture_categories_of(source, ["gird", "bottle", "bottel"])  # every unknown name, sorted


def test_fallback_masks_are_marked_from_the_mask_on_disk(source, tmp_path):
    """A written mask equal to its real mask (resized: here all are 24 px) is the sampler's fallback, however
    the mask file stores it: 0/255 or 0/1 gray (every non-zero pixel is the defect), or three channels."""
    items = plan_items(source, [("bottle", "broken")], 4, seed=0)
    reals = source.generator_masks("bottle", "broken")
    masks = []
    for k, item in enumerate(items):
        real = reals[item.context["mask_source"]]
        drawn = np.asarray(item.prepare().mask) > 0
        if k % 2 == 1:
            assert not np.array_equal(drawn, real)  # a transformed draw
        masks.append(real if k % 2 == 0 else drawn)  # even items: as if every draw had been rejected
        (tmp_path / item.mask_path).parent.mkdir(parents=True, exist_ok=True)
    for on, mode in ((255, "L"), (1, "L"), (255, "RGB")):
        for item, mask in zip(items, masks, strict=True):
            PIL.Image.fromarray(np.where(mask, on, 0).astype(np.uint8)).convert(mode).save(
                tmp_path / item.mask_path
            )
            item.record.pop("mask_fallback", None)
        assert mark_fallbacks(tmp_path, items) == 2, (on, mode)
        assert [i.record["mask_fallback"] for i in items] == [True, False, True, False], (on, mode)


def test_prepared_mask_transforms_the_recorded_real_mask(source):
    """The three broken masks have areas 4, 36 and 27 pixels; a sample keeps 0.56-1.56 times its source's."""
    items = plan_items(source, [("bottle", "broken")], 12, seed=3)
    assert len({i.record["mask_source"] for i in items}) == 3
    for item in items:
        h, w = BROKEN_SIZES[int(item.record["mask_source"][-7:-4])]
        area = (np.asarray(item.prepare().mask) > 0).sum()
        assert 0.4 * h * w <= area <= 2.0 * h * w, (item.record["mask_source"], area)


def test_plan_records_no_model_unless_given(source):
    assert plan_items(source, [("grid", "bent")], 1, seed=0)[0].record["model"] == ""


def test_source_reads_gray_images_and_odd_masks_as_rgb_and_boolean(source, source_dir):
    assert source.normal(6).mode == "RGB" and source.normal(6).size == (SIDE, SIDE)  # grid: stored gray
    assert np.array_equal(np.asarray(source.normal(6))[..., 0], np.asarray(_normal(10).convert("L")))
    image, _ = source.anomaly(7)
    assert image.mode == "RGB"
    cable = source_dir.parent / "files" / "cable_1.png"
    assert source.normal_bytes(11) == cable.read_bytes() and source.normal_size(11) == (SIDE, SIDE)
    assert np.array_equal(np.asarray(source.normal(11)), np.asarray(_normal(11)))
    (wood,) = source.generator_masks("wood", "hole")
    assert wood.shape == (SIDE, SIDE) and wood.sum() == 24  # a three-channel mask read as one


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory, source_dir) -> Path:
    """A Hub-style folder (parquet files named in the card's ``configs``) as a custom dataset is laid out:
    config ``ad`` is the test source with its images stored by path (built from PNG files, written with
    ``Dataset.to_parquet``, which keeps paths), config ``loco`` its bottle rows only, bytes embedded."""
    root = tmp_path_factory.mktemp("hub")
    configs = {
        "ad": _source_dict(root, by_path=True),
        "loco": datasets.load_from_disk(str(source_dir)).filter(lambda r: r["category"] == "bottle"),
    }
    card = ["---", "configs:"]
    for name, splits in configs.items():
        (root / name).mkdir()
        card.append(f"- config_name: {name}\n  data_files:")
        for split, ds in splits.items():
            if split == "train":  # a config's splits share one schema: normals get the anomaly columns, empty
                n, test = len(ds), splits["test"]
                for column, value in (("mask", None), ("caption", ""), ("defect_type", "good"), ("fold", "")):
                    ds = ds.add_column(column, [value] * n)
                ds = ds.select_columns(test.column_names).cast(test.features)
            ds.to_parquet(str(root / name / f"{split}.parquet"))
            card.append(f"  - split: {split}\n    path: {name}/{split}.parquet")
    (root / "README.md").write_text("\n".join([*card, "---", ""]))
    return root


def test_a_source_with_images_stored_by_path_reads_the_same_pixels(source, hub_dir, tmp_path, monkeypatch):
    """Every normal (its pixels, header size and file bytes), anomaly and generator mask of a source whose
    Image columns hold paths reads as from the same source with the bytes embedded."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    by_path = SourceData(str(hub_dir), "ad")
    assert by_path.splits["train"][0]["image"]["bytes"] is None  # the path branch is what is read
    assert by_path.categories == source.categories and by_path.rows["test"] == source.rows["test"]
    for i in range(len(source.rows["train"])):
        assert by_path.normal_size(i) == source.normal_size(i) == (SIDE, SIDE)
        assert np.array_equal(np.asarray(by_path.normal(i)), np.asarray(source.normal(i)))
        stored = by_path.splits["train"][i]["image"]["path"]
        assert by_path.normal_bytes(i) == Path(stored).read_bytes()  # the file itself, byte for byte
    for index in sorted(i for rows in source.generator.values() for i in rows):
        for got, want in zip(by_path.anomaly(index), source.anomaly(index), strict=True):
            assert got.mode == want.mode and np.array_equal(np.asarray(got), np.asarray(want))
    for key in source.generator:
        assert all(np.array_equal(a, b) for a, b in
                   zip(by_path.generator_masks(*key), source.generator_masks(*key), strict=True))  # fmt: skip


def test_a_hub_style_folder_is_read_in_the_config_asked_for(hub_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    loco = SourceData(str(hub_dir), "loco")
    assert loco.name == f"{hub_dir} (loco)" and loco.categories == ["bottle"]
    assert SourceData(str(hub_dir), "ad").categories == ["bottle", "cable", "grid", "wood"]
    with pytest.raises(SynthesisError, match=rf"--dataset {hub_dir} \(config 'lcoo'\) cannot be loaded"):
        SourceData(str(hub_dir), "lcoo")


def test_a_hub_reference_is_fingerprinted_by_the_commit_it_resolves_to(monkeypatch):
    import huggingface_hub

    from axf_pipeline.synthesis.fingerprint import dataset_fingerprint, model_fingerprint

    def resolve(repo, repo_type, **kwargs):
        return f"/cache/{repo_type}s--{repo.replace('/', '--')}/snapshots/{'1' * 40 if repo_type == 'model' else '2' * 40}"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", resolve)
    assert model_fingerprint("org/model") == f"hub:org/model@{'1' * 40}"
    assert dataset_fingerprint("org/data") == f"hub:org/data@{'2' * 40}"

    def offline(repo, repo_type, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SynthesisError, match=r"--lora org/lora: cannot resolve its Hub commit \(OSError\)"):
        model_fingerprint("org/lora", "--lora")
    with pytest.raises(SynthesisError, match=r"--dataset org/data: cannot resolve its Hub commit"):
        dataset_fingerprint("org/data")
