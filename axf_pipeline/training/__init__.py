"""Training AnomalyXFusion (``accelerate launch train.py``): small functions that ``train.py`` strings together.

``args`` (flags and start-up checks), ``data`` (MVTec Caption → crops, masks, references), ``model``
(what is trained, one step of eq. 17), ``loss``, ``checkpointing`` (atomic, resumable), ``validation``
(the normal | mask | generated grid), ``export`` (pipeline, LoRA, model card, push) and ``loop``.
"""

from .args import TrainingInputError, build_parser, parse_args


def main(argv=None) -> int:
    from .loop import train

    train(parse_args(argv))
    return 0


__all__ = ["TrainingInputError", "build_parser", "main", "parse_args"]
