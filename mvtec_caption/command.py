"""The one shape of a command line: a module's ``add_arguments(parser)`` and ``run(args) -> exit code``, and one
flag style for every command: each ``--long_flag`` also answers to ``--long-flag`` and back.

``train.py`` (and the demo) name their flags like diffusers' training scripts (``--dataset_name``), ``axf`` and
``mvtec-caption`` with dashes (``--data-dir``); both spellings work everywhere, so every documented command line
keeps working and ``axf train --dataset-name`` means ``accelerate launch train.py --dataset_name``. ``--help``
shows each flag once, as it is defined. Lives here because ``mvtec_caption`` imports nothing of ``axf_pipeline``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["FlagParser", "command_parser", "run_command"]


def _other_spelling(option: str) -> str | None:
    if not option.startswith("--"):
        return None
    name = option[2:]
    other = name.replace("_", "-") if "_" in name else name.replace("-", "_")
    return None if other == name else "--" + other


class FlagParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reads a long flag in its other spelling as the flag it defines. Only the
    defined spelling is registered, so ``--help`` and abbreviations work as in argparse; subcommands (made with
    ``add_subparsers``) are ``FlagParser`` s too."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        end = args.index("--") if "--" in args else len(args)  # after a bare --, everything is a value
        return super().parse_known_args([*map(self._defined_spelling, args[:end]), *args[end:]], namespace)

    def _defined_spelling(self, arg: str) -> str:
        flag, equals, value = arg.partition("=")
        other = _other_spelling(flag)
        if flag in self._option_string_actions or other not in self._option_string_actions:
            return arg
        return other + equals + value


def command_parser(prog: str, description: str | None, add_arguments) -> argparse.ArgumentParser:
    """A parser named ``prog`` holding what ``add_arguments`` adds, both spellings accepted."""
    parser = FlagParser(prog=prog, description=description)
    add_arguments(parser)
    return parser


def run_command(prog: str, description: str | None, add_arguments, run, argv=None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``) and returns ``run(args)``'s exit code."""
    return int(run(command_parser(prog, description, add_arguments).parse_args(argv)) or 0)
