"""The README's main job: dataset → training → synthesis → measurement, offline, on two CPU cores.

1. generate a toy captioned-defect set in MVTec layout (colour and shape named in the caption);
2. build it with the ``mvtec_caption`` builder, export it, load it back with ``load_dataset``;
3. train a tiny AnomalyXFusion with the code ``accelerate launch train.py`` runs (after a short VAE
   pre-training, since nothing pretrained can be downloaded here);
4. synthesise on held-out normal images one defect per caption and mask, with a reference defect whose
   colour and shape both differ from the caption's, so only the text can carry them;
5. measure text controllability from the pixels inside the mask, the change outside it, IC-LPIPS;
6. downstream (the paper's protocol, :mod:`.downstream`): ``axf synthesize``'s core makes N anomalies per
   defect type; a DRAEM-style detector trained on them is compared with one trained on Perlin anomalies
   and one trained on the real generator fold, on the held-out evaluation fold;
7. write picture grids, the metrics as JSON, the tables with the wall time per stage.

``--ablation`` repeats 3–6 for the switches of paper table 6 and writes one table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mvtec_caption._io import atomic_write
from mvtec_caption.command import command_parser
from mvtec_caption.layout import fold_of

from . import downstream as ds
from .measure import outside_mask_change, read_defect
from .toy_data import (
    CATEGORY,
    COLOURS,
    SHAPES,
    caption_for,
    make_toy_tree,
    normal_image,
    square_mask,
    vocabulary,
)

# name -> train.py ablation flags (paper table 6)
ABLATIONS = {
    "no text": ["--no_text", "--no_mif", "--no_ddf"],
    "text": ["--no_mif", "--no_ddf"],
    "text + MIF": ["--no_ddf"],
    "text + DDF": ["--no_mif"],
    "all (AnomalyXFusion)": [],
}


FRESH_SEED_OFFSET = 10_000  # the independent split's seed: never used for data, training or tuning
VAE_MIN_CEILING = 0.99  # share of generator-fold defects whose colour and shape survive the VAE round trip
_START = time.perf_counter()
TIMINGS: dict[str, float] = {}  # stage -> wall seconds (summed over models with --ablation)


def timed(stage: str, started: float) -> None:
    TIMINGS[stage] = TIMINGS.get(stage, 0.0) + time.perf_counter() - started


def log(message: str) -> None:
    print(f"[demo {time.perf_counter() - _START:6.0f} s] {message}", flush=True)


# ---- 1-2: data ---------------------------------------------------------------------------------------
def build_dataset(work: Path, size: int, per_type: int, held_out: int, seed: int):
    from mvtec_caption import export_dataset
    from mvtec_caption._io import load_source

    toy = make_toy_tree(
        work / "toy", size=size, anomalies_per_type=per_type, held_out_normals=held_out, seed=seed
    )
    export = export_dataset(
        "ad", toy.root, output=work / "mvtec_caption", captions=toy.captions_path, toy=True
    )
    dataset = load_source(str(export), "ad")  # not load_dataset: its cache would serve another seed's rows
    log(f"MVTec Caption (toy) built into {export}: " + ", ".join(f"{k}={len(v)}" for k, v in dataset.items()))
    return toy, export, dataset


# ---- 3: model ---------------------------------------------------------------------------------------
def base_training_set(toy) -> dict:
    """What a base model would have seen: the normal training images and the generator fold's defects,
    never the evaluation fold. ``images``/``masks`` train the VAE; ``defect_*`` and ``truth`` (colour,
    shape) train the CLIP towers and measure the VAE's round trip."""
    import json

    captions_of = json.loads(toy.captions_path.read_text())[CATEGORY]  # per defect type, n images each
    images, masks, defects = [], [], []
    for path in sorted((toy.root / CATEGORY / "train" / "good").glob("*.png")):
        images.append(np.asarray(Image.open(path).convert("RGB")))
        masks.append(np.zeros(images[-1].shape[:2], np.uint8))
    for folder in sorted((toy.root / CATEGORY / "ground_truth").iterdir()):
        mask_paths = sorted(folder.glob("*_mask.png"))
        generator = [m for i, m in enumerate(mask_paths) if fold_of(i, len(mask_paths)) == "generator"]
        for i, mask_path in enumerate(generator):
            image_path = toy.root / CATEGORY / "test" / folder.name / mask_path.name.replace("_mask", "")
            images.append(np.asarray(Image.open(image_path).convert("RGB")))
            masks.append(np.asarray(Image.open(mask_path)))
            defects.append((images[-1], masks[-1], captions_of[folder.name][i]))
    defect_images, defect_masks, defect_captions = (list(x) for x in zip(*defects, strict=True))
    truth = [tuple(c.split()[1:3]) for c in defect_captions]  # "a <colour> <shape> <noun>"
    return {"images": images, "masks": masks, "defect_images": defect_images, "defect_masks": defect_masks,
            "defect_captions": defect_captions, "truth": truth}  # fmt: skip


