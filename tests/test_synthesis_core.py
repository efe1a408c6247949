"""The synthesis core's contract, fast (no dataset, at most a tiny saved pipeline): per-item seeds, one pipeline
call per batch, the progress bar and summary over processes, the shared flags of both front-ends, claiming,
resuming or refusing an output folder with exact one-line messages, and loading the pipeline."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import PIL.Image
import pytest
import torch

from axf_pipeline.synthesis import core
from axf_pipeline.synthesis.core import (
    MARKER,
    Item,
    Prepared,
    SynthesisError,
    call_pipeline,
    check_content,
    check_model,
    check_output,
    check_padding_mask_crop,
    claim_output,
    item_seed,
    load_pipeline,
    process_state,
    report_input_error,
    run_items,
)

A, B, C = ("sha256:" + c * 64 for c in "abc")
HUB_THEN, HUB_NOW = ("hub:org/data@" + c * 40 for c in "01")


# ------------------------------------------------------------------ helpers: items, a recording pipeline, states
def _prepare(k: int, size: tuple[int, int], prompt: str | None, reference: bool) -> Prepared:
    ref = PIL.Image.new("RGB", size, (0, 0, k)) if reference else None
    ref_mask = PIL.Image.new("L", size, 255) if reference else None
    return Prepared(
        PIL.Image.new("RGB", size, (k, 0, 0)), PIL.Image.new("L", size, 255), prompt, ref, ref_mask
    )


def _items(n: int, size=(4, 4), prompt: str | None = "a scratch", reference: bool = False) -> list[Item]:
    return [
        Item(f"img/{k}.png", f"mask/{k}.png", item_seed(0, "bottle", "crack", k), size,
             partial(_prepare, k, size, prompt, reference))
        for k in range(n)
    ]  # fmt: skip


class RecordingPipe:
    """Records each call's arguments; returns one image per item (``short`` fewer, to break the contract)."""

    def __init__(self, short: int = 0):
        self.calls: list[dict] = []
        self.short = short

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        images = [PIL.Image.new("RGB", im.size, (9, 9, 9)) for im in kwargs["image"]]
        return SimpleNamespace(images=images[: len(images) - self.short])


