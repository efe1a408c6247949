"""`mvtec-caption` (also `axf dataset`, `python -m mvtec_caption`): build, check, push, verify MVTec Caption.

mvtec-caption build --config loco --data-dir mvtec_loco_anomaly_detection.tar.xz --output outputs/mvtec_caption
mvtec-caption build --config custom --data-dir MY_TREE [--captions my_captions.json] --name mine
mvtec-caption build                      # no MVTec copy: builds both configs from a generated sample tree
mvtec-caption check outputs/mvtec_caption
mvtec-caption push outputs/mvtec_caption --repo-id <user>/mvtec_caption
mvtec-caption verify                     # fetch the authors' files and compare them with the shipped captions
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .captions import (
    CAPTION_SOURCES,
    CAPTIONS_COMMIT,
    CAPTIONS_REPO,
    fetch_caption_source,
    read_captions,
    shipped_captions_path,
    verify_shipped_captions,
)
from .command import run_command
from .errors import MVTecCaptionError
from .export import (
    CONFIGS,
    DEFAULT_OUTPUT,
    check_export,
    check_output_dir,
    export_dataset,
    push_to_hub,
    summarize,
)
from .sample_tree import make_sample_tree

DEFAULT_WORK_DIR = Path("outputs") / "mvtec_caption_sample"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommands build, check, push and verify (``mvtec-caption``, ``python -m mvtec_caption``,
    ``axf dataset``)."""
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser(
        "build", help="build one config (or, with no --data-dir, a sample) into the export folder"
    )
    build.add_argument(
        "--config",
        choices=CONFIGS,
        help="ad (MVTec AD), loco (MVTec LOCO) or custom (any MVTec-layout tree); required with --data-dir",
    )
    build.add_argument("--data-dir", type=Path, help="extracted MVTec(-layout) folder or its .tar.xz archive")
    build.add_argument(
        "--captions",
        type=Path,
        help="ad/loco: authors' Construct_*.py (read as data) or captions JSON (default: the shipped captions); "
        "custom: JSON {category: {defect_type: [caption, ...] or {image: caption}}} (default: templates)",
    )
    build.add_argument("--name", help="custom only: the config name in the export (default: custom)")
    build.add_argument(
        "--license",
        help="custom only: your images' licence as a Hub licence id (e.g. cc-by-4.0) for the card; "
        "default: unknown (ad and loco are MVTec's cc-by-nc-sa-4.0)",
    )
    build.add_argument("--categories", nargs="+", help="build only these categories")
    build.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"export folder (default {DEFAULT_OUTPUT})"
    )
    build.add_argument("--cache-dir", type=Path, help="datasets cache (archive extraction, caption download)")
    build.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="where the sample tree goes")
    build.add_argument("--scale", type=float, default=0.05, help="sample tree resolution / real resolution")

    check = commands.add_parser("check", help="load an export with load_dataset and print its counts")
    check.add_argument("output", type=Path, nargs="?", default=DEFAULT_OUTPUT)
    check.add_argument("--cache-dir", type=Path, help="datasets cache for the check's load_dataset")

    push = commands.add_parser("push", help="upload an export folder to the Hub as a dataset repo")
    push.add_argument("output", type=Path, nargs="?", default=DEFAULT_OUTPUT)
    push.add_argument("--repo-id", required=True, help="<user or org>/mvtec_caption")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", help="Hub token (default: the logged-in one)")

    verify = commands.add_parser(
        "verify",
        help="fetch the authors' caption files (pinned commit) and compare them with the shipped copies",
    )
    verify.add_argument("--config", choices=tuple(CAPTION_SOURCES), help="ad or loco (default: both)")
    verify.add_argument(
        "--source", type=Path, help="a local copy of the authors' Construct_*.py (no download)"
    )
    verify.add_argument("--cache-dir", type=Path, help="download cache")


def _verify(args: argparse.Namespace) -> None:
    if args.source is not None and args.config is None:
        raise MVTecCaptionError("--config {ad,loco} is required with --source")
    for config_name in [args.config] if args.config else list(CAPTION_SOURCES):
        source = args.source or fetch_caption_source(config_name, args.cache_dir)
        count = verify_shipped_captions(config_name, source)
        print(
            f"{config_name}: {count} captions of {source} ({CAPTIONS_REPO}@{CAPTIONS_COMMIT[:12]}) "
            f"match the shipped {shipped_captions_path(config_name).name}"
        )


def _print_summary(output: Path) -> None:
    for config_name, entry in summarize(output).items():
        splits = ", ".join(
            f"{split} {c['examples']} ({c['anomalies']} anomalies)" for split, c in entry["splits"].items()
        )
        note = "  [SYNTHETIC SAMPLE]" if entry["synthetic"] else "  [TOY DATA]" if entry["toy"] else ""
        print(
            f"  {config_name}: {splits}; {entry['captions']} captions, {len(entry['categories'])} categories{note}"
        )


def _build(args: argparse.Namespace) -> None:
    if args.data_dir is not None:
        if args.config is None:
            raise MVTecCaptionError(f"--config {{{','.join(CONFIGS)}}} is required with --data-dir")
        export_dataset(
            args.config, args.data_dir, args.output, args.captions, args.categories, args.cache_dir,
            name=args.name, license=args.license,
        )  # fmt: skip
    elif args.config == "custom" or args.name is not None or args.license is not None:
        raise MVTecCaptionError(
            "--config custom (and --name, --license) need --data-dir: the folder of your MVTec-layout tree"
        )
    else:
        check_output_dir(args.output)
        configs = [args.config] if args.config else list(CAPTION_SOURCES)
        print(
            f"No --data-dir given: generating a small MVTec-shaped SAMPLE tree with synthetic images and "
            f"captions under {args.work_dir} and building {', '.join(configs)} from it. This is not MVTec data; "
            "pass --data-dir (and --captions when offline) to build the real MVTec Caption."
        )
        args.work_dir.mkdir(parents=True, exist_ok=True)
        for config_name in configs:
            # A fresh folder of our own per run: nothing of the user's under --work-dir is touched.
            with tempfile.TemporaryDirectory(prefix=f"sample-{config_name}-", dir=args.work_dir) as root:
                root = Path(root)
                # Given captions lay out their own counts (e.g. the real 1,258 / 993) with small images.
                captions = read_captions(args.captions) if args.captions else None
                tree = make_sample_tree(
                    root / "data", config_name, captions, categories=args.categories, scale=args.scale,
                    captions_path=root / "captions.json", progress=True,
                )  # fmt: skip
                export_dataset(
                    config_name, tree.root, args.output, tree.captions_path, args.categories,
                    args.cache_dir or args.work_dir / "cache", toy=True,
                )  # fmt: skip
    print(f"Exported to {args.output}:")
    _print_summary(args.output)
    print(f'Load it with: datasets.load_dataset("{args.output}", "<config>")')


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "build":
            _build(args)
        elif args.command == "check":
            check_export(args.output, cache_dir=args.cache_dir)
            print(f"{args.output} loads with load_dataset:")
            _print_summary(args.output)
        elif args.command == "push":
            url = push_to_hub(args.output, args.repo_id, token=args.token, private=args.private)
            print(f"Pushed {args.output} to {url}")
        elif args.command == "verify":
            _verify(args)
    except MVTecCaptionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("mvtec-caption", __doc__.split("\n")[0], add_arguments, run, argv)
