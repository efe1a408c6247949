"""Training AnomalyXFusion (``accelerate launch train.py``): small functions that ``train.py`` strings together.

``args`` (flags and start-up checks), ``data`` (MVTec Caption → crops, masks, references), ``model``
(what is trained, one step of eq. 17), ``loss``, ``checkpointing`` (atomic, resumable, one run per
folder), ``validation`` (the normal | mask | generated grid), ``export`` (atomic pipeline, LoRA, model
card, push) and ``loop``.
"""

import sys

from .args import TrainingInputError, build_parser, parse_args


def main(argv=None) -> int:
    """``train.py``'s entry point: a bad input found at start-up is one line on stderr and exit code 2."""
    from .loop import train

    try:
        train(parse_args(argv))
    except TrainingInputError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["TrainingInputError", "build_parser", "main", "parse_args"]