def tiny_base(
    work: Path, toy, size: int, vae_steps: int, seed: int, clip_steps: int = 300
) -> tuple[Path, Path]:
    """A from-scratch Stable-Diffusion-layout checkpoint whose VAE has learnt to reconstruct the toy set and
    whose CLIP towers have learnt, contrastively, to tell its captions and defects apart."""
    from ..tiny import build_tiny_components, save_tiny_base
    from .clip import pretrain_clip
    from .vae import pretrain_vae_to_ceiling, reconstruction_accuracy

    components = build_tiny_components(sample_size=size, words=vocabulary(), seed=seed)
    data = base_training_set(toy)
    images, masks = data["images"], data["masks"]
    defect_images, defect_masks, defect_captions = (
        data["defect_images"],
        data["defect_masks"],
        data["defect_captions"],
    )
    losses, ceiling = pretrain_vae_to_ceiling(
        components["vae"], images, masks, lambda vae: reconstruction_accuracy(vae, defect_images, defect_masks, data["truth"]),
        steps=vae_steps, seed=seed, min_ceiling=VAE_MIN_CEILING, log=log,
    )  # fmt: skip
    log(
        f"VAE pre-trained on {len(images)} images: weighted L1 {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}; "
        f"colour and shape survive its round trip for {ceiling:.0%} of the generator-fold defects"
    )
    if ceiling < VAE_MIN_CEILING:
        log(f"WARNING: the VAE caps controllability at {ceiling:.2f}; raise --vae_steps")
    if clip_steps:
        losses = pretrain_clip(
            components["text_encoder"], components["tokenizer"], components["image_encoder"],
            components["feature_extractor"], defect_captions, defect_images, defect_masks, steps=clip_steps, seed=seed,
        )  # fmt: skip
        log(
            f"CLIP towers pre-trained on {len(defect_images)} captioned defects: loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}"
        )
    return save_tiny_base(work / "base", components)


def train_model(
    work: Path, name: str, flags: list[str], base: Path, encoder: Path, export: Path, args
) -> Path:
    from ..training import parse_args
    from ..training.loop import train

    out = work / "runs" / name.replace(" ", "_").replace("+", "plus").replace("(", "").replace(")", "")
    if out.exists():
        shutil.rmtree(out)
    argv = [
        "--pretrained_model_name_or_path", str(base),
        "--image_encoder", str(encoder),
        "--dataset_name", str(export),
        "--dataset_config", "ad",
        "--output_dir", str(out),
        "--resolution", str(args.size),
        *(["--train_unet", "full"] if args.pretrained_model_name_or_path is None else ["--lora_rank", "8"]),
        "--train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.learning_rate),
        "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "20",
        "--max_train_steps", str(args.train_steps),
        "--checkpointing_steps", str(args.train_steps),
        "--checkpoints_total_limit", "1",
        "--validation_steps", "0",
        "--report_to", "tensorboard",
        "--crop_jitter", "0",
        "--cache_latents",  # crop_jitter 0: each image has two fixed crops (flipped or not)
        *(["--use_ema", "--ema_decay", str(args.ema_decay)] if args.ema_decay > 0 else []),
        *(["--snr_gamma", str(args.snr_gamma)] if args.snr_gamma > 0 else []),
        "--noise_offset", str(args.noise_offset),
        "--seed", str(args.seed),
        *flags,
    ]  # fmt: skip
    started = time.perf_counter()
    train(parse_args(argv))
    timed("generator training", started)
    log(f"trained '{name}' for {args.train_steps} steps in {time.perf_counter() - started:.0f} s -> {out}")
    return out


# ---- 4: synthesis -----------------------------------------------------------------------------------
def generator_references(dataset) -> list[tuple[int, str]]:
    """(row, defect type) of every generator-fold anomaly: the only references synthesis may use."""
    columns = dataset["test"].select_columns(["defect_type", "fold", "is_anomaly"]).to_list()
    return [
        (i, r["defect_type"]) for i, r in enumerate(columns) if r["is_anomaly"] and r["fold"] == "generator"
    ]


