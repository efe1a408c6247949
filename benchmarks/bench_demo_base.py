"""What the demo's tiny from-scratch base gets from its pre-training, per seed (docs/demo.md, causes 1 and 2).

For each seed, on the toy set the demo builds at that seed (generator fold only, as ``tiny_base`` sees it):

* **CLIP towers**: cosine of the text tower's pooled outputs between different captions, and of the image
  tower's embeddings of masked defects between images of the same and of different defect types, with the
  random towers and after ``pretrain_clip`` (the demo's 300 steps).
* **VAE round trip**: the share of defects whose colour and shape the demo's pixel reader still finds after
  encode/decode (the ceiling of every controllability figure), overall and per colour, after 200 and 400
  plain reconstruction steps (no interpolation term, no further rounds) and with the demo's recipe
  (400 steps with the interpolation term, further rounds while under 99 %).

    python benchmarks/bench_demo_base.py --seeds 0 1 2 3 4 --output benchmarks/results/demo_base/<date>
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axf_pipeline.demo.clip import masked_pixels, pretrain_clip  # noqa: E402
from axf_pipeline.demo.run import VAE_MIN_CEILING, base_training_set  # noqa: E402
from axf_pipeline.demo.toy_data import COLOURS, make_toy_tree, vocabulary  # noqa: E402
from axf_pipeline.demo.vae import pretrain_vae, pretrain_vae_to_ceiling, reconstruction_accuracy  # noqa: E402
from axf_pipeline.tiny import build_tiny_components  # noqa: E402
from mvtec_caption._io import atomic_write  # noqa: E402


def _cosines(embeds: torch.Tensor, labels: list) -> dict:
    """Mean (and range) pairwise cosine between items of the same label and of different labels."""
    e = F.normalize(embeds.float(), dim=-1)
    sim = (e @ e.T).numpy()
    same, diff = [], []
    for i, j in itertools.combinations(range(len(labels)), 2):
        (same if labels[i] == labels[j] else diff).append(float(sim[i, j]))
    return {"same": _summary(same), "different": _summary(diff)}


def _summary(xs: list[float]) -> dict | None:
    return {"mean": float(np.mean(xs)), "min": float(np.min(xs)), "max": float(np.max(xs))} if xs else None


@torch.no_grad()
def clip_cosines(components: dict, data: dict) -> dict:
    captions = sorted(set(data["defect_captions"]))
    tok = components["tokenizer"]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    text = components["text_encoder"].eval()(ids).pooler_output
    pixels = masked_pixels(components["feature_extractor"], data["defect_images"], data["defect_masks"])
    image = components["image_encoder"].eval()(pixels).image_embeds
    return {"text": _cosines(text, captions)["different"], "image": _cosines(image, data["defect_captions"])}


def vae_ceiling(vae, data: dict) -> dict:
    """Overall and per-colour share of defects that survive the round trip."""
    truth = data["truth"]
    out = {"all": reconstruction_accuracy(vae, data["defect_images"], data["defect_masks"], truth)}
    for colour in COLOURS:
        idx = [i for i, t in enumerate(truth) if t[0] == colour]
        out[colour] = reconstruction_accuracy(
            vae, [data["defect_images"][i] for i in idx], [data["defect_masks"][i] for i in idx],
            [truth[i] for i in idx],
        )  # fmt: skip
    return out


def one_seed(seed: int, work: Path, args) -> dict:
    toy = make_toy_tree(work / f"toy{seed}", size=args.size, anomalies_per_type=args.anomalies_per_type,
                        held_out_normals=16, seed=seed)  # fmt: skip
    data = base_training_set(toy)
    row: dict = {"seed": seed, "defects": len(data["truth"])}
    fresh = lambda: build_tiny_components(sample_size=args.size, words=vocabulary(), seed=seed)  # noqa: E731

    t = time.perf_counter()
    components = fresh()
    row["clip_random"] = clip_cosines(components, data)
    pretrain_clip(components["text_encoder"], components["tokenizer"], components["image_encoder"],
                  components["feature_extractor"], data["defect_captions"], data["defect_images"],
                  data["defect_masks"], steps=args.clip_steps, seed=seed)  # fmt: skip
    row["clip_pretrained"] = clip_cosines(components, data)
    row["clip_seconds"] = round(time.perf_counter() - t, 1)

    for steps in (200, 400):
        t = time.perf_counter()
        vae = fresh()["vae"]
        pretrain_vae(vae, data["images"], data["masks"], steps=steps, interpolation_weight=0.0, seed=seed)
        row[f"vae_plain_{steps}"] = {**vae_ceiling(vae, data), "seconds": round(time.perf_counter() - t, 1)}
    t = time.perf_counter()
    vae = fresh()["vae"]
    ceiling = lambda v: reconstruction_accuracy(v, data["defect_images"], data["defect_masks"], data["truth"])  # noqa: E731
    losses, _ = pretrain_vae_to_ceiling(vae, data["images"], data["masks"], ceiling, steps=400, seed=seed,
                                        min_ceiling=VAE_MIN_CEILING, log=lambda m: None)  # fmt: skip
    row["vae_demo"] = {
        **vae_ceiling(vae, data),
        "steps": len(losses),
        "seconds": round(time.perf_counter() - t, 1),
    }
    return row


def report(rows: list[dict], args) -> str:
    f = lambda x: f"{x:.2f}"  # noqa: E731
    lines = [
        "# The demo base's pre-training, per seed",
        "",
        f"`python benchmarks/bench_demo_base.py --seeds {' '.join(map(str, args.seeds))}` "
        f"(toy size {args.size}, {args.anomalies_per_type} anomalies per type, generator fold; CPU).",
        "",
        "## CLIP towers: cosine similarity (mean, min–max)",
        "",
        "| seed | text, different captions: random | image, different types: random | image, same type: random "
        "| text, different captions: pre-trained | image, same type: pre-trained | image, different types: pre-trained | seconds |",
        "| ---: | --- | --- | --- | --- | --- | --- | ---: |",
    ]
    cell = lambda c: f"{c['mean']:.2f} ({c['min']:.2f}–{c['max']:.2f})"  # noqa: E731
    for r in rows:
        a, b = r["clip_random"], r["clip_pretrained"]
        lines.append(f"| {r['seed']} | {cell(a['text'])} | {cell(a['image']['different'])} | {cell(a['image']['same'])} "
                     f"| {cell(b['text'])} | {cell(b['image']['same'])} | {cell(b['image']['different'])} | {r['clip_seconds']} |")  # fmt: skip
    lines += [
        "",
        "## VAE round trip: share of generator-fold defects whose colour and shape survive (all; per colour)",
        "",
        "| seed | recipe | all | " + " | ".join(COLOURS) + " | steps | seconds |",
        "| ---: | --- | ---: | " + " | ".join("---:" for _ in COLOURS) + " | ---: | ---: |",
    ]
    names = {"vae_plain_200": "200 steps, plain", "vae_plain_400": "400 steps, plain",
             "vae_demo": "demo (400 + interpolation, rounds to 99 %)"}  # fmt: skip
    for r in rows:
        for key, name in names.items():
            v = r[key]
            steps = v.get("steps", int(key.rsplit("_", 1)[-1]) if key != "vae_demo" else "")
            lines.append(f"| {r['seed']} | {name} | {f(v['all'])} | " + " | ".join(f(v[c]) for c in COLOURS)
                         + f" | {steps} | {v['seconds']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--anomalies_per_type", type=int, default=60)
    p.add_argument("--clip_steps", type=int, default=300)
    p.add_argument("--output", type=Path, required=True, help="Folder for report.md and raw.json.")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="axf-demo-base-") as tmp:
        for seed in args.seeds:
            rows.append(one_seed(seed, Path(tmp), args))
            print(f"seed {seed}: {json.dumps(rows[-1])}", file=sys.stderr)
            atomic_write(args.output / "raw.json", lambda t: t.write_text(json.dumps(rows, indent=1) + "\n"))
            atomic_write(args.output / "report.md", lambda t: t.write_text(report(rows, args)))
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
