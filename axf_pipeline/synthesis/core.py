"""The one synthesis core under `axf synthesize` and `axf generate`.

A front-end turns its input into :class:`Item` s (where the result goes, its seed, its image size and a
``prepare`` callable loading the normal image, the mask, the prompt and the reference). The core then

1. groups items of the same image size into batches of ``batch_size`` (in item order, so a batch does not
   depend on how many processes run, which keeps the floating point work, and the bytes, identical);
2. hands whole batches to processes with accelerate's ``split_between_processes``;
3. skips a batch whose items are all finished (image and mask both in place), otherwise runs it as one
   pipeline call with one ``torch.Generator`` per item seeded by the item alone;
4. writes each mask, then its image, to a temporary name and renames it into place, so a killed run
   leaves finished items or nothing, never a half-written file under a final name.

Output folders are claimed with a marker file holding the settings, which name no path: the model, the
data and the inputs are recorded by content (``settings["content"]``: {flag: fingerprint}, see
:mod:`.fingerprint`). A rerun with the same settings and contents resumes; anything else (other settings,
weights or data changed in place, files this command would not write) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image

from mvtec_caption._io import TMP_TAG, atomic_write

from ..model_index import read_model_index

__all__ = [
    "MARKER",
    "Item",
    "Prepared",
    "Summary",
    "SynthesisError",
    "atomic_write",
    "add_guidance_arguments",
    "add_padding_mask_crop_argument",
    "check_output",
    "check_padding_mask_crop",
    "claim_output",
    "is_finished",
    "check_model",
    "image_size",
    "item_seed",
    "load_pipeline",
    "process_state",
    "plan_batches",
    "run_items",
]

MARKER = ".axf-synthesis.json"
_TMP = TMP_TAG


class SynthesisError(ValueError):
    """Bad input for synthesis; the message (one line) names the file, argument, category or type."""


def report_input_error(command: str, err: Exception) -> int:
    """A command-line refusal: the message on one line of stderr, exit code 2 (both front-ends)."""
    print(f"{command}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


@dataclass
class Prepared:
    """What one pipeline input needs, loaded only when its batch runs."""

    image: PIL.Image.Image
    mask: PIL.Image.Image  # mode "L", 0/255: written as the item's mask
    prompt: str | None
    reference: PIL.Image.Image | None = None
    reference_mask: PIL.Image.Image | None = None


@dataclass
class Item:
    """One result to make: ``image_path``/``mask_path`` relative to the output folder."""

    image_path: str
    mask_path: str
    seed: int
    size: tuple[int, int]  # (width, height) of the input image: the batching key
    prepare: Callable[[], Prepared]
    record: dict = field(default_factory=dict)  # provenance, for the front-end's metadata
    context: dict = field(default_factory=dict)  # the front-end's own bookkeeping, never written


@dataclass
class Summary:
    made: int
    skipped: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.made / self.seconds if self.seconds > 0 else 0.0

    def line(self, command: str) -> str:
        return (
            f"{command}: made {self.made}, skipped {self.skipped} (already finished), "
            f"{self.seconds:.1f} s, {self.images_per_second:.2f} images/s"
        )


def item_seed(seed: int, *keys) -> int:
    """A 63-bit seed from ``seed`` and the item's identity alone (not its position in any batch)."""
    text = "/".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def plan_batches(items: Sequence[Item], batch_size: int) -> list[list[int]]:
    """Indices of same-sized items in batches of at most ``batch_size``, in item order."""
    if batch_size < 1:
        raise SynthesisError(f"--batch-size must be at least 1, got {batch_size}")
    open_batches: dict[tuple[int, int], list[int]] = {}
    batches: list[list[int]] = []
    for i, item in enumerate(items):
        batch = open_batches.setdefault(tuple(item.size), [])
        batch.append(i)
        if len(batch) == batch_size:
            batches.append(open_batches.pop(tuple(item.size)))
    batches.extend(open_batches.values())
    return batches


