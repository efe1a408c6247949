"""What the app's buttons do, without Gradio: loading the model and dataset, one synthesis, the dataset
browser and the batch run. The page (:mod:`.ui`) only wires components to these and shows
:class:`AppError` messages, so every rule here is testable without a server.
"""

from __future__ import annotations

import inspect
import io
import logging
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image

logger = logging.getLogger(__name__)

DEMO_DIR = Path("outputs/demo")
DEMO_MODEL = DEMO_DIR / "runs" / "all_AnomalyXFusion"  # the demo's main model (axf_pipeline/demo/run.py)
DEMO_DATASET = DEMO_DIR / "mvtec_caption"  # its exported toy MVTec Caption set, config "ad"
DEMO_HINT = (
    "no --model given and no demo outputs in outputs/demo: make them with `bash scripts/demo.sh`, "
    "or pass --model DIR_OR_HUB_ID [--dataset DIR_OR_HUB_ID]"
)
MAX_THUMBNAILS = 60
THUMBNAIL = (192, 192)  # gallery pictures are sent small; a click loads the full image
PROVENANCE = ("source_image", "reference", "mask_source", "seed", "model")


class AppError(ValueError):
    """Bad input from the page; the message is shown there as it is (one line)."""


def one_line(err: BaseException) -> str:
    """An exception as the one line the page shows (no traceback)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return (
        text
        if isinstance(err, (AppError, ValueError, FileNotFoundError))
        else f"{type(err).__name__}: {text}"
    )


def demo_defaults(root: str | Path = ".") -> tuple[str, str] | None:
    """(model, dataset) of a finished demo run under ``root``, or None."""
    model, dataset = Path(root) / DEMO_MODEL, Path(root) / DEMO_DATASET
    if (model / "model_index.json").is_file() and dataset.is_dir():
        return str(model), str(dataset)
    return None


class Pictures:
    """PNG files of the pictures the page shows, each written once (atomically) and then reused.

    Gradio serves a file it is given as it is, but re-encodes a PIL image into its cache on every event, in
    place: a browser fetching the same picture meanwhile can get a truncated file."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="axf-app-"))

    def path(self, key: str, make) -> str:
        """The file of ``key``, made by ``make()`` (a PIL image) the first time."""
        from ..synthesis.core import save_png

        path = self.folder / f"{key}.png"
        if not path.is_file():
            save_png(make(), path)
        return str(path)


# ------------------------------------------------------------------ model and dataset
@dataclass
class Session:
    """The model and dataset the page works on (one per server; Gradio queues the heavy events)."""

    model: str | None = None
    dataset: str | None = None
    config: str | None = "ad"
    pipe: object | None = None
    source: object | None = None  # synthesis.source.SourceData of ``dataset``
    pictures: Pictures = field(default_factory=Pictures, repr=False)  # of this dataset
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self, model: str | None, dataset: str | None = None, config: str | None = "ad") -> str:
        """Load what changed; on a bad model or dataset the previous ones stay and AppError says why."""
        from ..synthesis.core import SynthesisError, check_model, load_pipeline
        from ..synthesis.source import SourceData

        model, dataset, config = (
            (model or "").strip(),
            (dataset or "").strip(),
            (config or "").strip() or None,
        )
        if not model:
            raise AppError("no model: give a saved AnomalyXFusion pipeline folder or a Hub id")
        try:
            if model != self.model or self.pipe is None:
                check_model(model)
                with self.lock:
                    self.pipe, self.model = load_pipeline(model), model
            if dataset and (dataset != self.dataset or config != self.config or self.source is None):
                self.source, self.dataset, self.config = SourceData(dataset, config), dataset, config
                self.pictures = Pictures()
            elif not dataset:
                self.source, self.dataset = None, None
        except SynthesisError as err:
            raise AppError(one_line(err)) from None
        return self.status()

    def status(self) -> str:
        if self.pipe is None:
            return "No model loaded."
        data = f"dataset `{self.dataset}` ({self.config})" if self.source is not None else "no dataset"
        return f"Model `{self.model or 'in memory'}`, {data}."

    def require_pipe(self):
        if self.pipe is None:
            raise AppError("no model loaded: enter a pipeline folder or Hub id above and press Load")
        return self.pipe

    def require_source(self):
        if self.source is None:
            raise AppError("no dataset loaded: enter an MVTec Caption export or Hub id above and press Load")
        return self.source

    @property
    def uses_text(self) -> bool:
        return bool(self.require_pipe().use_text)


