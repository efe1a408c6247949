"""`axf evaluate` / `python -m axf_pipeline.evaluation`: compare generators on real data, write a report.

Example::

    axf evaluate --real ./mvtec_caption_export --real-config ad --categories bottle \\
        --generated axf=./generated/axf --baseline-per-defect-type 100 --output ./eval_report
"""

from __future__ import annotations

import argparse
import json
import sys

from mvtec_caption.command import run_command

__all__ = ["add_arguments", "check_arguments", "main", "run"]


def _generator_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--generated expects NAME=PATH, got {text!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the evaluate command (mounted by `axf evaluate` and `python -m axf_pipeline.evaluation`)."""
    from .harness import ALL_METRICS

    parser.add_argument(
        "--real", required=True, help="real MVTec Caption data: save_to_disk folder or load_dataset path"
    )
    parser.add_argument("--real-config", default=None, help="config of --real for load_dataset (ad or loco)")
    parser.add_argument(
        "--generated",
        action="append",
        type=_generator_spec,
        default=[],
        metavar="NAME=PATH",
        help="a generator's anomalies: folder <category>/<defect_type>/<name>.png + <name>_mask.png, or a "
        "dataset with the MVTec Caption columns; repeat to compare generators",
    )
    parser.add_argument(
        "--generated-config", default=None, help="config name for dataset sources of --generated"
    )
    parser.add_argument(
        "--baseline-per-defect-type",
        type=int,
        default=0,
        metavar="N",
        help="also evaluate the Perlin (DRAEM-style) baseline with N anomalies per defect type",
    )
    parser.add_argument("--categories", nargs="+", default=None, help="categories to evaluate (default: all)")
    parser.add_argument("--metrics", nargs="+", choices=ALL_METRICS, default=list(ALL_METRICS))
    parser.add_argument("--output", required=True, help="folder for report.json, report.md and plots/")
    parser.add_argument(
        "--resolution", type=int, default=256, help="U-Net train/test resolution (DRAEM: 256)"
    )
    parser.add_argument(
        "--classifier-resolution", type=int, default=224, help="ResNet-34 input size (at least 64)"
    )
    parser.add_argument("--epochs", type=int, default=10, help="U-Net epochs")
    parser.add_argument("--classifier-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--unet-channels", type=int, default=64, help="U-Net base width (DRAEM: 64)")
    parser.add_argument("--unet-depth", type=int, default=5)
    parser.add_argument(
        "--classifier-weights", default=None, help="ResNet-34 ImageNet weights: a .safetensors path or 'hub'"
    )
    parser.add_argument(
        "--inception-weights", default=None, help=".safetensors InceptionV3 (default: hub cache)"
    )
    parser.add_argument(
        "--lpips-weights", default=None, help=".safetensors VGG-16 for LPIPS (default: hub cache)"
    )
    parser.add_argument("--lpips-net", default="vgg", choices=("vgg", "alex"))
    parser.add_argument(
        "--lpips-resolution", type=int, default=256, help="IC-LPIPS image size (protocol: 256; at least 32)"
    )
    parser.add_argument("--max-cluster-size", type=int, default=50, help="IC-LPIPS cluster cap (0: no cap)")
    parser.add_argument("--small-clusters", default="skip", choices=("skip", "zero"))
    parser.add_argument(
        "--random-backbones",
        action="store_true",
        help="testing only: random Inception/VGG backbones; every such score is marked NOT A REAL SCORE",
    )
    parser.add_argument(
        "--detector",
        default="unet",
        choices=("unet", "anomalib-draem"),
        help="unet: the metrics above; anomalib-draem: train anomalib's Draem stock / on each --generated "
        "axf synthesize output / 50-50 mixed, and the real-fold ratio rows (needs the anomalib extra)",
    )
    parser.add_argument(
        "--ratios", nargs="+", type=int, default=[1, 4, 16], metavar="K",
        help="anomalib-draem: synthetic anomalies per real generator-fold anomaly in the ratio rows",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


# Smallest sizes the networks take: ResNet-34 and the LPIPS backbones down-sample by 32, and a last
# batch of one image needs more than one feature per channel for BatchNorm.
MIN_CLASSIFIER_RESOLUTION = 64
MIN_LPIPS_RESOLUTION = 32


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no data, before anything is read or computed; a ``ValueError`` names the flag."""
    import torch

    from .generation import _LPIPS_BACKBONE
    from .report import check_output
    from .weights import backbone_file

    names = [name for name, _ in args.generated]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(
            f"--generated: generator name(s) {duplicates} given more than once; names must be unique"
        )
    if not names and args.baseline_per_defect_type <= 0:
        raise ValueError(
            "no generator to evaluate: pass --generated NAME=PATH and/or --baseline-per-defect-type N"
        )
    if "perlin" in names and args.baseline_per_defect_type > 0:
        raise ValueError(
            "--generated: the name 'perlin' is the baseline's (--baseline-per-defect-type); rename it"
        )
    minimum = {
        "resolution": 1, "classifier_resolution": MIN_CLASSIFIER_RESOLUTION, "epochs": 1,
        "classifier_epochs": 1, "batch_size": 1, "unet_channels": 1, "unet_depth": 1,
        "lpips_resolution": MIN_LPIPS_RESOLUTION, "max_cluster_size": 0, "baseline_per_defect_type": 0,
    }  # fmt: skip
    for name, low in minimum.items():
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    bottleneck = 2 ** (args.unet_depth - 1)
    if args.resolution % bottleneck or args.resolution // bottleneck < 2:
        raise ValueError(
            f"--resolution {args.resolution} must be a multiple of {bottleneck} and at least {2 * bottleneck} "
            f"for a --unet-depth {args.unet_depth} U-Net"
        )
    # Every pretrained file the metrics will read: a path given is checked always, the hub cache when used.
    pretrained = not args.random_backbones
    lpips = _LPIPS_BACKBONE[args.lpips_net]
    classifier = None if args.classifier_weights == "hub" else args.classifier_weights
    for flag, key, path, used in (
        (
            "--inception-weights",
            "inception",
            args.inception_weights,
            "inception_score" in args.metrics and pretrained,
        ),
        ("--lpips-weights", lpips, args.lpips_weights, "ic_lpips" in args.metrics and pretrained),
        ("--classifier-weights", "resnet34", classifier, args.classifier_weights is not None),
    ):
        if path is not None or used:
            try:
                backbone_file(key, path)
            except (FileNotFoundError, ValueError) as err:
                raise ValueError(f"{flag}: {err}") from None
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ValueError(f"--device {args.device!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: CUDA is not available here")
    check_output(args.output)


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .data import RealData, load_anomalies
    from .harness import HarnessOptions, evaluate_generators
    from .report import write_report

    if args.detector == "anomalib-draem":  # the optional extra, imported only when asked for
        try:
            from ..integrations.anomalib_evaluate import run_cli
        except ImportError as err:
            print(f"axf evaluate: error: --detector anomalib-draem needs anomalib ({err})", file=sys.stderr)
            return 2
        return run_cli(args)
    try:  # bad input: one line naming the flag or file, exit code 2, no traceback
        check_arguments(args)
        # every option but the progress bars is a flag of the same name
        flags = {f.name: getattr(args, f.name) for f in fields(HarnessOptions) if f.name != "progress"}
        flags.update(metrics=tuple(args.metrics), max_cluster_size=args.max_cluster_size or None)
        options = HarnessOptions(**flags, progress=not args.no_progress)
        real = RealData(args.real, args.real_config)
        generators = {name: load_anomalies(path, args.generated_config) for name, path in args.generated}
        report, curves = evaluate_generators(real, generators, options, args.categories)
    except (ValueError, FileNotFoundError) as err:
        print(f"axf evaluate: error: {err}", file=sys.stderr)
        return 2
    paths = write_report(report, curves, args.output)
    print(
        json.dumps({k: str(v) if not isinstance(v, list) else [str(p) for p in v] for k, v in paths.items()})
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("python -m axf_pipeline.evaluation", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
