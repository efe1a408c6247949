"""`axf`: the project's command line. Each subcommand lives beside the code it drives."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module providing add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS = {
    "app": ("axf_pipeline.app.cli", "the Gradio page: synthesise, browse a dataset, run a batch"),
    "evaluate": ("axf_pipeline.evaluation.cli", "IS, IC-LPIPS and downstream AUROC/AP/F1-max reports"),
    "generate": (
        "axf_pipeline.generate",
        "batch anomaly synthesis: folders of images + masks -> images + masks",
    ),
    "synthesize": (
        "axf_pipeline.synthesis.cli",
        "N new labelled anomalies per defect type from a dataset's generator fold (dataset + MVTec folder)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="axf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