# ------------------------------------------------------------------ inputs of one synthesis
def thumbnail(image: PIL.Image.Image) -> PIL.Image.Image:
    small = image.copy()
    small.thumbnail(THUMBNAIL)
    return small


def _as_pil(value, mode: str | None = None) -> PIL.Image.Image | None:
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        value = PIL.Image.open(value)
    elif isinstance(value, np.ndarray):
        value = PIL.Image.fromarray(value)
    return value.convert(mode) if mode else value


def normal_from_editor(editor) -> PIL.Image.Image | None:
    """The image under the drawing (the editor's background), RGB."""
    if not editor:
        return None
    if isinstance(editor, dict):
        return _as_pil(editor.get("background"), "RGB")
    return _as_pil(editor, "RGB")


def mask_from_editor(editor) -> PIL.Image.Image | None:
    """Every painted pixel of every editor layer (alpha > 0) as a 0/255 mask; None when nothing is drawn."""
    if not isinstance(editor, dict) or not editor.get("layers"):
        return None
    painted = None
    for layer in editor["layers"]:
        layer = _as_pil(layer)
        alpha = np.asarray(layer.getchannel("A") if "A" in layer.getbands() else layer.convert("L")) > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return None
    return PIL.Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), mode="L")


def binary_mask(mask: PIL.Image.Image) -> PIL.Image.Image:
    """The pipeline's rule: every non-zero pixel is defect."""
    array = np.asarray(mask.convert("L")) > 0
    return PIL.Image.fromarray(np.where(array, 255, 0).astype(np.uint8), mode="L")


def choose_mask(editor, uploaded, size: tuple[int, int]) -> PIL.Image.Image:
    """An uploaded mask wins over the drawing; either must cover something and match the image size."""
    if uploaded is not None:
        mask, what = binary_mask(_as_pil(uploaded)), "the uploaded mask"
    else:
        mask, what = mask_from_editor(editor), "the drawn mask"
        if mask is None:
            raise AppError("no mask: draw where the defect goes on the image, or upload a mask")
    if mask.size != size:
        raise AppError(
            f"{what} is {mask.width}x{mask.height} but the normal image is {size[0]}x{size[1]}: "
            "use a mask of the image's size"
        )
    if not np.asarray(mask).any():
        raise AppError(f"{what} is empty: mark where the defect goes")
    return mask


def supports_reference_guidance(pipe) -> bool:
    """Whether this pipeline's ``__call__`` takes ``reference_guidance_scale`` (a separate reference weight)."""
    return "reference_guidance_scale" in inspect.signature(pipe.__call__).parameters


@dataclass
class Synthesis:
    normal: PIL.Image.Image
    mask: PIL.Image.Image
    result: PIL.Image.Image
    outside_change: int  # largest absolute pixel change outside the mask: 0 = background kept exactly
    image_file: Path
    mask_file: Path
    normal_file: Path  # what the page shows beside them


