"""Training AnomalyXFusion (``accelerate launch train.py``): small functions that ``train.py`` strings together.

``args`` (flags and start-up checks), ``data`` (MVTec Caption → crops, masks, references), ``model``
(what is trained, one step of eq. 17), ``loss``, ``checkpointing`` (atomic, resumable, one run per
folder), ``validation`` (the normal | mask | generated grid), ``export`` (atomic pipeline, LoRA, model
card, push) and ``loop``.
"""

import sys

from .args import TrainingInputError, add_arguments, build_parser, check_args, parse_args


def run(args) -> int:
    """Trains with parsed ``args`` (``axf train``); a bad input found at start-up is one line on stderr and
    exit code 2."""
    from .loop import train

    try:
        check_args(args)
        train(args)
    except TrainingInputError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    """``train.py``'s and ``accelerate launch -m axf_pipeline.training``'s entry point."""
    return run(build_parser().parse_args(argv))


__all__ = ["TrainingInputError", "add_arguments", "build_parser", "main", "parse_args", "run"]