class FakeState:
    """accelerate's ``PartialState`` as the core uses it: ``processes`` processes, this one ``index``,
    whole batches split into contiguous shares."""

    def __init__(self, processes: int = 1, index: int = 0):
        self.num_processes, self.process_index = processes, index

    @contextlib.contextmanager
    def split_between_processes(self, batches):
        share = -(-len(batches) // self.num_processes)
        yield batches[self.process_index * share : (self.process_index + 1) * share]


def _files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


# ------------------------------------------------------------------ seeds
def test_item_seeds_spread_over_all_63_bits():
    """Seeds are 63-bit (they fit torch and numpy): the top bit of the 63 is used, not left at zero."""
    seeds = [item_seed(3, "bottle", "crack", k) for k in range(64)]
    assert len(set(seeds)) == 64 and all(0 <= s < 2**63 for s in seeds)
    assert max(seeds) >= 2**62


# ------------------------------------------------------------------ one pipeline call per batch
def test_a_batch_is_one_call_with_its_inputs_and_one_generator_per_item():
    items = _items(3)
    prepared = [item.prepare() for item in items]
    pipe = RecordingPipe()
    images = call_pipeline(pipe, prepared, items, {"num_inference_steps": 2, "guidance_scale": 1.0})
    (call,) = pipe.calls
    assert all(a is b for a, b in zip(call["image"], [p.image for p in prepared], strict=True))
    assert all(a is b for a, b in zip(call["mask_image"], [p.mask for p in prepared], strict=True))
    assert call["prompt"] == ["a scratch"] * 3
    assert call["reference_image"] is None and call["reference_mask"] is None  # no reference: none passed
    # one CPU generator per item, seeded by the item alone (the same noise on any device, in any batch)
    assert [g.initial_seed() for g in call["generator"]] == [item.seed for item in items]
    assert all(g.device == torch.device("cpu") for g in call["generator"])
    assert call["num_inference_steps"] == 2 and call["guidance_scale"] == 1.0
    assert len(images) == 3 and images[0].size == (4, 4)


def test_a_batch_without_prompts_passes_none_and_mixed_prompts_as_they_are():
    items = _items(2, prompt=None)
    pipe = RecordingPipe()
    call_pipeline(pipe, [item.prepare() for item in items], items, {})
    assert pipe.calls[0]["prompt"] is None  # no caption at all: the pipeline's unconditional prompt
    mixed = [items[0].prepare(), _items(2)[1].prepare()]
    call_pipeline(pipe, mixed, items, {})
    assert pipe.calls[1]["prompt"] == [None, "a scratch"]


def test_a_batch_with_reference_defects_passes_them_and_refuses_a_mix():
    items = _items(2, reference=True)
    prepared = [item.prepare() for item in items]
    pipe = RecordingPipe()
    call_pipeline(pipe, prepared, items, {})
    (call,) = pipe.calls
    assert all(a is b for a, b in zip(call["reference_image"], [p.reference for p in prepared], strict=True))
    assert all(
        a is b for a, b in zip(call["reference_mask"], [p.reference_mask for p in prepared], strict=True)
    )
    mixed = [prepared[0], _items(2)[1].prepare()]
    with pytest.raises(SynthesisError) as err:
        call_pipeline(pipe, mixed, items, {})
    assert str(err.value) == "a batch mixes items with and without a reference defect"
    assert len(pipe.calls) == 1  # refused before the pipeline runs


# ------------------------------------------------------------------ running: progress, shares, summary
@pytest.fixture
def own_bar_lock(monkeypatch):
    """tqdm's default lock holds a semaphore shared with forked processes (mutmut's workers): one dying in a
    bar that fails to draw would leave it taken, hanging every later worker. This process's own lock instead."""
    from tqdm.auto import tqdm

    monkeypatch.setattr(tqdm, "_lock", threading.RLock(), raising=False)


@pytest.mark.usefixtures("own_bar_lock")
def test_the_progress_bar_counts_images_and_names_the_process(tmp_path, capsys, monkeypatch):
    """One process: the command's name and images done of all; several: each its share on its own line."""
    monkeypatch.setattr("accelerate.utils.gather_object", lambda objects: objects)
    # progress: on by default
    run_items(RecordingPipe(), _items(3), tmp_path / "one", 2, {}, state=FakeState())
    err = capsys.readouterr().err
    assert err.startswith("\rsynthesis: ") and "[process" not in err
    assert "| 3/3 [" in err and "image/s]" in err
    run_items(RecordingPipe(), _items(4), tmp_path / "two", 1, {}, desc="axf generate", state=FakeState(2, 1))
    err = capsys.readouterr().err
    assert err.startswith("\n\raxf generate [process 1]: ")  # process 1 draws on the line below process 0
    assert "| 2/2 [" in err and "image/s]" in err
    run_items(RecordingPipe(), _items(3), tmp_path / "off", 2, {}, progress=False, state=FakeState())
    assert capsys.readouterr().err == ""


def test_each_process_makes_its_share_and_the_summary_covers_every_process(tmp_path, monkeypatch):
    gathered = []

    def gather_object(objects):  # process 1 made 2 and skipped none, more slowly
        gathered.append(objects)
        return objects + [(2, 0, 1000.0)]

    monkeypatch.setattr("accelerate.utils.gather_object", gather_object)
    out = tmp_path / "out"
    items = _items(4)
    for item in items[:1]:  # item 0 finished by an earlier run
        for rel in (item.mask_path, item.image_path):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            PIL.Image.new("L", (4, 4)).save(out / rel)
    pipe = RecordingPipe()
    summary = run_items(pipe, items, out, 1, {}, progress=False, state=FakeState(2, 0))
    # process 0's share is batches [0] and [1]; item 0 is skipped without a pipeline call
    assert [[g.initial_seed() for g in c["generator"]] for c in pipe.calls] == [[items[1].seed]]
    assert _files(out) == ["img/0.png", "img/1.png", "mask/0.png", "mask/1.png"]
    assert len(gathered) == 1 and gathered[0][0][:2] == (1, 1)
    assert (summary.made, summary.skipped, summary.seconds) == (3, 1, 1000.0)  # the slowest process's time


def test_one_process_without_a_state_runs_everything_and_times_itself(tmp_path):
    out = tmp_path / "out"
    before = time.perf_counter()
    summary = run_items(RecordingPipe(), _items(3), out, 2, {}, progress=False)  # accelerate's own state
    elapsed = time.perf_counter() - before
    assert (summary.made, summary.skipped) == (3, 0) and 0 <= summary.seconds <= elapsed
    assert _files(out) == [f"{d}/{k}.png" for d in ("img", "mask") for k in range(3)]


def test_a_pipeline_returning_fewer_images_than_items_is_an_error(tmp_path):
    with pytest.raises(ValueError):
        run_items(
            RecordingPipe(short=1), _items(2), tmp_path / "out", 2, {}, progress=False, state=FakeState()
        )


def test_process_state_joins_cpu_processes_when_accelerate_launch_cpu_says_so(monkeypatch):
    import accelerate

    seen = []
    monkeypatch.setattr(accelerate, "PartialState", lambda cpu: seen.append(cpu) or "the state")
    for value in ("1", "0"):
        monkeypatch.setenv("ACCELERATE_USE_CPU", value)
        assert process_state() == "the state"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    process_state()
    assert seen == [True, False, False]


# ------------------------------------------------------------------ the flags both front-ends share
def _front_ends():
    from axf_pipeline import generate
    from axf_pipeline.synthesis import cli
    from mvtec_caption.command import command_parser

    required = ["--model", "m", "--output", "o"]
    return {
        "axf synthesize": (
            command_parser("axf synthesize", None, cli.add_arguments),
            [*required, "--dataset", "d", "--config", "ad", "--num-per-defect-type", "1"],
        ),
        "axf generate": (
            command_parser("axf generate", None, generate.add_arguments),
            [*required, "--images", "i", "--masks", "k", "--prompt", "p"],
        ),
    }


def test_guidance_and_padding_flags_parse_the_same_in_both_front_ends(monkeypatch, capsys):
    from axf_pipeline import image_processing

    for prog, (parser, required) in _front_ends().items():
        args = parser.parse_args(required)
        assert (args.guidance_scale, args.reference_guidance_scale) == (7.5, None), prog
        assert args.padding_mask_crop is image_processing.DEFAULT_PADDING_MASK_CROP, prog
        given = ["--guidance-scale", "3", "--reference-guidance-scale", "2", "--padding-mask-crop", "16"]
        args = parser.parse_args([*required, *given])
        assert (args.guidance_scale, args.reference_guidance_scale, args.padding_mask_crop) == (3.0, 2.0, 16)
        assert [type(v) for v in (args.guidance_scale, args.reference_guidance_scale)] == [float, float]
        for flag, value, kind in (("--padding-mask-crop", "1.5", "int"), ("--guidance-scale", "x", "float"),
                                  ("--reference-guidance-scale", "y", "float")):  # fmt: skip
            with pytest.raises(SystemExit) as stop:
                parser.parse_args([*required, flag, value])
            assert stop.value.code == 2
            assert capsys.readouterr().err.splitlines()[-1] == (
                f"{prog}: error: argument {flag}: invalid {kind} value: '{value}'"
            )
    # the padding flag follows the pipeline's own default, whatever it is
    monkeypatch.setattr(image_processing, "DEFAULT_PADDING_MASK_CROP", 24)
    for parser, required in _front_ends().values():
        assert parser.parse_args(required).padding_mask_crop == 24


def test_help_of_the_shared_flags_is_the_same_in_both_front_ends():
    expected = [
        "--guidance-scale GUIDANCE_SCALE the text's guidance weight (<= 1: none) (default: 7.5)",
        "--reference-guidance-scale REFERENCE_GUIDANCE_SCALE the reference's weight in two-condition guidance; "
        "default: --guidance-scale (plain CFG, 2 UNet passes; a different value costs a third) (default: None)",
        "--padding-mask-crop N generate diffusers' box around the mask padded by N pixels, resized to the "
        "model's size; default (None): the window training crops show a defect in, at native scale (the "
        "training scale) (default: None)",
    ]
    for prog, (parser, _) in _front_ends().items():
        text = " ".join(parser.format_help().split())
        for line in expected:
            assert line in text, (prog, line)


def test_a_negative_padding_is_refused_in_one_line_with_exit_code_2(capsys):
    for fine in (None, 0, 32):
        check_padding_mask_crop(fine)
    with pytest.raises(SynthesisError) as err:
        check_padding_mask_crop(-1)
    assert str(err.value) == "--padding-mask-crop must be at least 0 (or left out), got -1"
    assert report_input_error("axf generate", err.value) == 2
    assert capsys.readouterr().err == (
        "axf generate: error: --padding-mask-crop must be at least 0 (or left out), got -1\n"
    )


# ------------------------------------------------------------------ the model folder
def test_a_plain_stable_diffusion_folder_is_refused_with_what_to_do(tmp_path):
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(SynthesisError) as err:
        check_model(str(sd))
    assert str(err.value) == (
        f"--model {sd} is not an AnomalyXFusion pipeline: its model_index.json has no mif component "
        "(a plain Stable Diffusion checkpoint?); train one with train.py first"
    )


# ------------------------------------------------------------------ claiming, resuming, refusing
def test_claiming_creates_the_folder_and_a_marker_that_follows_the_settings_not_their_order(tmp_path):
    out = tmp_path / "runs" / "new" / "out"  # parents created too
    settings = {"seed": 0, "content": {"--model": A, "--dataset": B}, "steps": 2}
    claim_output(out, "axf synthesize", settings)
    first = (out / MARKER).read_bytes()
    assert json.loads(first) == {"command": "axf synthesize", "settings": settings}
    assert len(first.splitlines()) > 5  # one entry a line: readable and diffable by a person
    reordered = {"steps": 2, "content": {"--dataset": B, "--model": A}, "seed": 0}
    claim_output(out, "axf synthesize", reordered)  # a resume rewrites the marker: the same bytes
    assert (out / MARKER).read_bytes() == first
    assert _files(out) == [MARKER]  # written under a temporary name, renamed: nothing else left


def test_a_folder_holding_files_of_others_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    claim_output(out, "axf generate", {"seed": 0})
    (out / "a.png").write_text("ours")
    check_output(out, "axf generate", {"seed": 0}, ["a.png"])
    for stray in (".notes", f"b.png{core._TMP}1"):  # hidden but not our temporary; our tag but not hidden
        (out / stray).write_text("yours")
        with pytest.raises(SynthesisError) as err:
            check_output(out, "axf generate", {"seed": 0}, ["a.png"])
        assert str(err.value) == (
            f"Refusing to write into {out}: it holds {stray}, which this run would not write "
            "(an earlier run with other inputs, or a file of yours); choose another --output"
        )
        (out / stray).unlink()


def test_a_marker_without_settings_is_refused_naming_a_setting(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"command": "axf generate"}))
    check_output(out, "axf generate", {}, [])  # nothing recorded, nothing asked: the same
    with pytest.raises(SynthesisError) as err:
        check_output(out, "axf generate", {"seed": 0}, [])
    assert str(err.value) == (
        f"Refusing to resume {out}: it was made with seed=None, this run has seed=0; rerun with the same "
        "settings or choose another --output"
    )