# ------------------------------------------------------------------ inputs
def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, or an error naming the file."""
    try:
        with PIL.Image.open(path) as image:
            return image.size
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise SynthesisError(f"cannot read image {path}: {type(err).__name__}") from None


def check_model(model: str) -> None:
    """The model must be an AnomalyXFusion pipeline (its model_index.json lists ``mif``), checked
    before anything is written; a Hub id is checked through its model_index.json."""
    components = read_model_index(model, "--model", SynthesisError)
    if components.get("mif") in (None, [None, None]):
        raise SynthesisError(
            f"--model {model} is not an AnomalyXFusion pipeline: its model_index.json has no mif "
            "component (a plain Stable Diffusion checkpoint?); train one with train.py first"
        )


def process_state():
    """accelerate's ``PartialState``; ``ACCELERATE_USE_CPU=1`` (as ``accelerate launch --cpu`` sets it) makes
    several launched processes one gloo group on CPUs, as ``Accelerator`` does."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def load_pipeline(model: str, dtype: str = "float32", device: str | None = None, lora: str | None = None):
    """The pipeline on this process's device (accelerate's), progress bar off (the core shows its own)."""
    import torch

    from ..pipeline_anomaly_x_fusion import AnomalyXFusionPipeline

    pipe = AnomalyXFusionPipeline.from_pretrained(model, dtype=getattr(torch, dtype))
    pipe = pipe.to(device or process_state().device)
    if lora:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------ files
def save_png(image: PIL.Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def is_finished(output: Path, item: Item) -> bool:
    return (output / item.mask_path).is_file() and (output / item.image_path).is_file()


def _is_ours_tmp(path: Path) -> bool:
    return path.name.startswith(".") and _TMP in path.name


def check_content(output: Path, content: dict) -> None:
    """Refuse to resume ``output`` when the content of a model or dataset it was made from changed: checked
    from the fingerprints in ``content`` alone, before the dataset is even loaded. A missing or unreadable
    record, and fingerprints not given here, are left to :func:`check_output`."""
    try:
        recorded = json.loads((output / MARKER).read_text())
    except (OSError, ValueError):
        return
    then = (recorded.get("settings") or {}).get("content") or {}
    _compare_content(output, {k: then[k] for k in content if k in then}, content)


def _compare_content(output: Path, then: dict, now: dict) -> None:
    for what in sorted(set(then) | set(now)):
        if then.get(what) != now.get(what):
            raise SynthesisError(
                f"Refusing to resume {output}: the content of {what} changed since it was made "
                f"({_short(then.get(what))} then, {_short(now.get(what))} now); rerun with the same "
                f"{what} or choose another --output"
            )


def check_output(output: Path, command: str, settings: dict, expected: Iterable[str]) -> None:
    """Refuse an output folder holding files this command (with these settings) would not write."""
    if output.exists() and not output.is_dir():
        raise SynthesisError(f"--output {output} is a file, not a folder")
    if not output.exists() or not any(output.iterdir()):
        return
    marker = output / MARKER
    if not marker.is_file():
        first = sorted(p.name for p in output.iterdir())[0]
        raise SynthesisError(
            f"Refusing to write into {output}: it holds {first}, which `{command}` did not write "
            f"(no {MARKER}); choose an empty or new --output"
        )
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise SynthesisError(f"Refusing to write into {output}: {marker} is unreadable ({err})") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("settings", {}), dict):
        raise SynthesisError(f"Refusing to write into {output}: {marker} is not a marker this command wrote")
    if recorded.get("command") != command:
        raise SynthesisError(
            f"Refusing to write into {output}: it was written by `{recorded.get('command')}`, not `{command}`"
        )
    old = recorded.get("settings", {})
    _compare_content(output, old.get("content") or {}, settings.get("content") or {})
    if changed := sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k)):
        name = changed[0]
        raise SynthesisError(
            f"Refusing to resume {output}: it was made with {name}={old.get(name)!r}, this run has "
            f"{name}={settings.get(name)!r}; rerun with the same settings or choose another --output"
        )
    expected = set(expected) | {MARKER}
    for path in sorted(output.rglob("*")):
        rel = path.relative_to(output).as_posix()
        if path.is_file() and rel not in expected and not _is_ours_tmp(path):
            raise SynthesisError(
                f"Refusing to write into {output}: it holds {rel}, which this run would not write "
                "(an earlier run with other inputs, or a file of yours); choose another --output"
            )


def _short(fingerprint: str | None) -> str:
    if fingerprint is None:
        return "none recorded"
    kind, _, value = fingerprint.partition(":")
    return f"{kind}:{value[:12]}" if kind == "sha256" else fingerprint


