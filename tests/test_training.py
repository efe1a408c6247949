"""Training (`train.py`, `axf_pipeline.training`) on tiny components and a tiny MVTec Caption export, CPU only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_checks import assert_refused
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from training_setup import make_training_setup, training_argv

from axf_pipeline.publishing import publishable_name
from axf_pipeline.tiny import build_tiny_components
from axf_pipeline.training import main, parse_args
from axf_pipeline.training.checkpointing import STATE_FILE, WEIGHTS_FILE, list_checkpoints
from axf_pipeline.training.data import (
    AnomalyTrainingDataset,
    EpochBatchSampler,
    collate,
    load_mvtec_caption,
    select_training_data,
)
from axf_pipeline.training.loop import train
from axf_pipeline.training.model import (
    BatchEncoder,
    XFusionDenoiser,
    compute_loss,
    set_trainable,
    step_generator,
)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return make_training_setup(tmp_path_factory.mktemp("training"))


argv = training_argv


def test_fixed_batch_loss_goes_down_and_only_trained_params_change(fixture):
    data = select_training_data(load_mvtec_caption(str(fixture["dataset"]), "ad", str(fixture["cache"])))
    dataset = AnomalyTrainingDataset(
        data.train,
        32,
        crop_jitter=0,
        random_flip=False,
        reference_drop_prob=0,
        caption_drop_prob=0,
        joint_drop_prob=0,
    )
    batch = collate([dataset[i] for i in range(4)])
    c = build_tiny_components(scheduler="ddpm")
    before = {
        name: {k: v.clone() for k, v in c[name].state_dict().items()}
        for name in ("vae", "text_encoder", "image_encoder", "unet", "mif", "ddf")
    }
    set_trainable(c, lora_rank=2)
    denoiser = XFusionDenoiser(c["unet"], c["mif"], c["ddf"])
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=1e-2)
    encoder = BatchEncoder(
        c["vae"],
        c["text_encoder"],
        c["tokenizer"],
        c["image_encoder"],
        c["feature_extractor"],
        c["scheduler"],
    )
    losses = []
    for _ in range(30):  # same batch, same noise and timesteps: the trained parameters must fit it
        loss = compute_loss(denoiser, encoder(batch, step_generator(0, 0, 0)), 1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    for name in ("vae", "text_encoder", "image_encoder"):
        after = c[name].state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name
    unet_after = {
        k.replace(".base_layer", ""): v for k, v in c["unet"].state_dict().items() if "lora_" not in k
    }
    assert all(torch.equal(unet_after[k], v) for k, v in before["unet"].items()), "base UNet changed"
    for name in ("mif", "ddf"):
        after = c[name].state_dict()
        assert any(not torch.equal(after[k], v) for k, v in before[name].items()), f"{name} did not train"


@pytest.fixture(scope="module")
def trained(fixture):
    out = fixture["root"] / "run_a"
    result = train(
        parse_args(
            argv(
                fixture,
                out,
                "--max_train_steps",
                "6",
                "--checkpointing_steps",
                "2",
                "--checkpoints_total_limit",
                "2",
                "--validation_steps",
                "6",
                "--num_validation_images",
                "1",
                "--validation_inference_steps",
                "2",
                "--report_to",
                "tensorboard",
            )
        )
    )
    return out, result


def test_everything_published_names_no_local_path_and_the_licence_follows_the_data(fixture, trained):
    """model_index.json, every config and the card hold no path of this machine; the card's licence and toy
    status are the training data's (a generated sample tree: toy data under the project's licence)."""
    out, _ = trained
    published = (out / "exports" / "current").resolve()
    texts = {
        p.relative_to(published).as_posix(): p.read_text()
        for p in published.rglob("*")
        if p.is_file() and p.suffix in (".json", ".md", ".txt")
    }
    assert {"model_index.json", "README.md", "unet/config.json", "mif/config.json"} <= set(texts)
    for name, text in texts.items():
        assert str(fixture["root"]) not in text and "/tmp/" not in text, name
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and "toy" in card.data.tags and "mvtec" not in card.data.tags
    assert card.data.base_model is None and card.data.datasets is None  # local: no Hub id to link
    assert "Toy model" in card.text and "MVTec AD / MVTec LOCO" not in card.text
    assert f"`{publishable_name(fixture['dataset'])}`" in card.text


def test_run_saves_a_loadable_pipeline_that_differs_from_untrained(fixture, trained):
    from accelerate.utils import set_seed

    from axf_pipeline import AnomalyXFusionPipeline

    out, result = trained
    assert result.global_step == 6
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]  # total limit 2
    assert (out / "validation" / "step-000006.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*")), "no TensorBoard log"
    card = (out / "README.md").read_text()
    assert "| steps | 6 " in card and f"| base model | `{publishable_name(fixture['base'])}` |" in card
    assert (out / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "pipeline_anomaly_x_fusion.py").is_file()  # the code for trust_remote_code, published too

    loaded = AnomalyXFusionPipeline.from_pretrained(out)
    assert not any("lora" in k for k in loaded.unet.state_dict()), "saved UNet carries an unfused adapter"
    # The saved MIF/DDF are the trained ones of the last checkpoint.
    final = load_file(out / "checkpoint-6" / WEIGHTS_FILE)
    assert torch.equal(loaded.mif.state_dict()["location_fc.weight"], final["mif.location_fc.weight"])
    assert torch.equal(loaded.ddf.state_dict()["mlp.2.weight"], final["ddf.mlp.2.weight"])
    # Frozen towers are saved bit-identical to the base.
    base_vae = load_file(fixture["base"] / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(loaded.vae.state_dict()[k], v) for k, v in base_vae.items())

    set_seed(0)  # the same fresh initialisation the run started from
    untrained = AnomalyXFusionPipeline.from_base(str(fixture["base"]), image_encoder=str(fixture["encoder"]))
    data = load_mvtec_caption(str(fixture["dataset"]), "ad", str(fixture["cache"]))
    row = data.filter(lambda anomalous: anomalous, input_columns=["is_anomaly"])[0]
    kwargs = dict(
        prompt=row["caption"],
        image=row["image"],
        mask_image=row["mask"],
        reference_image=row["image"],
        reference_mask=row["mask"],
        height=32,
        width=32,
        num_inference_steps=3,
        output_type="pt",
    )
    a = loaded(**kwargs, generator=torch.Generator().manual_seed(0)).images
    b = untrained(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (a - b).abs().max() > 1e-3


def test_killed_run_resumes_to_the_same_weights(fixture, trained):
    out = fixture["root"] / "run_b"
    args = argv(fixture, out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--no-fuse_lora")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (out / "checkpoint-2").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "model_index.json").exists()
    done = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
    assert done and max(done) < 6, f"killed too late to test resuming: {done}"

    result = train(parse_args([*args, "--resume_from_checkpoint", "latest"]))
    assert result.global_step == 6
    assert json.loads((out / "checkpoint-6" / STATE_FILE).read_text())["global_step"] == 6
    resumed = load_file(out / "checkpoint-6" / WEIGHTS_FILE)
    reference = load_file(trained[0] / "checkpoint-6" / WEIGHTS_FILE)
    assert resumed.keys() == reference.keys() and any("lora" in k for k in resumed)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)

    # Not fused: the saved UNet is the base UNet (no adapter layers), the LoRA sits in unet_lora/.
    from axf_pipeline import AnomalyXFusionPipeline

    unfused = AnomalyXFusionPipeline.from_pretrained(out)
    base_unet = load_file(fixture["base"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert unfused.unet.state_dict().keys() == base_unet.keys()
    assert all(torch.equal(unfused.unet.state_dict()[k], v) for k, v in base_unet.items())
    fused = AnomalyXFusionPipeline.from_pretrained(trained[0]).unet.state_dict()
    assert any(not torch.equal(fused[k], v) for k, v in base_unet.items()), (
        "fused LoRA left the UNet unchanged"
    )
    unfused.load_lora_weights(out / "unet_lora")
    assert any("lora" in k for k in unfused.unet.state_dict())


def test_two_process_accelerate_launch_saves_once(fixture):
    out = fixture["root"] / "ddp"
    # accelerate's `--cpu` alone starts one process; torchrun (`--multi_gpu`) with ACCELERATE_USE_CPU starts
    # real gloo DDP processes on a machine without GPUs.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train.py"), *argv(fixture, out, "--max_train_steps", "2", "--checkpointing_steps", "2")]  # fmt: skip
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("Saved the pipeline to") == 1
    assert "2 processes x batch 2" in proc.stderr
    assert {p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert (out / "model_index.json").is_file()


def test_sampler_deals_disjoint_batches_and_skips_exactly():
    full = EpochBatchSampler(10, 2, num_replicas=2, rank=0, seed=3)
    other = EpochBatchSampler(10, 2, num_replicas=2, rank=1, seed=3)
    full.set_epoch(1)
    other.set_epoch(1)
    a, b = list(full), list(other)
    assert len(a) == len(b) == 3 and not set(sum(a[:2], [])) & set(sum(b[:2], []))
    full.set_epoch(1, skip=2)
    assert list(full) == a[2:]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--resolution": "30"}, "--resolution 30 is not a multiple of 4"),
        ({"--resume_from_checkpoint": "/nonexistent/checkpoint-9"}, "--resume_from_checkpoint"),
        ({"--categories": "bottle", "--defect_types": "bent"}, "No anomalies to train on"),
        ({"--categories": "cable"}, "--categories ['cable'] not in"),
        ({"--lora_rank": "4", "--train_unet": "full"}, "exclude each other"),
        ({"--max_train_steps": "0"}, "--max_train_steps must be >= 1"),
        ({"drop": "mask"}, "lacks the column(s) ['mask']"),
        ({"drop": "caption"}, "lacks the column(s) ['caption']"),
        ({"base": "no_unet"}, "unet"),
        pytest.param(
            {"--mixed_precision": "fp16"},
            "--mixed_precision fp16 needs a GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only refusal"),
        ),
    ],
)
def test_bad_input_fails_at_start_up(fixture, tmp_path, change, message):
    """One line on stderr, exit code 2, no traceback, nothing written (issue 11 item 10)."""
    change = dict(change)
    args = argv(fixture, tmp_path / "out", "--max_train_steps", "1")
    if "drop" in change:
        data = load_mvtec_caption(str(fixture["dataset"]), "ad", str(fixture["cache"]))
        folder = tmp_path / "data"
        folder.mkdir()
        data.remove_columns(change.pop("drop")).to_parquet(str(folder / "train.parquet"))
        load_mvtec_caption(str(folder), "default", str(fixture["cache"]))  # prepared here, not in the refusal
        args[args.index("--dataset_name") + 1] = str(folder)
        args[args.index("--dataset_config") + 1] = "default"
    if "base" in change:
        change.pop("base")
        broken = tmp_path / "base"
        shutil.copytree(fixture["base"], broken)
        shutil.rmtree(broken / "unet")
        args[args.index("--pretrained_model_name_or_path") + 1] = str(broken)
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert_refused(main, args, message, watch=[tmp_path])


def test_train_py_refuses_in_one_line_without_a_traceback(fixture, tmp_path):
    args = argv(fixture, tmp_path / "out", "--categories", "cable")
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], env=ENV, cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: --categories ['cable'] not in")
    assert not (tmp_path / "out").exists()


def test_crop_keeps_native_detail_and_the_defect_with_its_mask():
    import numpy as np
    from PIL import Image

    from axf_pipeline.training.data import crop_around_mask

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (100, 240, 3), dtype=np.uint8)  # non-square, LOCO-like
    mask = np.zeros((100, 240), np.uint8)
    mask[70:80, 200:215] = 255  # a small defect near the right edge
    image_crop, mask_crop, (w, h, x0, y0, _, flipped) = crop_around_mask(
        Image.fromarray(pixels), Image.fromarray(mask), 32, rng, jitter=0.5, flip=True
    )
    assert (w, h) == (240, 100) and image_crop.size == mask_crop.size == (32, 32)  # no rescaling
    expected = pixels[y0 : y0 + 32, x0 : x0 + 32][:, ::-1]
    assert np.array_equal(np.asarray(image_crop), expected) and flipped
    assert np.array_equal(np.asarray(mask_crop), mask[y0 : y0 + 32, x0 : x0 + 32][:, ::-1])
    assert np.asarray(mask_crop).any()
    # A defect larger than the crop: the image is scaled down until the defect fits.
    big = np.zeros((100, 240), np.uint8)
    big[10:90, 20:220] = 255
    _, big_crop, (w, h, *_rest) = crop_around_mask(Image.fromarray(pixels), Image.fromarray(big), 32, rng)
    assert h == 32 and np.asarray(big_crop).any()


def test_cached_latents_give_the_same_step_inputs(fixture):
    data = select_training_data(load_mvtec_caption(str(fixture["dataset"]), "ad", str(fixture["cache"])))
    dataset = AnomalyTrainingDataset(data.train, 32)
    batch = collate([dataset[i] for i in range(2)])
    c = build_tiny_components(scheduler="ddpm")
    parts = [
        c[k] for k in ("vae", "text_encoder", "tokenizer", "image_encoder", "feature_extractor", "scheduler")
    ]
    plain, cached = BatchEncoder(*parts), BatchEncoder(*parts, cache_latents=True)
    cached(batch, step_generator(0, 0, 0))  # fills the cache
    a, b = plain(batch, step_generator(0, 1, 0)), cached(batch, step_generator(0, 1, 0))
    assert len(cached._latents) == 2
    assert torch.equal(a.noisy_latents, b.noisy_latents) and torch.equal(a.target, b.target)


def test_decoded_image_cache_gives_the_same_examples_and_decodes_each_row_once(fixture):
    data = select_training_data(load_mvtec_caption(str(fixture["dataset"]), "ad", str(fixture["cache"])))

    class Counting:  # a datasets.Dataset that counts the rows it decodes
        def __init__(self, dataset):
            self.dataset, self.reads = dataset, 0
            self.column_names = dataset.column_names

        def select_columns(self, columns):
            return self.dataset.select_columns(columns)

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            self.reads += 1
            return self.dataset[index]

    cached, uncached = Counting(data.train), Counting(data.train)
    with_cache = AnomalyTrainingDataset(cached, 32)
    without = AnomalyTrainingDataset(uncached, 32, decoded_cache_mb=0)
    for epoch in range(3):
        with_cache.set_epoch(epoch)
        without.set_epoch(epoch)
        for i in range(len(with_cache)):
            a, b = with_cache[i], without[i]
            assert a["key"] == b["key"] and a["caption"] == b["caption"]
            for k in ("pixel_values", "mask", "reference", "reference_mask", "has_reference"):
                assert torch.equal(a[k], b[k]), (epoch, i, k)
    assert cached.reads == len(data.train)  # each row decoded once, then served from memory
    assert uncached.reads == 3 * 2 * len(data.train)  # item + reference, every epoch


# ---- one run per folder, atomic export (issue 11 items 2, 3, 13) ------------------------------------------
def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)  # the pipeline's names are relative links into exports/current
    return dst


def _mif_weight(folder) -> torch.Tensor:
    from axf_pipeline import AnomalyXFusionPipeline

    return AnomalyXFusionPipeline.from_pretrained(folder).mif.state_dict()["location_fc.weight"]


def _checkpoint_mif_weight(checkpoint: Path) -> torch.Tensor:
    return load_file(checkpoint / WEIGHTS_FILE)["mif.location_fc.weight"]


def test_a_second_run_into_the_same_folder_is_refused(fixture, trained, tmp_path):
    out = trained[0]
    args = argv(fixture, out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    assert_refused(main, args, [str(out), "checkpoint-4, checkpoint-6", "--resume_from_checkpoint"], [out])
    # Resuming the run with other flags that change what is learned: refused, naming the flag.
    assert_refused(main, [*args, "--resume_from_checkpoint", "latest", "--seed", "1"], "--seed 1", [out])
    # A finished run whose checkpoints were deleted still holds its pipeline.
    finished = _copy_run(out, tmp_path / "finished")
    for checkpoint in list_checkpoints(finished):
        shutil.rmtree(checkpoint)
    args = argv(fixture, finished, "--max_train_steps", "2")
    assert_refused(main, args, "exported pipeline of another run", [finished])
    assert_refused(main, [*args, "--resume_from_checkpoint", "latest"], "checkpoints are gone", [finished])
    # A file of the user's where the export would link the pipeline.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    assert_refused(main, argv(fixture, mine, "--max_train_steps", "2"), "README.md", [mine])


def test_checkpoints_of_another_run_are_neither_resumed_nor_pruned(fixture, trained, tmp_path):
    from accelerate import Accelerator

    from axf_pipeline.training import checkpointing as ckpt

    out = _copy_run(trained[0], tmp_path / "mixed")
    foreign = out / "checkpoint-100"
    shutil.copytree(out / "checkpoint-6", foreign)
    state = json.loads((foreign / STATE_FILE).read_text())
    state["run"]["id"] = "another-run"
    (foreign / STATE_FILE).write_text(json.dumps(state))
    args = argv(fixture, out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest")
    assert_refused(main, args, ["more than one run", "checkpoint-4"], [out])  # latest = the foreign one

    # Pruning (--checkpoints_total_limit) counts and deletes this run's checkpoints only.
    run = json.loads((out / "checkpoint-6" / STATE_FILE).read_text())["run"]
    ckpt.save_checkpoint(Accelerator(), out, {"global_step": 8, "run": run}, total_limit=2)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6", "checkpoint-8", "checkpoint-100"]


def test_empty_checkpoint_folder_is_skipped_by_latest(fixture, trained, tmp_path, caplog):
    out = _copy_run(trained[0], tmp_path / "run")
    (out / "checkpoint-8").mkdir()  # e.g. a copy that failed: no training_state.json
    explicit = argv(
        fixture, out, "--max_train_steps", "8", "--resume_from_checkpoint", str(out / "checkpoint-8")
    )
    assert_refused(main, explicit, ["checkpoint-8", "not a complete checkpoint"], [out])
    # latest would save its own checkpoint-8 there: refused rather than deleting the folder.
    clash = argv(fixture, out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest")
    assert_refused(main, clash, ["checkpoint-8", "not a complete checkpoint"], [out])

    caplog.set_level("WARNING")
    result = train(
        parse_args(argv(fixture, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    )
    assert result.global_step == 6 and (out / "checkpoint-8").is_dir()
    assert "checkpoint-8" in caplog.text and "not a complete checkpoint" in caplog.text
    assert "is at step 6, not below --max_train_steps 6" in caplog.text  # nothing trained: said so
    assert torch.equal(_mif_weight(out), _checkpoint_mif_weight(out / "checkpoint-6"))


KILL_DURING_EXPORT = """
import os, signal, sys
from pathlib import Path
import diffusers, axf_pipeline.training.export as export
point = sys.argv[1]
if point == "saving":  # after the UNet and the MIF are written, before the DDF and the card
    save = diffusers.ModelMixin.save_pretrained
    def killing_save(self, folder, *a, **k):
        save(self, folder, *a, **k)
        if Path(folder).name == "mif":
            os.kill(os.getpid(), signal.SIGKILL)
    diffusers.ModelMixin.save_pretrained = killing_save