@pytest.mark.parametrize("marker", [[], "x", {"command": "axf generate", "settings": None}])
def test_a_marker_that_is_not_ours_is_refused_in_one_line(tmp_path, marker):
    """Valid JSON of another shape (a list, a string, null settings) is refused, not a traceback."""
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(json.dumps(marker))
    with pytest.raises(SynthesisError) as err:
        check_output(out, "axf generate", {"seed": 0}, [])
    assert (
        str(err.value) == f"Refusing to write into {out}: {out / MARKER} is not a marker this command wrote"
    )


def test_check_content_refuses_changed_weights_or_data_before_loading_anything(tmp_path):
    out = tmp_path / "out"
    check_content(out, {"--model": A})  # nothing made yet
    claim_output(out, "axf synthesize", {"seed": 0, "content": {"--model": A, "--dataset": HUB_THEN}})
    check_content(out, {"--model": A})  # unchanged; the dataset, not given here, is left to check_output
    check_content(out, {"--model": A, "--dataset": HUB_THEN})
    with pytest.raises(SynthesisError) as err:
        check_content(out, {"--model": C})
    assert str(err.value) == (
        f"Refusing to resume {out}: the content of --model changed since it was made "
        "(sha256:aaaaaaaaaaaa then, sha256:cccccccccccc now); rerun with the same --model or choose another --output"
    )
    with pytest.raises(SynthesisError) as err:  # a Hub fingerprint is shown whole: its commit is the news
        check_content(out, {"--model": A, "--dataset": HUB_NOW})
    assert str(err.value) == (
        f"Refusing to resume {out}: the content of --dataset changed since it was made "
        f"({HUB_THEN} then, {HUB_NOW} now); rerun with the same --dataset or choose another --output"
    )
    claim_output(out, "axf synthesize", {"seed": 0, "content": {"--model": A}})
    with pytest.raises(
        SynthesisError, match=r"content of --dataset changed .*\(none recorded then, sha256:bbb"
    ):
        check_content(out, {"--model": A, "--dataset": B})
    (out / MARKER).write_text("{")  # unreadable: check_output names it
    check_content(out, {"--model": C})


