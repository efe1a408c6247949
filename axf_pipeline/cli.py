"""`axf`: the project's one command. Each subcommand is defined beside the code it drives.

Every flag may be written with dashes or underscores (--data-dir = --data_dir); `axf train` takes exactly
train.py's flags, `axf dataset` exactly mvtec-caption's. `axf COMMAND --help` lists a command's flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mvtec_caption.command import command_parser

# (subcommand, module with add_arguments(parser) and run(args) -> exit code, one-line help). A module is
# imported only when its subcommand runs, so `axf --help` never imports an optional extra. One line adds one.
SUBCOMMANDS = [
    (
        "dataset",
        "mvtec_caption.cli",
        "build, check, push or verify the MVTec Caption dataset (= mvtec-caption)",
    ),
    (
        "train",
        "axf_pipeline.training",
        "train AnomalyXFusion on MVTec Caption (= accelerate launch train.py)",
    ),
    (
        "synthesize",
        "axf_pipeline.synthesis.cli",
        "N new labelled anomalies per defect type from a dataset's generator fold (dataset + MVTec folder)",
    ),
    (
        "generate",
        "axf_pipeline.generate",
        "batch anomaly synthesis: folders of images + masks -> images + masks",
    ),
    ("evaluate", "axf_pipeline.evaluation.cli", "IS, IC-LPIPS and downstream AUROC/AP/F1-max reports"),
    (
        "demo",
        "axf_pipeline.demo.run",
        "the offline end-to-end demo on a toy set (= python -m axf_pipeline.demo)",
    ),
    ("app", "axf_pipeline.app.cli", "the Gradio page: synthesise, browse a dataset, run a batch"),
]


def build_parser() -> argparse.ArgumentParser:
    """`axf` with every subcommand's one-line help; no subcommand module is imported."""
    parser = argparse.ArgumentParser(
        prog="axf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, _, help_text in SUBCOMMANDS:
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def subcommand_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The parser of ``axf NAME`` and the module that runs it."""
    module_name, help_text = next((m, h) for n, m, h in SUBCOMMANDS if n == name)
    module = importlib.import_module(module_name)
    return command_parser(f"axf {name}", help_text, module.add_arguments), module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in {name for name, _, _ in SUBCOMMANDS}:
        build_parser().parse_args(argv)  # --help, or a usage error naming the subcommands (exit code 2)
        return 2
    parser, module = subcommand_parser(argv[0])
    return int(module.run(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
