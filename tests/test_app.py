"""`axf app` (Gradio) on a tiny model and a small MVTec Caption export, offline: the callbacks without a
server, the synthesize endpoint through `gradio_client` on a real local server, and the page in headless
Chromium (skipped where /usr/bin/chromium is absent)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install '.[app]')")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from axf_pipeline import AnomalyXFusionPipeline  # noqa: E402
from axf_pipeline.app.logic import (  # noqa: E402
    AppError,
    Browser,
    Session,
    batch_args,
    example,
    mask_from_editor,
    normals,
    references,
    run_batch,
    synthesize,
)
from axf_pipeline.tiny import build_tiny_components  # noqa: E402
from mvtec_caption import export_dataset, make_sample_tree  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
STEPS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny pipeline and a one-category export (bottle, 32 px, 4 train normals)."""
    root = tmp_path_factory.mktemp("app")
    os.environ.setdefault("HF_HOME", str(root / "hf_home"))
    tree = make_sample_tree(
        root / "raw",
        "ad",
        categories=["bottle"],
        scale=32 / 900,
        n_train=4,
        captions_path=root / "captions.json",
    )
    export_dataset("ad", tree.root, root / "export", tree.captions_path, cache_dir=root / "cache")
    AnomalyXFusionPipeline(**build_tiny_components()).save_pretrained(root / "model")
    return root


@pytest.fixture(scope="module")
def session(setup):
    session = Session()
    session.load(str(setup / "model"), str(setup / "export"), "ad")
    return session


def layer(size, box) -> PIL.Image.Image:
    """An editor layer: transparent, with an opaque red rectangle ``box`` = (x1, y1, x2, y2) painted."""
    rgba = np.zeros((size[1], size[0], 4), np.uint8)
    x1, y1, x2, y2 = box
    rgba[y1:y2, x1:x2] = (255, 0, 0, 255)
    return PIL.Image.fromarray(rgba, "RGBA")


def normal_image(session) -> PIL.Image.Image:
    source = session.source
    return source.normal(source.normals["bottle"][0])


# ------------------------------------------------------------------ (1) logic, no server
def test_mask_from_editor_is_the_union_of_painted_layer_pixels():
    size = (20, 16)
    editor = {
        "background": PIL.Image.new("RGB", size),
        "layers": [layer(size, (2, 3, 6, 8)), layer(size, (10, 10, 12, 14))],
    }
    mask = np.asarray(mask_from_editor(editor))
    expected = np.zeros((16, 20), bool)
    expected[3:8, 2:6] = expected[10:14, 10:12] = True
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask > 0, expected)
    assert (
        mask_from_editor({"background": PIL.Image.new("RGB", size), "layers": [layer(size, (0, 0, 0, 0))]})
        is None
    )
    assert mask_from_editor({"background": PIL.Image.new("RGB", size), "layers": []}) is None


def test_synthesize_keeps_the_background_exactly_and_writes_the_pngs(session):
    normal = normal_image(session)
    box = (8, 10, 20, 22)
    editor = {"background": normal.convert("RGBA"), "layers": [layer(normal.size, box)], "composite": None}
    out = synthesize(session, editor, None, "a scratch", steps=STEPS, guidance=1.0, seed=3)
    result, src = np.asarray(out.result.convert("RGB")), np.asarray(normal)
    inside = np.asarray(out.mask) > 0
    assert out.outside_change == 0 and np.array_equal(result[~inside], src[~inside])
    assert (result[inside] != src[inside]).any(axis=-1).mean() > 0.5
    assert np.array_equal(np.asarray(PIL.Image.open(out.image_file).convert("RGB")), result)
    assert np.array_equal(np.asarray(PIL.Image.open(out.mask_file)), np.asarray(out.mask))
    # same seed, same result; the seed slider matters
    again = synthesize(session, editor, None, "a scratch", steps=STEPS, guidance=1.0, seed=3)
    other = synthesize(session, editor, None, "a scratch", steps=STEPS, guidance=1.0, seed=4)
    assert np.array_equal(np.asarray(again.result), np.asarray(out.result))
    assert not np.array_equal(np.asarray(other.result), np.asarray(out.result))


