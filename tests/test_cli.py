"""`axf` is the one command: every subcommand listed, each sharing its alias's parser, both flag spellings."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from axf_pipeline.cli import SUBCOMMANDS, main, subcommand_parser


def _flags(parser) -> dict:
    """Every option string of a parser (and its subcommands, as "build --data-dir") -> its destination."""
    flags = {}
    for action in parser._actions:
        flags.update(dict.fromkeys(action.option_strings, action.dest))
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags.update({f"{name} {k}": v for k, v in _flags(sub).items()})
    return flags


def test_help_lists_every_subcommand_without_importing_any(capsys):
    code = subprocess.run(
        [sys.executable, "-c", "import sys; from axf_pipeline.cli import main, SUBCOMMANDS\n"
         "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
         "loaded = [m for _, m, _ in SUBCOMMANDS if m in sys.modules]\n"
         "assert not loaded, loaded\n"
         "assert not [m for m in sys.modules if m.split('.')[0] in ('gradio', 'anomalib')]"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert code.returncode == 0, code.stderr[-2000:]
    for name, _, _ in SUBCOMMANDS:
        assert f"    {name}" in code.stdout
    assert {"dataset", "train", "synthesize", "generate", "evaluate", "demo"} <= {
        n for n, _, _ in SUBCOMMANDS
    }


def test_train_and_dataset_share_their_aliases_parsers():
    from axf_pipeline.training import build_parser as train_parser
    from mvtec_caption import cli as dataset_cli
    from mvtec_caption.command import command_parser

    assert _flags(subcommand_parser("train")[0]) == _flags(train_parser())
    alias = command_parser("mvtec-caption", None, dataset_cli.add_arguments)
    assert _flags(subcommand_parser("dataset")[0]) == _flags(alias)
    assert "build --data-dir" in _flags(alias) and "--dataset_name" in _flags(train_parser())


@pytest.mark.parametrize(
    "name, argv, dest, value",
    [
        (
            "train",
            ["--pretrained_model_name_or_path", "b", "--image_encoder", "e", "--output_dir", "o"],
            "dataset_name",
            "d",
        ),
        ("dataset", ["build"], "data_dir", "x"),
        ("demo", [], "output_dir", "o"),
    ],
)
def test_both_flag_spellings_mean_the_same(name, argv, dest, value):
    parser, _ = subcommand_parser(name)
    under, dash = "--" + dest, "--" + dest.replace("_", "-")
    a = parser.parse_args([*argv, under, value])
    b = parser.parse_args([*argv, dash, value])
    assert vars(a) == vars(b) and str(getattr(a, dest)) == value


def test_an_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bogus"])
    assert stop.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_accelerate_can_launch_training_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "axf_pipeline.training", "--help"], capture_output=True, text=True, timeout=600
    )
    assert (
        out.returncode == 0
        and "--dataset_name" in out.stdout
        and "--pretrained_model_name_or_path" in out.stdout
    )


def test_abbreviations_still_work_as_in_argparse():
    parser, _ = subcommand_parser("dataset")
    args = parser.parse_args(["build", "--work", "w", "--cache_dir=c"])
    assert str(args.work_dir) == "w" and str(args.cache_dir) == "c"