def claim_output(output: Path, command: str, settings: dict) -> None:
    """Write the marker (resuming keeps it) and remove temporary files a killed run of ours left."""
    output.mkdir(parents=True, exist_ok=True)
    for path in output.rglob(f".*{_TMP}*"):
        if path.is_file():
            path.unlink()
    text = json.dumps({"command": command, "settings": settings}, indent=1, sort_keys=True)
    atomic_write(output / MARKER, lambda tmp: tmp.write_text(text))


# ------------------------------------------------------------------ running
def call_pipeline(pipe, prepared: list[Prepared], items: list[Item], call_kwargs: dict):
    """One pipeline call for a batch: lists of images, masks, prompts, references, one generator per item."""
    import torch

    references = [p.reference for p in prepared]
    if any(r is None for r in references) and not all(r is None for r in references):
        raise SynthesisError("a batch mixes items with and without a reference defect")
    with_reference = references[0] is not None
    prompts = [p.prompt for p in prepared]
    return pipe(
        prompt=None if all(p is None for p in prompts) else prompts,
        image=[p.image for p in prepared],
        mask_image=[p.mask for p in prepared],
        reference_image=references if with_reference else None,
        reference_mask=[p.reference_mask for p in prepared] if with_reference else None,
        generator=[torch.Generator(device="cpu").manual_seed(item.seed) for item in items],
        **call_kwargs,
    ).images


def run_items(
    pipe,
    items: Sequence[Item],
    output: str | os.PathLike,
    batch_size: int,
    call_kwargs: dict,
    desc: str = "synthesis",
    progress: bool = True,
    state=None,
) -> Summary:
    """Make every unfinished item (this process's share of the batches); returns the summary over all
    processes. ``call_kwargs`` go to every pipeline call (steps, guidance, padding_mask_crop ...)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = state or process_state()
    output = Path(output)
    start = time.perf_counter()
    made = skipped = 0
    batches = plan_batches(items, batch_size)
    with state.split_between_processes(batches) as mine:
        mine = list(mine)
    label = f"{desc} [process {state.process_index}]" if state.num_processes > 1 else desc
    with tqdm(
        total=sum(len(b) for b in mine), desc=label, unit="image", position=state.process_index,
        disable=not progress,
    ) as bar:  # fmt: skip
        for batch in mine:
            chosen = [items[i] for i in batch]
            todo = [not is_finished(output, item) for item in chosen]
            if any(todo):
                prepared = [item.prepare() for item in chosen]
                images = call_pipeline(pipe, prepared, chosen, call_kwargs)
                for item, inputs, image, needed in zip(chosen, prepared, images, todo, strict=True):
                    if needed:
                        # the mask first: an image on disk means its mask is there too
                        save_png(inputs.mask, output / item.mask_path)
                        save_png(image, output / item.image_path)
            made += sum(todo)
            skipped += len(todo) - sum(todo)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    counts = (
        gather_object([(made, skipped, seconds)]) if state.num_processes > 1 else [(made, skipped, seconds)]
    )
    return Summary(sum(c[0] for c in counts), sum(c[1] for c in counts), max(c[2] for c in counts))


def add_padding_mask_crop_argument(parser) -> None:
    """``--padding-mask-crop``, the same for ``axf synthesize`` and ``axf generate``: by default the pipeline's
    own (:data:`~axf_pipeline.image_processing.DEFAULT_PADDING_MASK_CROP`, the training scale)."""
    from ..image_processing import DEFAULT_PADDING_MASK_CROP

    parser.add_argument(
        "--padding-mask-crop",
        type=int,
        default=DEFAULT_PADDING_MASK_CROP,
        metavar="N",
        help="generate diffusers' box around the mask padded by N pixels, resized to the model's size; "
        "default (None): the window training crops show a defect in, at native scale (the training scale)",
    )


def check_padding_mask_crop(value: int | None) -> None:
    if value is not None and value < 0:
        raise SynthesisError(f"--padding-mask-crop must be at least 0 (or left out), got {value}")


def add_guidance_arguments(parser) -> None:
    """``--guidance-scale`` and ``--reference-guidance-scale``, the same for ``axf synthesize`` and ``axf generate``."""
    parser.add_argument(
        "--guidance-scale", type=float, default=7.5, help="the text's guidance weight (<= 1: none)"
    )
    parser.add_argument(
        "--reference-guidance-scale",
        type=float,
        default=None,
        help="the reference's weight in two-condition guidance; default: --guidance-scale (plain CFG, 2 UNet passes; a different value costs a third)",
    )