def test_uploaded_mask_and_reference_from_the_dataset(session):
    ex = example(session, "bottle")
    normal = ex.editor["background"]
    assert ex.caption and ex.mask.size == normal.size and ex.reference_mask.size == ex.reference.size
    out = synthesize(
        session, ex.editor, ex.mask, "", ex.reference, ex.reference_mask, steps=STEPS, guidance=2.0
    )
    assert out.outside_change == 0
    assert np.array_equal(np.asarray(out.mask) > 0, np.asarray(ex.mask) > 0)
    # what the page holds: files, written once; the same call from them gives the same result
    editor, mask_file, reference_file, reference_mask_file = ex.files(session)
    assert np.array_equal(np.asarray(PIL.Image.open(mask_file)), np.asarray(ex.mask))
    assert np.array_equal(np.asarray(PIL.Image.open(editor["background"])), np.asarray(normal))
    stamp = Path(mask_file).stat().st_mtime_ns
    assert ex.files(session)[1] == mask_file and Path(mask_file).stat().st_mtime_ns == stamp
    again = synthesize(
        session, editor, mask_file, "", reference_file, reference_mask_file, steps=STEPS, guidance=2.0
    )
    assert np.array_equal(np.asarray(again.result), np.asarray(out.result))
    thumbs = normals(session, "bottle")
    assert len(thumbs) == 4 and all(Path(f).is_file() for f, _ in thumbs)
    assert [label for _, label in thumbs] == [f"bottle/train/good/{i:03d}.png" for i in range(4)]
    assert all(": " in label for _, label in references(session, "bottle"))