def _job(normal, mask, caption: str, colour: str, shape: str, ref: dict) -> dict:
    return {
        "normal": normal,
        "mask": mask,
        "caption": caption,
        "colour": colour,  # what the defect should show: the caption's (text jobs) or the reference's
        "shape": shape,
        "reference": ref["image"].convert("RGB"),
        "reference_mask": ref["mask"],
        "reference_type": ref["defect_type"],
    }


def text_jobs(normals: list[np.ndarray], dataset, size: int, seed: int) -> list[dict]:
    """Text controllability: every normal image gets every caption once, each with its own square mask
    and a reference defect whose colour and shape both differ from the caption's, so only the text can
    carry them."""
    return _condition_jobs(normals, dataset, size, seed, text=True)


def reference_jobs(normals: list[np.ndarray], dataset, size: int, seed: int) -> list[dict]:
    """Reference fidelity: every normal image gets a reference of every defect type and an empty
    caption; the defect should take the reference's colour and shape."""
    return _condition_jobs(normals, dataset, size, seed, text=False)


def _condition_jobs(normals, dataset, size: int, seed: int, text: bool) -> list[dict]:
    rng = np.random.default_rng(seed)
    test, refs = dataset["test"], generator_references(dataset)
    jobs = []
    for normal in normals:
        for colour in COLOURS:
            for shape in SHAPES:
                if text:  # a reference of another colour and another shape
                    choices = [
                        i
                        for i, kind in refs
                        if not kind.startswith(colour + "_") and not kind.endswith("_" + shape)
                    ]
                else:  # a reference of exactly this type
                    choices = [i for i, kind in refs if kind == f"{colour}_{shape}"]
                ref = test[int(rng.choice(choices))]
                caption = caption_for(colour, shape) if text else ""
                jobs.append(_job(normal, square_mask(rng, size, 12), caption, colour, shape, ref))
    return jobs


