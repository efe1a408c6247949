"""The user's path at real size, end to end, through the public commands (``axf_pipeline.cli.main``), with the
wall time and peak memory of each stage and a check of the scale defects are generated at.

1. **tree**: an MVTec-layout folder of a user's own data (the ``custom`` config): ``bracket``, an object,
   1600 × 1100, and ``carpet``, a texture, 1024 × 1024; 2 defect types each, 3 anomalies per type (the first is
   the generator fold), small elliptic defects of 50–150 px, 3 train normals, 1 test normal; captions JSON.
2. **dataset**: ``axf dataset build --config custom`` (Parquet shards and dataset card), then ``axf dataset check``.
3. **base**: Stable-Diffusion-1.5-shaped parts with random weights (``build_sd15_components``) saved the way
   Hub checkpoints come (``save_tiny_base``: a diffusers folder and a CLIP vision folder).
4. **train**: ``axf train`` for 2 steps at 512 with a UNet LoRA (rank 4), ``--gradient_checkpointing``, a
   checkpoint every step (fp16 mixed precision on a GPU); the end of training exports the pipeline and its card.
5. **synthesize**: ``axf synthesize`` 2 per defect type with every default (50 steps, guidance 7.5, the default
   generation window).
6. **evaluate**: ``axf evaluate`` of the result against the real data at its defaults but for the Inception
   Score (its 10 splits need more than 4 images per category), with ``--random-backbones`` (no Inception, VGG or
   ResNet weights offline: those scores are marked NOT A REAL SCORE; the figures are the cost, not the quality).
7. **publish**: the folders ``push`` would upload, hard-linked under ``publish/`` (the model's
   ``exports/current``, the dataset export, the synthetic dataset), scanned for local paths.

Scale: for every generated anomaly, its mask (native resolution) against its type's real masks (bounding box and
area, native pixels), and the generation window the synthesis run used (recorded in its settings) against the
window training crops the real defects in (the pipeline's ``mask_crop_region`` and ``crop_window``): generation
pixels per image pixel / training's should be 1. The column "padded box" is what diffusers'
``padding_mask_crop=32`` would have given (the issue's ~4.5× for a small defect).

Real size (the default) has not been run on the project's 2-core CPU: it writes about 11 GB (the saved base and
the trained pipeline, 5.4 GB of fp32 weights each), needs about 12 GB of RAM, and should take one to two hours
there (estimated from bench_real_size_*.py: minutes per 512 px training step, and the 50-step synthesis of 8
anomalies with a 3.4 GB UNet dominates). On a GPU it should take a few minutes, most of it building and saving
the random parts. ``--smoke`` shrinks the images 16×, trains at 32 px and uses the tiny parts
(``build_tiny_components``): about a minute, to check the script end to end; its figures are not real ones.

    python benchmarks/bench_user_path.py                      # real size, CPU (or the GPU when there is one)
    python benchmarks/bench_user_path.py --device cuda
    python benchmarks/bench_user_path.py --smoke             # -> benchmarks/results/user_path/<date>-smoke/

Output: ``results.json`` and ``results.md`` under ``--output`` (default ``benchmarks/results/user_path/<date>/``);
the work folder (``--work``, default a temporary one) is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# category: (width, height, texture?, defect types)
CATEGORIES = {
    "bracket": (1600, 1100, False, ("dent", "scratch")),
    "carpet": (1024, 1024, True, ("hole", "stain")),
}
DEFECT_SIZES = (50, 100, 150)  # native pixels, one per anomaly of a type; the first is the generator fold's
N_TRAIN, N_TEST_GOOD = 3, 1
WORDS = ("a", "dent", "scratch", "hole", "stain", "on", "the", "bracket", "carpet", "small", "dark")
PADDED = 32  # diffusers' padding_mask_crop, for contrast


# ---------------------------------------------------------------------------- 1. the user's tree
def _background(width: int, height: int, texture: bool, rng: np.random.Generator) -> np.ndarray:
    """A texture: woven-looking noise everywhere; an object: a lighter plate on a dark background."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if texture:
        period = max(4.0, width / 64)
        base = 120 + 30 * np.sin(xx / period) * np.sin(yy / period)
    else:
        base = np.full((height, width), 40, np.float32)
        x0, x1, y0, y1 = int(width * 0.2), int(width * 0.8), int(height * 0.2), int(height * 0.8)
        base[y0:y1, x0:x1] = 170 + 20 * np.sin(xx[y0:y1, x0:x1] / max(8.0, width / 40))
    pixels = base[..., None] + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    return np.clip(pixels * np.array([1.0, 0.95, 0.85], np.float32), 0, 255).astype(np.uint8)