def test_reference_guidance_is_passed_only_to_a_pipeline_that_takes_it(session, setup):
    seen = {}

    class WithReferenceGuidance(AnomalyXFusionPipeline):
        def __call__(self, *args, reference_guidance_scale=None, **kwargs):
            seen["reference_guidance_scale"] = reference_guidance_scale
            return super().__call__(*args, **kwargs)

    ex = example(session, "bottle")
    pipe = WithReferenceGuidance(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    other = Session(model="in memory", pipe=pipe)
    synthesize(
        other, ex.editor, ex.mask, "a dent", ex.reference, steps=1, guidance=2.0, reference_guidance=5.5
    )
    assert seen == {"reference_guidance_scale": 5.5}
    # the current pipeline has no such argument: the slider is ignored rather than failing the call
    out = synthesize(
        session, ex.editor, ex.mask, "a dent", ex.reference, steps=1, guidance=2.0, reference_guidance=5.5
    )
    assert out.outside_change == 0


@pytest.mark.parametrize(
    "case, words",
    [
        ("no image", "no normal image"),
        ("no mask", "no mask"),
        ("mask of another size", "is 7x5 but the normal image is"),
        ("empty mask", "is empty"),
        ("no caption, no reference", "empty caption and no reference"),
        ("reference mask alone", "reference mask without a reference image"),
    ],
)
def test_bad_input_is_one_readable_line(session, case, words):
    normal = normal_image(session)
    editor = {"background": normal, "layers": [], "composite": normal}
    drawn = {"background": normal, "layers": [layer(normal.size, (4, 4, 9, 9))]}
    kwargs = dict(editor=drawn, mask_upload=None, caption="a crack", reference=None, reference_mask=None)
    if case == "no image":
        kwargs["editor"] = None
    elif case == "no mask":
        kwargs["editor"] = editor
    elif case == "mask of another size":
        kwargs["mask_upload"] = PIL.Image.new("L", (7, 5), 255)
    elif case == "empty mask":
        kwargs["mask_upload"] = PIL.Image.new("L", normal.size, 0)
    elif case == "no caption, no reference":
        kwargs["caption"] = "  "
    elif case == "reference mask alone":
        kwargs["reference_mask"] = PIL.Image.new("L", (8, 8), 255)
    with pytest.raises(AppError, match=words) as info:
        synthesize(session, steps=1, **kwargs)
    assert "\n" not in str(info.value)


def test_a_folder_that_is_not_a_pipeline_is_refused_and_the_loaded_model_stays(session, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    pipe = session.pipe
    with pytest.raises(AppError, match=f"--model {tmp_path} has no model_index.json"):
        session.load(str(tmp_path), session.dataset, session.config)
    assert session.pipe is pipe and session.model.endswith("model")


def test_page_callbacks_show_errors_in_the_page_not_tracebacks(session):
    from axf_pipeline.app.ui import error, shown

    @shown(3)
    def failing_app_error():
        raise AppError("no mask: draw")

    @shown(2)
    def failing_bug():
        raise KeyError("boom")

    *others, message = failing_app_error()
    assert message == error("no mask: draw") and len(others) == 2
    *_, message = failing_bug()
    assert message == "**Error:** KeyError: 'boom'"


def test_dataset_browser_on_the_export_and_on_a_synthesized_set(session, setup, tmp_path):
    browser = Browser(str(setup / "export"), "ad")
    assert browser.categories() == ["bottle"]
    groups = browser.groups("bottle")
    assert "train/good" in groups and any(g.startswith("test/") and g != "test/good" for g in groups)
    anomaly_group = next(g for g in groups if g.startswith("test/") and g != "test/good")
    k = browser.items("bottle", anomaly_group)[0]
    image, overlaid, info = browser.detail(k)
    split, i, row = browser.rows[k]
    assert f"caption: {row['caption']}" in info and f"fold: {row['fold']}" in info
    mask = np.asarray(PIL.Image.open(io.BytesIO(browser.splits[split][i]["mask"]["bytes"])).convert("L")) > 0
    changed = (np.asarray(overlaid) != np.asarray(image)).any(axis=-1)
    assert mask.any() and np.array_equal(changed & ~mask, np.zeros_like(mask))  # only mask pixels tinted
    assert changed[mask].mean() > 0.9
    with pytest.raises(AppError, match="no dataset"):
        Browser("  ")

    # a batch (axf synthesize's core) of one defect type, then browse it with its provenance
    defect = anomaly_group.split("/", 1)[1]
    out = tmp_path / "batch"
    args = batch_args(session, str(out), "bottle", defect, 2, steps=STEPS, guidance=1.0, batch_size=2)
    steps_seen = list(run_batch(session, args, poll_seconds=0.05))
    done, total, _ = steps_seen[-1]
    assert (done, total) == (2, 2)
    made = sorted((out / "mvtec/bottle/test" / defect).glob("*.png"))
    assert [p.name for p in made] == ["000.png", "001.png"]
    assert sorted(p.name for p in (out / "mvtec/bottle/ground_truth" / defect).glob("*.png")) == [
        "000_mask.png",
        "001_mask.png",
    ]
    assert (out / "README.md").is_file() and list((out / "data").glob("*.parquet"))
    synthetic = Browser(str(out))
    assert synthetic.synthetic and synthetic.groups("bottle") == [f"train/{defect}"]
    _, _, info = synthetic.detail(synthetic.items("bottle", f"train/{defect}")[0])
    assert "source_image: bottle/train/good/" in info and "seed: " in info and "mask_source: " in info

    # resume: the same batch again makes nothing and leaves the files as they were
    before = {p: p.read_bytes() for p in made}
    stamps = {p: p.stat().st_mtime_ns for p in made}
    resumed = list(run_batch(session, args, poll_seconds=0.05))
    assert resumed[0][0] == 2 and resumed[-1][:2] == (2, 2)  # finished items counted at once
    assert {p: p.read_bytes() for p in made} == before and {p: p.stat().st_mtime_ns for p in made} == stamps
    # other settings into the same folder: refused with the command's message, in one line
    changed_args = batch_args(
        session, str(out), "bottle", defect, 2, steps=STEPS + 1, guidance=1.0, batch_size=2
    )
    with pytest.raises(AppError, match="Refusing to resume"):
        list(run_batch(session, changed_args, poll_seconds=0.05))


def test_axf_app_without_a_model_says_how_to_make_the_demo(tmp_path, monkeypatch):
    from axf_pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["app"])
    assert code == 2 and err.getvalue().count("\n") == 1 and "bash scripts/demo.sh" in err.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["app", "--model", str(tmp_path)])
    assert code == 2 and "has no model_index.json" in err.getvalue() and "Traceback" not in err.getvalue()


