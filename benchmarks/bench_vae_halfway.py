"""What a demo base's VAE decodes part-way from a defect-free code to a defect's code, per colour.

A diffusion model commits to a defect gradually; if the decoder turns a half-committed red into green, the
generator never draws red (the afternoon's seed 2). For each demo seed folder (``base/base/vae`` and
``toy/tile`` as ``python -m axf_pipeline.demo`` leaves them) and each colour, the colours the demo's pixel
reader finds when decoding ``z_normal + a * (z_defect - z_normal)``, where ``z_normal`` codes the same image
with grey inside the mask, plus the round-trip ceiling (``a = 1``, colour and shape).

    python benchmarks/bench_vae_halfway.py outputs/demo_seeds/seed0 outputs/demo_seeds/seed2 \\
        --output benchmarks/results/vae_halfway/<date>.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axf_pipeline.demo.measure import read_defect  # noqa: E402
from axf_pipeline.demo.toy_data import CATEGORY, COLOURS  # noqa: E402
from axf_pipeline.demo.vae import to_model_input, to_uint8  # noqa: E402

STRENGTHS = (0.5, 0.7, 0.85, 1.0)


@torch.no_grad()
def halfway(folder: Path, per_type: int) -> dict:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "base" / "base" / "vae").eval()
    tree = folder / "toy" / CATEGORY
    read: dict[str, dict[str, list[str]]] = {c: {str(a): [] for a in STRENGTHS} for c in COLOURS}
    for type_dir in sorted((tree / "ground_truth").iterdir()):
        colour = type_dir.name.split("_")[0]
        for mask_path in sorted(type_dir.glob("*_mask.png"))[:per_type]:
            image_path = tree / "test" / type_dir.name / mask_path.name.replace("_mask", "")
            image = np.asarray(Image.open(image_path).convert("RGB"))
            mask = np.asarray(Image.open(mask_path))
            normal = image.copy()
            normal[mask > 0] = 128
            z, z0 = (vae.encode(to_model_input(x)).latent_dist.mode() for x in (image, normal))
            for a in STRENGTHS:
                read[colour][str(a)].append(
                    read_defect(to_uint8(vae.decode(z0 + a * (z - z0)).sample), normal, mask)[0]
                )
    return {
        colour: {a: {"right": float(np.mean([r == colour for r in rs])), "read": sorted(set(rs))} for a, rs in by_a.items()}
        for colour, by_a in read.items()
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="demo seed folders (seedN of --output_dir)")
    p.add_argument("--label", nargs="*", default=None, help="one label per folder (default: folder name)")
    p.add_argument("--per_type", type=int, default=6, help="defects per defect type")
    p.add_argument("--output", type=Path, required=True, help="a .md file; the .json beside it")
    a = p.parse_args()
    torch.set_num_threads(1)
    labels = a.label or [f.name for f in a.folders]
    if len(labels) != len(a.folders):
        p.error("--label: give one label per folder")
    rows = {label: halfway(folder, a.per_type) for label, folder in zip(labels, a.folders, strict=True)}
    lines = [
        f"`python benchmarks/bench_vae_halfway.py` over {len(rows)} base(s), {a.per_type} defects per type. "
        "Cell: share decoded as the defect's own colour (other colours read).",
        "",
        "| base | colour | " + " | ".join(f"a = {s}" for s in STRENGTHS) + " |",
        "|---|---|" + "---|" * len(STRENGTHS),
    ]
    for label, by_colour in rows.items():
        for colour, by_a in by_colour.items():
            cells = []
            for s in STRENGTHS:
                cell = by_a[str(s)]
                others = [r for r in cell["read"] if r != colour]
                cells.append(f"{cell['right']:.2f}" + (f" ({', '.join(others)})" if others else ""))
            lines.append(f"| {label} | {colour} | " + " | ".join(cells) + " |")
    a.output.parent.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (a.output, "\n".join(lines) + "\n"),
        (a.output.with_suffix(".json"), json.dumps(rows, indent=1)),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