def synthesize(
    session: Session,
    editor,
    mask_upload=None,
    caption: str | None = "",
    reference=None,
    reference_mask=None,
    steps: int = 30,
    guidance: float = 4.0,
    reference_guidance: float | None = None,
    seed: int = 0,
) -> Synthesis:
    """One anomaly: checks every input first (AppError names what is wrong), then one pipeline call."""
    import torch

    from ..demo.measure import outside_mask_change

    pipe = session.require_pipe()
    normal = normal_from_editor(editor)
    if normal is None:
        raise AppError("no normal image: upload one or pick one from the dataset")
    mask = choose_mask(editor, mask_upload, normal.size)
    caption = (caption or "").strip()
    reference, reference_mask = _as_pil(reference, "RGB"), _as_pil(reference_mask)
    if reference_mask is not None and reference is None:
        raise AppError("a reference mask without a reference image: upload the image too, or clear the mask")
    if reference is not None and pipe.image_encoder is None:
        raise AppError("this model has no image encoder, so it takes no reference defect: choose none")
    if reference_mask is not None:
        reference_mask = binary_mask(reference_mask)
        if reference_mask.size != reference.size:
            raise AppError(
                f"the reference mask is {reference_mask.width}x{reference_mask.height} but the reference "
                f"image is {reference.width}x{reference.height}"
            )
    if not caption and reference is None and session.uses_text:
        raise AppError("empty caption and no reference: describe the defect, or choose a reference defect")
    if int(steps) < 1:
        raise AppError(f"steps must be at least 1, got {steps}")
    kwargs = dict(num_inference_steps=int(steps), guidance_scale=float(guidance))
    if reference_guidance is not None and supports_reference_guidance(pipe):
        kwargs["reference_guidance_scale"] = float(reference_guidance)
    with session.lock:
        result = pipe(
            prompt=caption if caption or session.uses_text else None,  # "": no text, the reference leads
            image=normal,
            mask_image=mask,
            reference_image=reference,
            reference_mask=reference_mask if reference is not None else None,
            generator=torch.Generator(device="cpu").manual_seed(int(seed)),
            output_type="pil",
            **kwargs,
        ).images[0]
    change = outside_mask_change(np.asarray(result.convert("RGB")), np.asarray(normal), np.asarray(mask))
    folder = Path(tempfile.mkdtemp(prefix="axf-app-"))
    image_file, mask_file = (
        folder / f"anomaly_seed{int(seed)}.png",
        folder / f"anomaly_seed{int(seed)}_mask.png",
    )
    for picture, path in ((result, image_file), (mask, mask_file), (normal, folder / "normal.png")):
        picture.save(path, format="PNG")
    return Synthesis(normal, mask, result, change, image_file, mask_file, folder / "normal.png")


# ------------------------------------------------------------------ picking from the dataset
def normals(session: Session, category: str | None) -> list[tuple[str, str]]:
    """Train normals of ``category``: (thumbnail file, path in the dataset)."""
    source = session.require_source()
    return [
        (
            session.pictures.path(f"thumb-train-{i}", lambda i=i: thumbnail(source.normal(i))),
            source.path("train", i),
        )
        for i in normal_rows(session, category)
    ]


def normal_rows(session: Session, category: str | None) -> list[int]:
    return session.require_source().normals.get(category or "", [])[:MAX_THUMBNAILS]


def reference_rows(session: Session, category: str | None) -> list[int]:
    """Generator-fold anomalies of ``category`` (every type), the only real defects synthesis may read."""
    source = session.require_source()
    rows = [i for (c, _), found in sorted(source.generator.items()) if c == category for i in found]
    return rows[:MAX_THUMBNAILS]


def references(session: Session, category: str | None) -> list[tuple[str, str]]:
    """Generator-fold anomalies of ``category``: (thumbnail file, "defect type: caption")."""
    source = session.require_source()
    out = []
    for i in reference_rows(session, category):
        row = source.rows["test"][i]
        picture = session.pictures.path(f"thumb-test-{i}", lambda i=i: thumbnail(source.anomaly(i)[0]))
        out.append((picture, f"{row['defect_type']}: {row['caption']}"))
    return out


def picked_normal(session: Session, row: int) -> str:
    """The file of train normal ``row`` (full size)."""
    source = session.require_source()
    return session.pictures.path(f"train-{row}", lambda: source.normal(row))


def picked_reference(session: Session, row: int) -> tuple[str, str]:
    """The files of generator-fold anomaly ``row`` and its mask (full size)."""
    source = session.require_source()
    return (
        session.pictures.path(f"test-{row}", lambda: source.anomaly(row)[0]),
        session.pictures.path(f"test-{row}-mask", lambda: source.anomaly(row)[1]),
    )


def editor_value(image) -> dict:
    """An image editor holding ``image`` with nothing drawn on it."""
    return {"background": image, "layers": [], "composite": image}


