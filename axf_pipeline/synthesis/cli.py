"""`axf synthesize` / `python -m axf_pipeline.synthesize`: N new labelled anomalies per defect type.

    axf synthesize --model DIR_OR_HUB_ID --dataset DIR_OR_HUB_ID --config ad \\
        --num-per-defect-type 100 --output OUT
    accelerate launch -m axf_pipeline.synthesize <the same flags>     # several processes / GPUs / machines

Only the generator fold and the train normals of the source are read. OUT receives a Parquet dataset with
a card (``load_dataset("OUT")``), an MVTec-layout folder ``OUT/mvtec`` and previews. A rerun with the same
flags, the same model weights and the same data resumes; with other flags, weights or data changed since (or
into a folder of other files) it is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mvtec_caption.command import run_command

COMMAND = "axf synthesize"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, the description's example kept as written."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _HelpFormatter
    parser.add_argument("--model", required=True, help="trained AnomalyXFusion pipeline: folder or Hub id")
    parser.add_argument(
        "--dataset",
        required=True,
        help="MVTec Caption-style dataset: export folder, save_to_disk folder or Hub id",
    )
    parser.add_argument("--config", required=True, help="config of --dataset (ad, loco, or any other name)")
    parser.add_argument(
        "--num-per-defect-type",
        type=int,
        required=True,
        metavar="N",
        help="anomalies to make per defect type",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="output folder (new, or an earlier run to resume)"
    )
    parser.add_argument("--categories", nargs="+", default=None, help="categories to use; None: all")
    parser.add_argument("--defect-types", nargs="+", default=None, help="defect types to use; None: all")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="item k of (category, type) is seeded from (seed, category, type, k)",
    )
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    from .core import add_guidance_arguments, add_padding_mask_crop_argument

    add_guidance_arguments(parser)
    add_padding_mask_crop_argument(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="same-sized images per pipeline call")
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weights and compute"
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="one caption for every item; None: the type's generator-fold captions",
    )
    parser.add_argument("--no-reference", action="store_true", help="no reference defect (texture) condition")
    parser.add_argument(
        "--texture-categories",
        nargs="*",
        default=None,
        metavar="CATEGORY",
        help="categories whose new masks may go anywhere (textures); every other category places them on the "
        "object. None: MVTec AD's carpet, grid, leather, tile, wood; the flag alone: no textures",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_of(
    args: argparse.Namespace,
    categories: list[str],
    defect_types: list[str],
    content: dict | None = None,
    textures: frozenset[str] = frozenset(),
) -> dict:
    """Everything that decides the output's bytes (a resume must match it): the model and the data by
    ``content`` ({flag: fingerprint}), never by path."""
    return {
        "content": content or {},
        "config": args.config,
        "categories": categories,
        "defect_types": defect_types,
        "num_per_defect_type": args.num_per_defect_type,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "reference_guidance_scale": args.reference_guidance_scale,
        "padding_mask_crop": args.padding_mask_crop,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "prompt": args.prompt,
        "reference": not args.no_reference,
        "texture_categories": sorted(textures & set(categories)),
    }


def run(args: argparse.Namespace) -> int:
    from .core import SynthesisError, report_input_error

    try:
        return _run(args)
    except (SynthesisError, FileNotFoundError) as err:
        return report_input_error(COMMAND, err)


def _run(args: argparse.Namespace, pipe=None) -> int:
    """The command's work; ``pipe``: the loaded ``args.model`` (the app passes its own), None loads it."""
    from . import export
    from .core import (
        SynthesisError,
        check_content,
        check_model,
        check_output,
        check_padding_mask_crop,
        claim_output,
        load_pipeline,
        process_state,
        run_items,
    )
    from .fingerprint import dataset_fingerprint, model_fingerprint, publishable_name
    from .plan import mark_fallbacks, plan_items, select, texture_categories_of
    from .source import SourceData

    # 1. Check every input before anything is written (every process, same answer)
    for flag, value in (("--num-per-defect-type", args.num_per_defect_type), ("--batch-size", args.batch_size),
                        ("--steps", args.steps)):  # fmt: skip
        if value < 1:
            raise SynthesisError(f"{flag} must be at least 1, got {value}")
    check_padding_mask_crop(args.padding_mask_crop)
    check_model(args.model)
    local = {"--model": model_fingerprint(args.model)}
    if Path(args.dataset).exists():  # before loading it: datasets would first convert a changed one
        local["--dataset"] = dataset_fingerprint(args.dataset)
    check_content(args.output, local)
    source = SourceData(args.dataset, args.config)
    pairs = select(source, args.categories, args.defect_types)
    textures = texture_categories_of(source, args.texture_categories)
    categories = sorted({c for c, _ in pairs})
    content = {**local, "--dataset": local.get("--dataset") or dataset_fingerprint(args.dataset)}
    settings = settings_of(args, categories, sorted({d for _, d in pairs}), content, textures)
    items = plan_items(
        source, pairs, args.num_per_defect_type, args.seed, args.prompt, not args.no_reference,
        publishable_name(args.model), textures,
    )  # fmt: skip
    check_output(args.output, COMMAND, settings, export.expected_files(source, items, pairs))
    pipe = load_pipeline(args.model, args.dtype) if pipe is None else pipe
    if not args.no_reference and pipe.image_encoder is None:
        raise SynthesisError(
            f"--model {args.model} has no image_encoder for reference defects; pass --no-reference"
        )

    # 2. The main process claims the folder; every process makes its share of the batches
    state = process_state()
    if state.is_main_process:
        claim_output(args.output, COMMAND, settings)
    state.wait_for_everyone()
    summary = run_items(
        pipe, items, args.output, args.batch_size,
        dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
             reference_guidance_scale=args.reference_guidance_scale, padding_mask_crop=args.padding_mask_crop),
        desc=COMMAND, progress=not args.no_progress, state=state,
    )  # fmt: skip
    state.wait_for_everyone()

    # 3. Once every shard is done, the main process writes the dataset, the normals, the card, the previews
    if state.is_main_process:
        missing = [item.image_path for item in items if not (args.output / item.image_path).is_file()]
        if missing:
            raise SynthesisError(f"{len(missing)} items are missing after synthesis, e.g. {missing[0]}")
        fallbacks = mark_fallbacks(args.output, items)
        export.write_normals(args.output, source, categories)
        export.write_parquet(args.output, items)
        export.write_previews(args.output, source, items)
        card_settings = {"model": args.model, "dataset": args.dataset, **settings}
        export.write_card(
            args.output, items, card_settings, {"made": summary.made, "skipped": summary.skipped}
        )
        print(summary.line(COMMAND))
        if fallbacks:
            print(
                f"{COMMAND}: {fallbacks} of {len(items)} masks are a real mask resized (no transformed draw "
                "passed the sampler's limits); the mask_fallback column marks them"
            )
        print(
            f'wrote {len(items)} anomalies to {args.output}: load_dataset("{args.output}"), {args.output / "mvtec"}'
        )
    state.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("python -m axf_pipeline.synthesize", __doc__, add_arguments, run, argv)