def test_the_package_and_axf_help_do_not_import_gradio():
    code = (
        "import sys, axf_pipeline, axf_pipeline.app, axf_pipeline.cli as cli\n"
        "cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'gradio_client')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------ (2) a real server, gradio_client
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(session):
    from axf_pipeline.app import launch

    port = free_port()
    app = launch(session, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_synthesize_endpoint_over_http(session, tmp_path):
    from gradio_client import Client, handle_file

    normal = normal_image(session)
    normal.save(tmp_path / "normal.png")
    layer(normal.size, (6, 6, 18, 16)).save(tmp_path / "layer.png")
    with served(session) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        editor = {"background": handle_file(str(tmp_path / "normal.png")),
                  "layers": [handle_file(str(tmp_path / "layer.png"))], "composite": None}  # fmt: skip
        job = client.submit(editor, None, "a scratch", None, None, STEPS, 1.0, 1.0, 0, api_name="/synthesize")
        out_normal, out_mask, out_result, outside, files, message = job.result(timeout=120)
        # bad input: the server answers with a message and keeps serving
        empty = {"background": handle_file(str(tmp_path / "normal.png")), "layers": [], "composite": None}
        bad = client.predict(empty, None, "a scratch", None, None, STEPS, 1.0, 1.0, 0, api_name="/synthesize")
        again = client.predict(
            editor, None, "a scratch", None, None, STEPS, 1.0, 1.0, 0, api_name="/synthesize"
        )
        client.close()
    assert message.startswith("Done") and outside == 0
    result = np.asarray(PIL.Image.open(out_result).convert("RGB"))
    mask = np.asarray(PIL.Image.open(out_mask).convert("L")) > 0
    expected = np.zeros_like(mask)
    expected[6:16, 6:18] = True
    assert np.array_equal(mask, expected)
    assert (
        np.array_equal(result[~mask], np.asarray(normal)[~mask])
        and (result[mask] != np.asarray(normal)[mask]).any()
    )
    assert sorted(Path(f).name for f in files) == ["anomaly_seed0.png", "anomaly_seed0_mask.png"]
    assert bad[-1] == "**Error:** no mask: draw where the defect goes on the image, or upload a mask"
    assert np.array_equal(np.asarray(PIL.Image.open(again[2]).convert("RGB")), result)


# ------------------------------------------------------------------ (3) a real browser
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
def test_page_in_headless_chromium(session, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    with served(session) as url, playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1500},
        )  # fmt: skip
        try:
            page = context.new_page()
            page.goto(url, timeout=60_000)
            # the page is usable once the app's first state (the dataset's normals) has been rendered: a
            # click before that can reach a page whose event connection is not yet open
            page.locator("#normals .thumbnail-item").first.wait_for(timeout=60_000)
            message = page.locator("#synth-message")
            page.get_by_role("button", name="Generate").click()
            message.get_by_text("no normal image").wait_for(timeout=60_000)
            # a train normal picked from the dataset, nothing drawn: the page says so, the server goes on
            page.locator("#normals .thumbnail-item").first.click()
            page.get_by_role("button", name="Generate").click()
            message.get_by_text("no mask: draw where the defect goes").wait_for(timeout=60_000)
            page.get_by_role("button", name="Load an example").click()
            page.wait_for_function(
                "() => document.querySelector('#caption textarea').value.length > 0", timeout=60_000
            )
            steps = page.locator("#steps input[type=number]")
            steps.fill(str(STEPS))
            steps.press("Enter")
            page.get_by_role("button", name="Generate").click()
            message.get_by_text("largest change outside the mask = 0").wait_for(timeout=90_000)
            page.locator("#result img").wait_for(timeout=30_000)
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            panel = tmp_path / "result.png"
            page.locator("#result img").screenshot(path=str(panel))
        finally:
            context.close()
    pixels = np.asarray(PIL.Image.open(panel).convert("RGB")).astype(int)
    assert pixels.std() > 10, "the result panel is blank"
    assert PIL.Image.open(shot).size[0] >= 1000
    if os.environ.get("AXF_APP_SCREENSHOT"):  # refreshes docs/assets/app.png
        shutil.copy(shot, os.environ["AXF_APP_SCREENSHOT"])