else:  # every file written and the links made, just before the switch
    replace = os.replace
    def killing_replace(src, dst, *a, **k):
        if Path(dst).name == export.CURRENT:
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *a, **k)
    export.os.replace = killing_replace
from axf_pipeline.training import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("point", ["saving", "switching"])
def test_kill_during_export_leaves_the_old_pipeline_loadable(fixture, trained, tmp_path, point):
    out = _copy_run(trained[0], tmp_path / "run")
    old = _mif_weight(out)
    args = argv(fixture, out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest")
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_EXPORT, point, *args], env=ENV, cwd=REPO, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "checkpoint-8").is_dir() and list((out / "exports").glob("step-000008-*")), (
        "killed too early"
    )
    assert torch.equal(_mif_weight(out), old)  # the old export, whole: not the new MIF with the old DDF
    assert (out / "README.md").read_text() == (trained[0] / "README.md").read_text()

    train(parse_args(args))  # resumes at step 8: exports again, and removes the killed export
    new = _mif_weight(out)
    assert torch.equal(new, _checkpoint_mif_weight(out / "checkpoint-8")) and not torch.equal(new, old)
    assert "| steps | 8 " in (out / "README.md").read_text()
    assert len([p for p in (out / "exports").iterdir() if not p.is_symlink()]) == 1
    assert {p.name for p in out.iterdir()} >= {
        "checkpoint-6",
        "checkpoint-8",
        "logs",
        "validation",
        "unet_lora",
    }