def make_tree(root: Path, scale: float, seed: int = 0) -> tuple[Path, dict]:
    """The tree and {category: {defect type: [(width, height) of each defect's box]}} of the masks drawn."""
    rng = np.random.default_rng(seed)
    captions: dict = {}
    boxes: dict = {}
    for category, (width, height, texture, defects) in CATEGORIES.items():
        w, h = max(16, round(width * scale)), max(16, round(height * scale))
        for split, n in (("train", N_TRAIN), ("test", N_TEST_GOOD)):
            for i in range(n):
                path = root / category / split / "good" / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_background(w, h, texture, rng)).save(path, compress_level=1)
        captions[category], boxes[category] = {}, {}
        for defect in defects:
            captions[category][defect], boxes[category][defect] = [], []
            for i, size in enumerate(DEFECT_SIZES):
                image = Image.fromarray(_background(w, h, texture, rng))
                mask = Image.new("L", (w, h), 0)
                dw = max(3, round(size * scale))
                dh = max(2, round(dw * (0.35 if defect in ("scratch", "dent") else 0.8)))
                cx = int(rng.uniform(0.3, 0.7) * w)
                cy = int(rng.uniform(0.3, 0.7) * h)
                box = (cx - dw // 2, cy - dh // 2, cx - dw // 2 + dw - 1, cy - dh // 2 + dh - 1)
                ImageDraw.Draw(image).ellipse(box, fill=(60, 35, 30))
                ImageDraw.Draw(mask).ellipse(box, fill=255)
                for picture, name in ((image, f"test/{defect}/{i:03d}.png"),
                                      (mask, f"ground_truth/{defect}/{i:03d}_mask.png")):  # fmt: skip
                    (root / category / name).parent.mkdir(parents=True, exist_ok=True)
                    picture.save(root / category / name, compress_level=1)
                captions[category][defect].append(f"a small dark {defect} on the {category}")
                boxes[category][defect].append((dw, dh))
    (root.parent / "captions.json").write_text(json.dumps(captions, indent=1))
    return root.parent / "captions.json", boxes


# ---------------------------------------------------------------------------- measuring a stage
class Stages:
    """Runs each stage in this process and records its wall time, its peak RSS and, on a GPU, its peak CUDA
    allocation (each reset before the stage; the RSS peak starts from what earlier stages left resident)."""

    def __init__(self, cuda: bool):
        self.rows: list[dict] = []
        self.cuda = cuda

    def run(self, name: str, what: str, fn):
        import torch
        from _timing import peak_rss, reset_peak_rss, sync

        print(f"[user path] {name}: {what}", flush=True)
        gc.collect()
        reset_peak_rss()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = fn()
        sync()
        row = {
            "stage": name,
            "what": what,
            "seconds": time.perf_counter() - started,
            "peak_rss_bytes": peak_rss(),
        }
        if self.cuda:
            row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        self.rows.append(row)
        peaks = ", ".join(
            f"{k.removesuffix('_bytes')} {v / 2**30:.2f} GiB" for k, v in row.items() if k.startswith("peak")
        )
        print(f"[user path] {name}: {row['seconds']:.1f} s, {peaks}", flush=True)
        return result


def cli(argv: list[str]) -> None:
    from axf_pipeline.cli import main

    code = main([str(a) for a in argv])
    if code:
        raise SystemExit(f"axf {argv[0]} failed with exit code {code}")


# ---------------------------------------------------------------------------- scale
def scale_check(synthetic: Path, tree: Path, resolution: int, generation_size: int) -> list[dict]:
    """Per defect type: the generated masks' boxes against the real ones, and pixels of the generation window per
    image pixel against training's, at native resolution."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from axf_pipeline.image_processing import crop_window, mask_box, mask_crop_region
    from axf_pipeline.synthesis.core import MARKER
    from mvtec_caption.layout import fold_of

    settings = json.loads((synthetic / MARKER).read_text())["settings"]
    pad = settings["padding_mask_crop"]
    processor = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)

    def read(path: Path) -> np.ndarray:
        return (np.asarray(Image.open(path).convert("L")) > 127).astype(np.uint8)

    def stats(masks: list[np.ndarray]) -> dict:
        sizes = [(b[2] - b[0], b[3] - b[1]) for b in map(mask_box, masks) if b]
        return {
            "box_w": float(np.median([s[0] for s in sizes])),
            "box_h": float(np.median([s[1] for s in sizes])),
            "area": float(np.median([m.sum() for m in masks])),
        }

    rows = []
    for category, (_, _, _, defects) in CATEGORIES.items():
        for defect in defects:
            real_paths = sorted((tree / category / "ground_truth" / defect).glob("*_mask.png"))
            real = [read(p) for i, p in enumerate(real_paths) if fold_of(i, len(real_paths)) == "generator"]
            gen_paths = sorted((synthetic / "mvtec" / category / "ground_truth" / defect).glob("*_mask.png"))
            generated = [read(p) for p in gen_paths]
            if not generated:
                raise SystemExit(f"no generated masks for {category}/{defect} under {synthetic / 'mvtec'}")
            train_scale = [crop_window(m.shape[1], m.shape[0], mask_box(m), (resolution, resolution))[0] / m.shape[1]
                           for m in real]  # fmt: skip
            gen_scale, padded_scale = [], []
            for m in generated:
                tensor = torch.from_numpy(m[None].astype(np.float32))
                if pad is None:
                    x1, _, x2, _ = mask_crop_region(tensor, (generation_size, generation_size))
                else:
                    x1, _, x2, _ = processor.get_crop_region(Image.fromarray(m * 255), generation_size,
                                                             generation_size, pad=pad)  # fmt: skip
                gen_scale.append(generation_size / (x2 - x1))
                px1, _, px2, _ = processor.get_crop_region(Image.fromarray(m * 255), generation_size,
                                                           generation_size, pad=PADDED)  # fmt: skip
                padded_scale.append(generation_size / (px2 - px1))
            r, g = stats(real), stats(generated)
            t = float(np.median(train_scale))
            rows.append({
                "category": category, "defect_type": defect, "n_real": len(real), "n_generated": len(generated),
                "real_box": [r["box_w"], r["box_h"]], "generated_box": [g["box_w"], g["box_h"]],
                "area_ratio": g["area"] / r["area"], "box_ratio": (g["box_w"] * g["box_h"]) ** 0.5
                / (r["box_w"] * r["box_h"]) ** 0.5,
                "padding_mask_crop": pad, "generation_px_per_image_px": float(np.median(gen_scale)),
                "training_px_per_image_px": t, "scale_ratio": float(np.median(gen_scale)) / t,
                "padded_box_scale_ratio": float(np.median(padded_scale)) / t,
            })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- publish
TEXT_SUFFIXES = {".md", ".json", ".py", ".txt", ".yaml", ".yml"}


def publish_folders(work: Path, run_dir: Path, export: Path, synthetic: Path) -> dict[str, Path]:
    """What ``push`` would upload, hard-linked (no copy of the weights): the trained model's current export, the
    dataset export, the synthetic dataset (card, Parquet shards, previews)."""
    from axf_pipeline.training.export import CURRENT, EXPORTS

    out = work / "publish"
    if out.exists():
        shutil.rmtree(out)
    sources = {"model": (run_dir / EXPORTS / CURRENT).resolve(), "dataset": export, "synthetic": synthetic}
    folders = {}
    for name, source in sources.items():
        folders[name] = out / name
        ignore = shutil.ignore_patterns("mvtec", ".*") if name == "synthetic" else None
        shutil.copytree(source, folders[name], copy_function=os.link, ignore=ignore)
    return folders


def local_paths(folders: dict[str, Path], needles: list[str]) -> list[str]:
    """Every published text file or Parquet string column that holds one of ``needles`` (the work folder, where
    every path the commands were given lies)."""
    import pyarrow.parquet as pq

    found = []
    for folder in folders.values():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.suffix in TEXT_SUFFIXES:
                text = path.read_text(errors="replace")
                found += [str(path.relative_to(folder.parent))] if any(n in text for n in needles) else []
            elif path.suffix == ".parquet":
                table = pq.read_table(path)
                for column in table.column_names:
                    if str(table.schema.field(column).type) in ("string", "large_string"):
                        values = "\n".join(v for v in table.column(column).to_pylist() if v)
                        if any(n in values for n in needles):
                            found.append(f"{path.relative_to(folder.parent)}[{column}]")
    return found


# ---------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    gib = 1 / 2**30
    cuda = result["device"] == "cuda"
    lines = [
        f"# The user's path{' (SMOKE: tiny parts, shrunk images; not real figures)' if result['smoke'] else ' at real size'}",
        "",
        f"Command: `{result['command']}`; {result['date']}; {result['machine']}; device {result['device']}.",
        f"Images: {', '.join(f'{c} {w}×{h}' for c, (w, h) in result['image_sizes'].items())}; training resolution "
        f"{result['resolution']}, generation size {result['generation_size']}; {result['parts']}.",
        "",
        f"| stage | what | wall s | peak RSS GiB |{' peak CUDA allocated GiB |' if cuda else ''}",
        f"|---|---|---|---|{'---|' if cuda else ''}",
        *(
            f"| {r['stage']} | {r['what']} | {r['seconds']:.1f} | {r['peak_rss_bytes'] * gib:.2f} |"
            + (f" {r['peak_cuda_bytes'] * gib:.2f} |" if cuda else "")
            for r in result["stages"]
        ),
        f"| **total** | | {sum(r['seconds'] for r in result['stages']):.1f} | |{' |' if cuda else ''}",
        "",
        "Peak RSS: this one process (every stage runs in it), reset before each stage; it includes what earlier "
        "stages left resident.",
        "",
        "Scale of the generated defects (native pixels; medians per defect type; generator-fold real masks):",
        "",
        "| category / type | real box w×h | generated box w×h | area ratio | window | gen px / image px | training px"
        f" / image px | ratio (target 1) | padded box ({PADDED}) ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in result["scale"]:
        window = (
            "training window (default)"
            if r["padding_mask_crop"] is None
            else f"padded {r['padding_mask_crop']}"
        )
        lines.append(
            f"| {r['category']} / {r['defect_type']} | {r['real_box'][0]:.0f}×{r['real_box'][1]:.0f} | "
            f"{r['generated_box'][0]:.0f}×{r['generated_box'][1]:.0f} | {r['area_ratio']:.2f} | {window} | "
            f"{r['generation_px_per_image_px']:.3f} | {r['training_px_per_image_px']:.3f} | {r['scale_ratio']:.2f} | "
            f"{r['padded_box_scale_ratio']:.2f} |"
        )
    lines += ["", f"Scale check: {'holds' if result['scale_holds'] else 'FAILS'} (every ratio within 5 % of 1).",
              f"Published files holding a local path (the work folder's): {result['local_paths'] or 'none'}.", ""]  # fmt: skip
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--smoke", action="store_true", help="images 16x smaller, 32 px training, tiny parts (~1 min)"
    )
    p.add_argument(
        "--size-scale", type=float, default=None, help="image size / real size (default 1, smoke 1/16)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when there is one")
    p.add_argument("--output", type=Path, default=None, help="default benchmarks/results/user_path/<date>/")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def run_user_path(
    stages: Stages, work: Path, smoke: bool, scale: float, resolution: int, device: str
) -> dict:
    """The user's path, one timed stage each: tree, dataset, base, train, synthesize, evaluate, publish."""
    from axf_pipeline.tiny import build_sd15_components, build_tiny_components, save_tiny_base

    tree = work / "tree"
    captions, _ = stages.run("tree", "write the MVTec-layout tree + captions JSON",
                             lambda: make_tree(tree, scale))  # fmt: skip
    export = work / "mvtec_caption"
    stages.run("dataset", "axf dataset build --config custom; axf dataset check", lambda: (
        cli(["dataset", "build", "--config", "custom", "--name", "mine", "--data-dir", tree, "--captions", captions,
             "--output", export, "--cache-dir", work / "cache"]),
        cli(["dataset", "check", export]),
    ))  # fmt: skip

    def base():
        if smoke:
            c = build_tiny_components(sample_size=resolution, words=WORDS, scheduler="ddpm")
        else:
            c = build_sd15_components(words=WORDS, scheduler="ddpm")
        return save_tiny_base(work / "parts", c)

    parts = "tiny parts (build_tiny_components)" if smoke else "SD-1.5-shaped parts, random weights"
    base_dir, encoder_dir = stages.run("base", f"build and save {parts} (Hub layout)", base)
    run_dir = work / "run"
    train_argv = [
        "train", "--pretrained_model_name_or_path", base_dir, "--image_encoder", encoder_dir,
        "--dataset_name", export, "--dataset_config", "mine", "--output_dir", run_dir,
        "--resolution", resolution, "--lora_rank", 4, "--train_batch_size", 1, "--max_train_steps", 2,
        "--checkpointing_steps", 1, "--gradient_checkpointing", "--validation_steps", 0, "--seed", 0,
        *(["--mixed_precision", "fp16"] if device == "cuda" else []),
    ]  # fmt: skip
    stages.run("train", f"axf train: 2 steps at {resolution}, LoRA 4, gradient checkpointing, export",
               lambda: cli(train_argv))  # fmt: skip
    synthetic = work / "synthetic"
    stages.run("synthesize", "axf synthesize 2 per defect type, every default", lambda: cli([
        "synthesize", "--model", run_dir, "--dataset", export, "--config", "mine", "--num-per-defect-type", 2,
        "--output", synthetic, "--no-progress"]))  # fmt: skip
    evaluate_argv = ["evaluate", "--real", export, "--real-config", "mine", "--generated", f"axf={synthetic}",
                     "--output", work / "evaluation", "--random-backbones", "--device", device, "--no-progress",
                     "--metrics", "ic_lpips", "localization", "classification"]  # fmt: skip
    if smoke:  # the detector's cost does not depend on the generator: small in the smoke run
        evaluate_argv += ["--resolution", 32, "--epochs", 1, "--classifier-resolution", 64,
                          "--classifier-epochs", 1, "--unet-channels", 8, "--unet-depth", 3,
                          "--lpips-resolution", 32]  # fmt: skip
    stages.run("evaluate", "axf evaluate (random backbones: cost only)", lambda: cli(evaluate_argv))
    folders = stages.run("publish", "the folders push would upload (hard links)",
                         lambda: publish_folders(work, run_dir, export, synthetic))  # fmt: skip

    unet_config = json.loads((folders["model"] / "unet" / "config.json").read_text())
    vae_config = json.loads((folders["model"] / "vae" / "config.json").read_text())
    generation_size = unet_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)
    scale_rows = scale_check(synthetic, tree, resolution, generation_size)
    return {
        "parts": parts, "generation_size": generation_size, "scale": scale_rows,
        "scale_holds": all(abs(r["scale_ratio"] - 1) <= 0.05 for r in scale_rows),
        "local_paths": local_paths(folders, sorted({str(work), str(work.resolve())})),
        "evaluation": json.loads((work / "evaluation" / "report.json").read_text()),
    }  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # accelerate (training, synthesis) then picks the CPU as well
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"
    import torch

    from mvtec_caption._io import atomic_write

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scale = args.size_scale or (1 / 16 if args.smoke else 1.0)
    resolution = max(32, round(512 * scale / 8) * 8) if args.smoke else 512  # smoke: 32 at 1/16
    today = dt.date.today().isoformat()
    output = args.output or Path(__file__).parent / "results" / "user_path" / (
        today + ("-smoke" if args.smoke else "")
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="axf_user_path_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HOME", str(work / "hf_home"))  # the datasets cache stays in the work folder
    stages = Stages(cuda=device == "cuda")
    try:
        measured = run_user_path(stages, work, args.smoke, scale, resolution, device)
        result = {
            "command": "python benchmarks/bench_user_path.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ""),
            "device": device, "smoke": args.smoke, "size_scale": scale, "resolution": resolution,
            "generation_size": measured["generation_size"], "parts": measured["parts"],
            "image_sizes": {c: (max(16, round(w * scale)), max(16, round(h * scale)))
                            for c, (w, h, _, _) in CATEGORIES.items()},
            "stages": stages.rows, "scale": measured["scale"], "scale_holds": measured["scale_holds"],
            "local_paths": measured["local_paths"], "evaluation": measured["evaluation"],
        }  # fmt: skip
        text = markdown(result)
        atomic_write(output / "results.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        atomic_write(output / "results.md", lambda tmp: tmp.write_text(text))
        print(text)
        print(f"[user path] wrote {output / 'results.json'} and {output / 'results.md'}")
        return result
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[user path] work folder kept: {work}")


if __name__ == "__main__":
    main()
