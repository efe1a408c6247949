"""`axf generate` as a front-end of the synthesis core: checks before writing, atomic files, resume or refuse."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
from cli_checks import assert_refused, snapshot

from axf_pipeline import AnomalyXFusionPipeline
from axf_pipeline.cli import main
from axf_pipeline.synthesis.core import item_seed
from axf_pipeline.tiny import build_tiny_components, stable_diffusion_pipeline


def _pair(seed: int, size=(32, 32)):
    rng = np.random.default_rng(seed)
    w, h = size
    image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = np.zeros((h, w), np.uint8)
    mask[8:20, 10:22] = 200  # soft value: any non-zero pixel is defect
    return image, PIL.Image.fromarray(mask)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen") / "model"
    AnomalyXFusionPipeline(**build_tiny_components()).save_pretrained(folder)
    return folder


def _inputs(root, n=3, sizes=None):
    (root / "good").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = _pair(i, (sizes or {}).get(i, (32, 32)))
        image.save(root / "good" / f"{i:03d}.png")
        mask.save(root / "masks" / f"{i:03d}_mask.png")
    return root / "good", root / "masks"


def _argv(model, images, masks, out, *extra):
    return [
        "generate", "--model", str(model), "--images", str(images), "--masks", str(masks), "--prompt", "a scratch",
        "--output", str(out), "--steps", "1", "--guidance-scale", "1", "--num-per-image", "2", "--batch-size", "3",
        "--no-progress", *extra,
    ]  # fmt: skip


def test_generate_writes_pairs_resumes_and_refuses_a_changed_rerun(model, tmp_path, capsys):
    images, masks = _inputs(tmp_path, n=3, sizes={2: (40, 24)})  # two sizes: two batches
    out = tmp_path / "out"
    assert main(_argv(model, images, masks, out)) == 0
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == [f"{i:03d}_{k}.png" for i in range(3) for k in range(2)]
    assert [r["seed"] for r in records] == [item_seed(0, f"{i:03d}", k) for i in range(3) for k in range(2)]
    for r in records:
        source = np.array(PIL.Image.open(r["source_image"]).convert("RGB"))
        result = np.array(PIL.Image.open(out / r["file_name"]))
        mask = np.array(PIL.Image.open(out / r["mask"]))
        assert set(np.unique(mask)) == {0, 255}
        assert np.array_equal(mask > 0, np.array(PIL.Image.open(r["source_mask"])) > 0)
        assert np.array_equal(result[mask == 0], source[mask == 0])
    first = capsys.readouterr().out
    assert "made 6, skipped 0" in first

    # the same command again resumes: nothing is redone, nothing changes
    before = snapshot([out])
    (out / "001_1.png").unlink()  # as if killed before this image was renamed into place
    assert main(_argv(model, images, masks, out)) == 0
    assert "made 1, skipped 5" in capsys.readouterr().out
    assert snapshot([out]) == before

    # other settings, or fewer images, into the same folder: refused, the folder untouched
    assert_refused(main, _argv(model, images, masks, out, "--seed", "7"), ["seed"], [out])
    (images / "002.png").unlink()
    (masks / "002_mask.png").unlink()
    assert_refused(main, _argv(model, images, masks, out), [str(out)], [out])


def test_generate_bad_inputs_name_the_file_and_write_nothing(model, tmp_path):
    images, masks = _inputs(tmp_path, n=2)
    out = tmp_path / "out"
    watch = [tmp_path]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(main, _argv(model, empty, masks, out), [str(empty)], watch)
    (masks / "001_mask.png").rename(tmp_path / "aside.png")
    assert_refused(main, _argv(model, images, masks, out), [str(images / "001.png")], watch)
    (tmp_path / "aside.png").rename(masks / "001_mask.png")
    assert_refused(
        main, _argv(tmp_path / "no_model", images, masks, out), [str(tmp_path / "no_model")], watch
    )
    stable_diffusion_pipeline(build_tiny_components()).save_pretrained(tmp_path / "sd")
    assert_refused(main, _argv(tmp_path / "sd", images, masks, out), [str(tmp_path / "sd"), "mif"], watch)
    _pair(1, (24, 24))[1].save(masks / "001_mask.png")
    assert_refused(
        main, _argv(model, images, masks, out), [str(masks / "001_mask.png"), "24x24", "32x32"], watch
    )
    (masks / "001_mask.png").write_bytes(b"not a png")
    assert_refused(main, _argv(model, images, masks, out), [str(masks / "001_mask.png")], watch)
    assert not out.exists()


def test_generate_refuses_a_folder_of_someone_elses_files(model, tmp_path):
    images, masks = _inputs(tmp_path, n=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metadata.jsonl").write_text('{"file_name": "theirs.png"}\n')
    assert_refused(main, _argv(model, images, masks, out), [str(out), "metadata.jsonl"], [out])


def test_same_sized_images_share_one_pipeline_call(model, tmp_path, monkeypatch):
    from axf_pipeline.synthesis import core

    calls = []
    original = core.call_pipeline

    def counting(pipe, prepared, items, kwargs):
        calls.append(sorted({p.image.size for p in prepared}) + [len(prepared)])
        return original(pipe, prepared, items, kwargs)

    monkeypatch.setattr(core, "call_pipeline", counting)
    images, masks = _inputs(tmp_path, n=3, sizes={1: (40, 24)})
    assert main(_argv(model, images, masks, tmp_path / "out")) == 0
    # 000 and 002 are 32x32 (4 samples: batches of 3 + 1), 001 is 40x24 (2 samples: one batch)
    assert calls == [[(32, 32), 3], [(40, 24), 2], [(32, 32), 1]]


def test_a_sample_depends_on_its_image_seed_and_k_not_on_the_other_images(model, tmp_path):
    """With one item per pipeline call, removing other images changes no sample's bytes (per-item seeds
    from (seed, stem, k), not positions); within a batch, results also depend on its composition."""
    images, masks = _inputs(tmp_path / "all", n=3)
    assert main(_argv(model, images, masks, tmp_path / "out_all", "--batch-size", "1")) == 0
    for stem in ("000", "001"):
        (images / f"{stem}.png").unlink()
        (masks / f"{stem}_mask.png").unlink()
    assert main(_argv(model, images, masks, tmp_path / "out_one", "--batch-size", "1")) == 0
    for name in ("002_0.png", "002_1.png", "002_0_mask.png"):
        assert (tmp_path / "out_one" / name).read_bytes() == (tmp_path / "out_all" / name).read_bytes(), name


def test_resume_refuses_changed_weights_or_inputs_naming_them(model, tmp_path, capsys):
    """Contents, not paths: a moved copy of the same model resumes; weights retrained in place, or an input
    picture replaced under the same name, are refused in one line naming what changed."""
    import shutil

    copy = tmp_path / "moved_model"
    shutil.copytree(model, copy)
    images, masks = _inputs(tmp_path, n=1)
    out = tmp_path / "out"
    assert main(_argv(model, images, masks, out)) == 0
    assert str(tmp_path) not in (out / ".axf-synthesis.json").read_text()  # the record names no path
    capsys.readouterr()
    assert main(_argv(copy, images, masks, out)) == 0
    assert "made 0, skipped 2" in capsys.readouterr().out
    weights = next((copy / "unet").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # retrained in place
    assert_refused(main, _argv(copy, images, masks, out), [str(out), "content of --model changed"], [out])
    _pair(9)[0].save(images / "000.png")  # another picture under the same name
    assert_refused(main, _argv(model, images, masks, out), ["content of --images/--masks changed"], [out])
