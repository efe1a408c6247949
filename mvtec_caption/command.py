"""The one shape of a command line: a module's ``add_arguments(parser)`` and ``run(args) -> exit code``, and one
flag style for every command: each ``--long_flag`` also answers to ``--long-flag`` and back.

``train.py`` (and the demo) name their flags like diffusers' training scripts (``--dataset_name``), ``axf`` and
``mvtec-caption`` with dashes (``--data-dir``); both spellings work everywhere, so every documented command line
keeps working and ``axf train --dataset-name`` means ``accelerate launch train.py --dataset_name``. ``--help``
shows each flag once, as it is defined. Lives here because ``mvtec_caption`` imports nothing of ``axf_pipeline``.
"""

from __future__ import annotations

import argparse

__all__ = ["accept_both_spellings", "command_parser", "run_command"]


def _other_spelling(option: str) -> str | None:
    if not option.startswith("--"):
        return None
    name = option[2:]
    other = name.replace("_", "-") if "_" in name else name.replace("-", "_")
    return None if other == name else "--" + other


def accept_both_spellings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Registers the other spelling of every long flag of ``parser`` and its subcommands (returns ``parser``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in set(action.choices.values()):
                accept_both_spellings(subparser)
        for option in list(action.option_strings):
            other = _other_spelling(option)
            if other is not None and other not in parser._option_string_actions:
                parser._option_string_actions[other] = action  # parsed as the flag, not listed in --help
    return parser


def command_parser(prog: str, description: str | None, add_arguments) -> argparse.ArgumentParser:
    """A parser named ``prog`` holding what ``add_arguments`` adds, both spellings accepted."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return accept_both_spellings(parser)


def run_command(prog: str, description: str | None, add_arguments, run, argv=None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``) and returns ``run(args)``'s exit code."""
    return int(run(command_parser(prog, description, add_arguments).parse_args(argv)) or 0)