def normals_of(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def fresh_normals(seed: int, n: int, size: int) -> list[np.ndarray]:
    """The independent split: normal images (and, through the job seeds, masks) made at a seed that no
    choice was ever tuned on."""
    rng = np.random.default_rng(seed + FRESH_SEED_OFFSET)
    return [normal_image(rng, size) for _ in range(n)]


@torch.no_grad()
def synthesise(
    pipe, jobs: list[dict], steps: int, guidance: float, batch: int, seed: int, reference_guidance=None
) -> None:
    from tqdm.auto import tqdm

    from ..image_processing import DEFAULT_PADDING_MASK_CROP

    pipe.set_progress_bar_config(disable=True)
    for start in tqdm(range(0, len(jobs), batch), desc="synthesis"):
        chunk = jobs[start : start + batch]
        out = pipe(
            prompt=[j["caption"] for j in chunk],
            image=[Image.fromarray(j["normal"]) for j in chunk],
            mask_image=[Image.fromarray(j["mask"]) for j in chunk],
            reference_image=[j["reference"] for j in chunk],
            reference_mask=[j["reference_mask"] for j in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            reference_guidance_scale=reference_guidance,
            padding_mask_crop=DEFAULT_PADDING_MASK_CROP,  # the one default of the pipeline and the commands
            generator=torch.Generator().manual_seed(seed + start),
        )
        for job, image in zip(chunk, out.images, strict=True):
            job["generated"] = np.asarray(image.convert("RGB"))


# ---- 5: measurement ---------------------------------------------------------------------------------
def measure(jobs: list[dict], name: str = "text_controllability") -> dict:
    """Share of defects whose colour and shape (both, and each) match the job's target; ``name`` names the
    share of both (text controllability for caption jobs, reference fidelity for reference jobs)."""
    colour_ok = shape_ok = both_ok = 0
    worst_outside = 0
    for job in jobs:
        colour, shape, fraction = read_defect(job["generated"], job["normal"], job["mask"])
        job["measured"] = f"{colour} {shape}"
        colour_ok += colour == job["colour"]
        shape_ok += shape == job["shape"]
        both_ok += colour == job["colour"] and shape == job["shape"]
        worst_outside = max(worst_outside, outside_mask_change(job["generated"], job["normal"], job["mask"]))
    n = len(jobs)
    return {
        "num_generated": n,
        name: both_ok / n,
        "colour_accuracy": colour_ok / n,
        "shape_accuracy": shape_ok / n,
        "chance_level": 1 / (len(COLOURS) * len(SHAPES)),
        "max_outside_mask_change": worst_outside,
    }


def ic_lpips_random_backbone(jobs: list[dict], dataset) -> dict:
    """IC-LPIPS per defect type against the generator fold, with a random (not pretrained) backbone:
    the weights cannot be downloaded here, so the number is labelled as not a real score."""
    from ..evaluation import ic_lpips

    test = dataset["test"]
    centres: dict[str, list] = {}
    for row in test:
        if row["is_anomaly"] and row["fold"] == "generator":
            centres.setdefault(row["defect_type"], []).append(row["image"].convert("RGB"))
    generated: dict[str, list] = {}
    for job in jobs:
        generated.setdefault(f"{job['colour']}_{job['shape']}", []).append(Image.fromarray(job["generated"]))
    result = ic_lpips(generated, centres, random_backbone=True, resolution=32, progress=False).to_dict()
    result.pop("clusters", None)
    return result


# ---- 6: pictures ------------------------------------------------------------------------------------
def write_grid(jobs: list[dict], path: Path, per_caption: int = 2, scale: int = 3) -> Path:
    """normal | mask | caption (and what was measured) | generated: ``per_caption`` rows for every caption."""
    by_caption: dict[str, list[dict]] = {}
    for job in jobs:
        by_caption.setdefault(job["caption"], []).append(job)
    picked = [job for group in by_caption.values() for job in group[:per_caption]]
    cell = picked[0]["normal"].shape[0] * scale
    text_w = 3 * cell
    grid = Image.new("RGB", (3 * cell + text_w, cell * len(picked)), "white")
    draw = ImageDraw.Draw(grid)
    for r, job in enumerate(picked):
        y = r * cell
        for c, array in enumerate((job["normal"], job["mask"])):
            grid.paste(
                Image.fromarray(array).convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, y)
            )
        draw.text((2 * cell + 4, y + 4), job["caption"], fill="black")
        draw.text((2 * cell + 4, y + cell // 2), f"measured: {job['measured']}", fill="gray")
        grid.paste(
            Image.fromarray(job["generated"]).resize((cell, cell), Image.NEAREST), (2 * cell + text_w, y)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def measure_split(pipe, normals: list[np.ndarray], dataset, seed: int, args) -> tuple[dict, list[dict]]:
    """Text controllability (caption jobs, conflicting references) and reference fidelity (empty caption,
    a reference of each type) on one split of normal images, at the demo's guidance scales."""
    text, reference = (
        text_jobs(normals, dataset, args.size, seed + 1),
        reference_jobs(normals, dataset, args.size, seed + 2),
    )
    for jobs in (text, reference):
        synthesise(pipe, jobs, args.inference_steps, args.guidance_scale, args.synthesis_batch, seed,
                   args.reference_guidance_scale)  # fmt: skip
    results = measure(text)
    fidelity = measure(reference, "reference_fidelity")
    results["reference_fidelity"] = fidelity["reference_fidelity"]
    results["reference_colour_accuracy"] = fidelity["colour_accuracy"]
    results["reference_shape_accuracy"] = fidelity["shape_accuracy"]
    results["reference_num_generated"] = fidelity["num_generated"]
    results["max_outside_mask_change"] = max(
        results["max_outside_mask_change"], fidelity["max_outside_mask_change"]
    )
    return results, text


def run_one(name: str, flags: list[str], work: Path, base, encoder, export, toy, dataset, args) -> dict:
    from .. import AnomalyXFusionPipeline

    out = train_model(work, name, flags, base, encoder, export, args)
    pipe = AnomalyXFusionPipeline.from_pretrained(out)
    started = time.perf_counter()
    metrics, jobs = measure_split(pipe, normals_of(toy.held_out_normals), dataset, args.seed, args)
    fresh, _ = measure_split(pipe, fresh_normals(args.seed, args.fresh_normals, args.size), dataset,
                             args.seed + FRESH_SEED_OFFSET, args)  # fmt: skip
    metrics = {"model": name, **metrics, "fresh": fresh}
    metrics["grid"] = str(write_grid(jobs, work / "grids" / f"{out.name}.png"))
    metrics["pipeline"] = str(out)
    timed("controllability + fidelity synthesis, measure", started)
    return metrics, jobs, pipe, out.name


def run_downstream(pipe, run_name: str, work: Path, export, toy, args, baselines) -> dict:
    """The downstream rows of one generator; writes its table, PR curves and map picture."""
    budget = ds.DetectorBudget(
        per_defect_type=args.downstream_per_type, epochs=args.detector_epochs, seed=args.seed
    )
    out = work / "downstream" / run_name
    if (out / "synthesized").exists():  # the demo's own output of a previous run: anomalies of another model
        shutil.rmtree(out / "synthesized")
    rows, timings = ds.run_downstream(pipe, export, toy, out, args, budget, baselines)
    for stage, seconds in timings.items():
        TIMINGS[stage] = TIMINGS.get(stage, 0.0) + seconds
    rows["_pr_curves"] = str(ds.write_pr_curves(rows, out / "pr_curves.png"))
    rows["_maps"] = str(ds.write_maps_picture(rows, out / "maps.png"))
    return rows


def downstream_summary(rows: dict) -> dict:
    out = {
        name: {"n_anomalies": rows[name]["n_anomalies"], **rows[name]["result"].to_dict()} for name in ds.ROWS
    }
    return {"detectors": out, "pr_curves": rows["_pr_curves"], "maps": rows["_maps"]}


def write_report(work: Path, results: list[dict], started: float, args, downstream_rows=None) -> list[str]:
    """metrics.json and the Markdown tables results.md; returns the tables' lines."""
    report = {
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": {k: round(v, 1) for k, v in TIMINGS.items()},
        "settings": vars(args),
    }
    atomic_write(work / "metrics.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2, default=str)))
    table = [
        "| model | text controllability | colour | shape | reference fidelity | fresh split: text / reference "
        "| max change outside mask | downstream pixel AP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ap = r.get("downstream", {}).get("detectors", {}).get(ds.ROWS[0], {}).get("pixel_ap")
        fresh = r["fresh"]
        table.append(
            f"| {r['model']} | {r['text_controllability']:.3f} | {r['colour_accuracy']:.3f} | "
            f"{r['shape_accuracy']:.3f} | {r['reference_fidelity']:.3f} | "
            f"{fresh['text_controllability']:.3f} / {fresh['reference_fidelity']:.3f} | "
            f"{max(r['max_outside_mask_change'], fresh['max_outside_mask_change'])} | "
            + ("—" if ap is None else f"{100 * ap:.1f}")
            + " |"
        )
    if downstream_rows is not None:
        table += [
            "",
            f"Downstream ({downstream_rows['_model']}), toy evaluation fold:",
            "",
            *ds.table(downstream_rows),
        ]
    table += ["", "| stage | wall time |", "|---|---|"]
    table += [f"| {k} | {v:.0f} s |" for k, v in TIMINGS.items()]
    table.append(f"| total | {time.perf_counter() - started:.0f} s |")
    atomic_write(work / "results.md", lambda tmp: tmp.write_text("\n".join(table) + "\n"))
    return table


DESCRIPTION = "Offline end-to-end demo: toy MVTec Caption set -> training -> synthesis -> measurement."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's flags (``python -m axf_pipeline.demo``, ``axf demo``)."""
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--output_dir", default="outputs/demo", help="Everything the run writes goes here.")
    p.add_argument("--ablation", action="store_true", help="Run the five models of paper table 6.")
    p.add_argument("--size", type=int, default=32, help="Toy image size in pixels.")
    p.add_argument("--anomalies_per_type", type=int, default=60, help="Real toy anomalies per defect type.")
    p.add_argument(
        "--held_out_normals", type=int, default=16, help="Normal images that receive every caption."
    )
    p.add_argument("--vae_steps", type=int, default=400,
                   help="VAE pre-training steps (from scratch); 200 lost every red defect at seed 1.")  # fmt: skip
    p.add_argument("--clip_steps", type=int, default=300,
                   help="Contrastive pre-training steps of the tiny CLIP text and image towers (0: random towers).")  # fmt: skip
    p.add_argument("--train_steps", type=int, default=2000, help="AnomalyXFusion training steps.")
    p.add_argument("--batch_size", type=int, default=16, help="Training batch size.")
    p.add_argument(
        "--learning_rate",
        type=float,
        default=1e-3,
        help="1e-3 suits the tiny from-scratch UNet; "
        "use ~1e-4 with a real base model (then a UNet LoRA of rank 8 is trained, not the UNet).",
    )
    p.add_argument("--inference_steps", type=int, default=20, help="DDIM steps per synthesis.")
    p.add_argument("--guidance_scale", type=float, default=7.0,
                   help="The text's guidance weight (7 with --reference_guidance_scale 4: chosen on the validation split).")  # fmt: skip
    p.add_argument("--reference_guidance_scale", type=float, default=4.0,
                   help="The reference's guidance weight; a value other than --guidance_scale costs a third UNet pass.")  # fmt: skip
    p.add_argument("--fresh_normals", type=int, default=8,
                   help="Normal images of the independent split (made at a seed no choice was tuned on).")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="Run the whole demo once per seed (into OUTPUT_DIR/seed<N>) and write the mean, std "
                   "and worst seed of every figure to OUTPUT_DIR/seeds.md and seeds.json.")  # fmt: skip
    p.add_argument("--synthesis_batch", type=int, default=32, help="Images per pipeline call.")
    p.add_argument("--ema_decay", type=float, default=0.999,
                   help="train.py --use_ema with this decay; 0 = no EMA.")  # fmt: skip
    p.add_argument("--snr_gamma", type=float, default=5.0, help="train.py --snr_gamma; 0 = unweighted.")
    p.add_argument("--noise_offset", type=float, default=0.0, help="train.py --noise_offset.")
    p.add_argument("--downstream_per_type", type=int, default=16,
                   help="Anomalies per defect type for each downstream detector (synthesised, Perlin, real repeated).")  # fmt: skip
    p.add_argument("--detector_epochs", type=int, default=30, help="Epochs of each downstream detector.")
    p.add_argument("--seed", type=int, default=0, help="Seeds data, training, synthesis and detectors.")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="A real Stable Diffusion checkpoint (Hub id or folder) instead of the tiny from-scratch one.")  # fmt: skip
    p.add_argument(
        "--image_encoder",
        default=None,
        help="CLIP vision encoder to go with --pretrained_model_name_or_path.",
    )


def build_parser() -> argparse.ArgumentParser:
    return command_parser("python -m axf_pipeline.demo", DESCRIPTION, add_arguments)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if (args.pretrained_model_name_or_path is None) != (args.image_encoder is None):
        raise SystemExit("--pretrained_model_name_or_path and --image_encoder go together")
    if args.seeds:
        from .seeds import run_seeds

        return run_seeds(args, run_demo)
    return run_demo(args)


def run_demo(args: argparse.Namespace) -> int:
    """One whole demo at ``args.seed``; returns 0 and leaves metrics.json / results.md in ``args.output_dir``."""
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    TIMINGS.clear()
    work = Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    log(f"[1-2/7] toy MVTec Caption set -> {work}")
    t = time.perf_counter()
    toy, export, dataset = build_dataset(
        work, args.size, args.anomalies_per_type, args.held_out_normals, args.seed
    )
    timed("toy dataset (build, export, load)", t)
    if args.pretrained_model_name_or_path:
        base, encoder = args.pretrained_model_name_or_path, args.image_encoder
    else:
        log("[3/7] tiny from-scratch base model (VAE pre-training)")
        t = time.perf_counter()
        base, encoder = tiny_base(work, toy, args.size, args.vae_steps, args.seed, args.clip_steps)
        timed("VAE pre-training", t)
    models = ABLATIONS if args.ablation else {"all (AnomalyXFusion)": []}
    results, baselines, main_rows = [], None, None
    for name, flags in models.items():
        log(f"[3-5/7] {name}: train, synthesise, measure")
        metrics, jobs, pipe, run_name = run_one(name, flags, work, base, encoder, export, toy, dataset, args)
        log(f"[6/7] {name}: downstream (synthesise {args.downstream_per_type} per type, train 3 detectors)")
        rows = run_downstream(pipe, run_name, work, export, toy, args, baselines)
        rows["_model"] = name
        baselines = {k: rows[k] for k in ds.ROWS[1:]}
        metrics["downstream"] = downstream_summary(rows)
        main_rows = rows
        results.append(metrics)
        write_report(
            work, results, started, args, main_rows
        )  # after each model: a cut-short run keeps its rows
    t = time.perf_counter()
    results[-1]["ic_lpips_random_backbone"] = ic_lpips_random_backbone(jobs, dataset)
    timed("IC-LPIPS (random backbone)", t)
    table = write_report(work, results, started, args, main_rows)
    log(f"[7/7] done in {time.perf_counter() - started:.0f} s")
    print("\n".join(table))
    log(f"grid(s): {', '.join(r['grid'] for r in results)}")
    log(f"downstream: {main_rows['_pr_curves']}, {main_rows['_maps']}")
    log(f"metrics: {work / 'metrics.json'}  table: {work / 'results.md'}")
    log(f"chance level for controllability: {results[0]['chance_level']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