@dataclass
class Example:
    editor: dict
    mask: PIL.Image.Image
    caption: str
    reference: PIL.Image.Image
    reference_mask: PIL.Image.Image
    normal_row: int
    reference_row: int

    def files(self, session: Session) -> tuple[dict, str, str, str]:
        """(editor value, mask, reference, reference mask) as the page shows them: files."""
        key = f"example-{self.normal_row}-{self.reference_row}"
        reference, reference_mask = picked_reference(session, self.reference_row)
        editor = editor_value(picked_normal(session, self.normal_row))
        return editor, session.pictures.path(f"{key}-mask", lambda: self.mask), reference, reference_mask


def example(session: Session, category: str | None = None) -> Example:
    """A ready input from the dataset: the category's first train normal, the mask, caption and image of its
    first generator-fold anomaly as location, text and reference (the mask resized if sizes differ)."""
    source = session.require_source()
    category = category or next((c for c in source.categories if source.normals.get(c)), None)
    if not source.normals.get(category or ""):
        raise AppError(f"category {category!r} has no train normals in {source.name}")
    rows = reference_rows(session, category)
    if not rows:
        raise AppError(f"category {category!r} has no generator-fold anomaly in {source.name}")
    normal_row = source.normals[category][0]
    normal = source.normal(normal_row)
    reference, reference_mask = source.anomaly(rows[0])
    mask = binary_mask(reference_mask)
    if mask.size != normal.size:
        mask = mask.resize(normal.size, PIL.Image.NEAREST)
    return Example(
        editor_value(normal), mask, source.caption(rows[0]), reference, reference_mask, normal_row, rows[0]
    )


# ------------------------------------------------------------------ dataset browser
def overlay(image: PIL.Image.Image, mask: PIL.Image.Image | None) -> PIL.Image.Image:
    """The image with the mask's pixels tinted red (half opacity)."""
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    if mask is not None:
        inside = np.asarray(mask.convert("L").resize(image.size, PIL.Image.NEAREST)) > 0
        rgb[inside] = 0.5 * rgb[inside] + 0.5 * np.array([255, 0, 0], np.float32)
    return PIL.Image.fromarray(rgb.round().astype(np.uint8))


def _decode(value, mode: str) -> PIL.Image.Image | None:
    if not value or (value.get("bytes") is None and not value.get("path")):
        return None
    data = value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
    return PIL.Image.open(io.BytesIO(data)).convert(mode)


class Browser:
    """An MVTec Caption export or an `axf synthesize` output indexed by category and defect type."""

    def __init__(self, dataset: str, config: str | None = None):
        import datasets

        from ..synthesis.core import SynthesisError
        from ..synthesis.source import _load

        dataset = (dataset or "").strip()
        if not dataset:
            raise AppError("no dataset: give an MVTec Caption export, an `axf synthesize` output or a Hub id")
        try:
            data = _load(dataset, (config or "").strip() or None)
        except SynthesisError as err:
            raise AppError(one_line(err)) from None
        if isinstance(data, datasets.Dataset):
            data = datasets.DatasetDict({"train": data})
        self.name, self.splits, self.rows = dataset, {}, []
        for split, ds in data.items():
            if missing := [c for c in ("image", "category", "defect_type") if c not in ds.column_names]:
                raise AppError(f"{dataset}: split {split!r} lacks the column(s) {', '.join(missing)}")
            for column in ("image", "mask"):
                if column in ds.column_names:
                    ds = ds.cast_column(column, datasets.Image(decode=False))
            self.splits[split] = ds
            meta = ds.remove_columns([c for c in ("image", "mask") if c in ds.column_names]).to_list()
            self.rows += [(split, i, r) for i, r in enumerate(meta)]
        self.index: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for k, (split, _, row) in enumerate(self.rows):
            defect = row["defect_type"] or ("good" if not row.get("is_anomaly") else "?")
            self.index[row["category"]][f"{split}/{defect}"].append(k)
        self.synthetic = any(name in r for _, _, r in self.rows[:1] for name in PROVENANCE)
        self.pictures = Pictures()

    def categories(self) -> list[str]:
        return sorted(self.index)

    def groups(self, category: str | None) -> list[str]:
        """``split/defect_type`` groups of ``category``."""
        return sorted(self.index.get(category or "", {}))

    def items(self, category: str | None, group: str | None) -> list[int]:
        return self.index.get(category or "", {}).get(group or "", [])[:200]

    def thumbnails(self, category, group) -> list[tuple[str, str]]:
        """(thumbnail file, path in the dataset) of the group's rows."""
        out = []
        for k in self.items(category, group):
            split, i, row = self.rows[k]
            make = lambda split=split, i=i: thumbnail(_decode(self.splits[split][i]["image"], "RGB"))  # noqa: E731
            out.append((self.pictures.path(f"thumb-{k}", make), row.get("path") or f"{split}[{i}]"))
        return out

    def detail(self, k: int) -> tuple[PIL.Image.Image, PIL.Image.Image, str]:
        """(image, mask overlay, a Markdown of caption, fold and provenance) of row ``k``."""
        split, i, row = self.rows[k]
        cells = self.splits[split][i]
        image = _decode(cells["image"], "RGB")
        mask = _decode(cells["mask"], "L") if "mask" in cells else None
        lines = [f"**{row.get('path') or f'{split}[{i}]'}** ({split})"]
        lines.append(f"- caption: {row.get('caption') or '(none)'}")
        for key in ("category", "defect_type", "is_anomaly", "fold", *PROVENANCE):
            if key in row and row[key] not in (None, ""):
                lines.append(f"- {key}: {row[key]}")
        return image, overlay(image, mask), "\n".join(lines)