# ------------------------------------------------------------------ loading the pipeline
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    from axf_pipeline import AnomalyXFusionPipeline
    from axf_pipeline.tiny import build_tiny_components

    folder = tmp_path_factory.mktemp("tiny") / "model"
    AnomalyXFusionPipeline(**build_tiny_components()).save_pretrained(folder)
    return folder


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_pipeline_loads_on_accelerates_device_without_its_own_progress_bar(saved_model, monkeypatch):
    pipe = load_pipeline(str(saved_model))  # float32 by default
    assert pipe.device == torch.device(process_state().device) and pipe.unet.dtype == torch.float32
    assert not any("lora" in k for k in pipe.unet.state_dict())
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # even on a terminal, the core's bar is the only one
    with pipe.progress_bar(total=2) as bar:
        bar.update(2)
    assert terminal.getvalue() == ""


def test_the_pipeline_loads_in_the_dtype_and_on_the_device_asked_for(saved_model):
    pipe = load_pipeline(str(saved_model), "float16", device="meta")
    assert pipe.device == torch.device("meta") and pipe.unet.dtype == torch.float16


def test_the_pipeline_loads_a_lora(saved_model, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from axf_pipeline import AnomalyXFusionPipeline

    unet = load_pipeline(str(saved_model)).unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    AnomalyXFusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=layers, safe_serialization=True
    )
    pipe = load_pipeline(str(saved_model), lora=str(tmp_path / "lora"))
    assert any("lora" in k for k in pipe.unet.state_dict())
