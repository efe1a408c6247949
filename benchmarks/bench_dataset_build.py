"""Benchmark: MVTec Caption build time against merely decoding the images and masks, and peak memory.

Builds an MVTec-AD-sized tree (1,258 anomalies with masks over 15 categories, plus normal images) at
the real resolutions times --scale, then, in the same run and each in a fresh process:

  decode   open and decode every image and mask of the tree once with PIL   (the baseline)
  build    `export_dataset` of the whole tree: Parquet shards with the bytes embedded + card
  build/4  the same for 4 of the 15 categories, to show peak memory does not grow with the tree

and prints build seconds / decode seconds (target <= 1.0) and each process's peak RSS.

    python benchmarks/bench_dataset_build.py --scale 0.5      # a few minutes on 2 cores
    python benchmarks/bench_dataset_build.py --scale 1.0      # real resolutions
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AD_ANOMALIES = 1258


def mvtec_ad_sized_captions(defects_per_category: int = 5) -> dict:
    """1,258 placeholder captions over the 15 AD categories (counts matter here, not text)."""
    from mvtec_caption.layout import AD_CATEGORIES

    slots = len(AD_CATEGORIES) * defects_per_category
    counts = [AD_ANOMALIES // slots + (i < AD_ANOMALIES % slots) for i in range(slots)]
    captions, k = {}, 0
    for category in AD_CATEGORIES:
        captions[category] = {}
        for d in range(defects_per_category):
            captions[category][f"defect_{d}"] = [
                f"A {category} with defect {d}, image {i}." for i in range(counts[k])
            ]
            k += 1
    return captions


def _child(args: argparse.Namespace) -> None:
    """Runs in a fresh process; prints one JSON line with seconds and peak RSS."""
    start = time.perf_counter()
    if args.child == "decode":
        from PIL import Image

        n = 0
        for path in sorted(Path(args.tree).rglob("*.png")):
            with Image.open(path) as image:
                image.load()
            n += 1
        seconds = time.perf_counter() - start
        extra = {"files": n}
    else:
        import datasets

        from mvtec_caption import export_dataset
        from mvtec_caption.export import summarize

        datasets.disable_progress_bars()
        imports = time.perf_counter() - start  # a constant, reported apart from the build
        start = time.perf_counter()
        categories = args.categories.split(",") if args.categories else None
        export_dataset(
            "ad", args.tree, args.output, args.captions, categories=categories, cache_dir=args.cache
        )
        seconds = time.perf_counter() - start
        extra = {
            "examples": sum(c["examples"] for c in summarize(args.output)["ad"]["splits"].values()),
            "import_seconds": round(imports, 2),
            "output_mb": round(sum(p.stat().st_size for p in Path(args.output).rglob("*")) / 2**20, 1),
        }
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, **extra}))


def _run_child(*argv: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child {argv[:2]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _build_child(tree: Path, work: Path, name: str, captions: Path, categories: str) -> dict:
    out = work / f"out_{name}" / "mvtec_caption"
    run = _run_child(
        "--child", "build", "--tree", str(tree), "--output", str(out), "--captions", str(captions),
        "--cache", str(work / f"cache_{name}"), "--categories", categories,
    )  # fmt: skip
    shutil.rmtree(out.parent, ignore_errors=True)
    shutil.rmtree(work / f"cache_{name}", ignore_errors=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.5, help="resolution / real MVTec AD resolution")
    parser.add_argument("--train", type=int, default=8, help="normal training images per category")
    parser.add_argument("--test-good", type=int, default=4, help="normal test images per category")
    parser.add_argument(
        "--repeat", type=int, default=2, help="alternate decode and build this often, keep the best"
    )
    parser.add_argument("--captions", type=Path, help="real AD captions (.py or JSON); default placeholders")
    parser.add_argument("--work-dir", type=Path, help="keep the tree here (default: a temporary folder)")
    parser.add_argument("--child", choices=["decode", "build"], help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--categories", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)

    from mvtec_caption import make_sample_tree, read_captions
    from mvtec_caption.captions import write_captions_json

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_mvtec_caption_"))
    try:
        captions = read_captions(args.captions) if args.captions else mvtec_ad_sized_captions()
        captions_path = write_captions_json(captions, work / "captions.json")
        t0 = time.perf_counter()
        tree = make_sample_tree(
            work / "tree",
            "ad",
            captions,
            scale=args.scale,
            n_train=args.train,
            n_test_good=args.test_good,
            progress=True,
        )
        n_images = sum(1 for _ in tree.root.rglob("*.png"))
        print(
            f"tree: {n_images} PNG files (images + masks) at scale {args.scale}, written in {time.perf_counter() - t0:.0f} s"
        )
        # Other processes share the cores: alternate baseline and build, keep each one's best time.
        decodes, builds = [], []
        for r in range(args.repeat):
            decodes.append(_run_child("--child", "decode", "--tree", str(tree.root)))
            builds.append(_build_child(tree.root, work, f"full{r}", captions_path, ""))
        decode = min(decodes, key=lambda run: run["seconds"])
        runs = {
            "all 15 categories": min(builds, key=lambda run: run["seconds"]),
            "4 categories": _build_child(
                tree.root, work, "four", captions_path, "bottle,cable,capsule,carpet"
            ),
        }
        full = runs["all 15 categories"]
        print(
            f"best of {args.repeat}: decode every image and mask once (PIL): {decode['seconds']:.1f} s over {decode['files']} files, peak RSS {decode['peak_rss_mb']:.0f} MB"
        )
        for label, run in runs.items():
            print(
                f"build {label} ({run['examples']} examples): {run['seconds']:.1f} s (+{run['import_seconds']:.1f} s imports), export {run['output_mb']:.0f} MB, peak RSS {run['peak_rss_mb']:.0f} MB"
            )
        print(f"ratio build / decode = {full['seconds'] / decode['seconds']:.2f}  (target <= 1.0)")
        print(json.dumps({"scale": args.scale, "files": decode["files"], "decode": decode, "builds": runs}))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