# ------------------------------------------------------------------ batch (axf synthesize's core)
def batch_args(
    session: Session,
    output: str,
    category: str,
    defect_type: str | None,
    n: int,
    steps: int = 30,
    guidance: float = 4.0,
    seed: int = 0,
    batch_size: int = 8,
    reference: bool = True,
):
    """The `axf synthesize` arguments of a batch (its own parser, so defaults and checks are the command's)."""
    import argparse

    from ..synthesis import cli

    if not (output or "").strip():
        raise AppError("no output folder: give a new folder, or an earlier batch's to resume it")
    if not category:
        raise AppError("no category: load a dataset and choose one")
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    cli.add_arguments(parser)
    argv = [
        "--model", session.model or "", "--dataset", session.dataset or "",
        "--config", session.config or "default", "--output", str(output).strip(),
        "--num-per-defect-type", str(int(n)), "--categories", category, "--steps", str(int(steps)),
        "--guidance-scale", str(float(guidance)), "--seed", str(int(seed)), "--batch-size", str(int(batch_size)),
        "--no-progress", *(["--defect-types", defect_type] if defect_type else []),
        *([] if reference else ["--no-reference"]),
    ]  # fmt: skip
    return parser.parse_args(argv)


def run_batch(session: Session, args, poll_seconds: float = 0.5):
    """Runs `axf synthesize` with the session's pipeline in a thread; yields ``(done, total, new_files)`` as
    items land (a resumed batch counts its finished items at once), then raises AppError if it failed."""
    from ..synthesis import cli
    from ..synthesis.core import SynthesisError

    pipe, source = session.require_pipe(), session.require_source()
    types = (
        [args.defect_types[0]] if args.defect_types else sorted(source.all_types.get(args.categories[0], ()))
    )
    total = args.num_per_defect_type * len(types)
    folders = [Path(args.output) / "mvtec" / args.categories[0] / "test" / t for t in types]
    failure: list[BaseException] = []

    def work():
        try:
            with session.lock:
                cli._run(args, pipe=pipe)
        except BaseException as err:  # shown in the page, logged here
            logger.exception("batch failed")
            failure.append(err)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    seen: set[Path] = set()
    while True:
        alive = thread.is_alive()
        files = sorted(p for f in folders if f.is_dir() for p in f.glob("[0-9]*.png"))
        new = [p for p in files if p not in seen]
        seen.update(new)
        yield len(seen), total, new
        if not alive:
            break
        time.sleep(poll_seconds)
    if failure:
        err = failure[0]
        raise AppError(one_line(err)) if isinstance(err, (SynthesisError, ValueError)) else err
