"""`axf app` / `python -m axf_pipeline.app`: serve the Gradio page on a model and dataset.

axf app --model DIR_OR_HUB_ID --dataset DIR_OR_HUB_ID [--config ad] [--port 7860]
axf app                      # the demo's model and dataset (outputs/demo), after `bash scripts/demo.sh`
"""

from __future__ import annotations

import argparse
import os
import sys

COMMAND = "axf app"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument(
        "--model", default=None, help="AnomalyXFusion pipeline: folder or Hub id (default: the demo's)"
    )
    parser.add_argument(
        "--dataset", default=None, help="MVTec Caption export or Hub id for normals and references (optional)"
    )
    parser.add_argument("--config", default="ad", help="config of --dataset")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--share", action="store_true", help="also a public gradio.live link")


def serve(model: str | None, dataset: str | None, config: str | None, **launch_kwargs) -> int:
    """Load, then serve until stopped; a bad model or dataset is one line on stderr and exit code 2."""
    from .logic import DEMO_HINT, AppError, Session, demo_defaults

    if model is None:
        found = demo_defaults()
        if found is None:
            print(f"{COMMAND}: {DEMO_HINT}", file=sys.stderr)
            return 2
        model, dataset = found[0], dataset or found[1]
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no usage pings
    try:
        import gradio  # noqa: F401
    except ImportError:
        print(
            f"{COMMAND}: error: gradio is not installed: pip install 'anomalyxfusion[app]'", file=sys.stderr
        )
        return 2
    from .ui import launch

    session = Session()
    try:
        print(session.load(model, dataset, config))
    except AppError as err:
        print(f"{COMMAND}: error: {err}", file=sys.stderr)
        return 2
    launch(session, **launch_kwargs)
    return 0


def run(args: argparse.Namespace) -> int:
    return serve(args.model, args.dataset, args.config, server_name=args.host, server_port=args.port,
                 share=args.share)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m axf_pipeline.app")
    add_arguments(parser)
    return run(parser.parse_args(argv))
