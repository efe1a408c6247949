"""The Gradio page: Synthesize, Dataset and Batch tabs over :mod:`.logic`.

Every callback goes through :func:`shown`, so bad input (and any failure) becomes one readable line in the
page instead of a traceback, and the server keeps serving.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

import gradio as gr

from .logic import (
    AppError,
    Browser,
    Session,
    batch_args,
    editor_value,
    example,
    normal_rows,
    normals,
    one_line,
    picked_normal,
    picked_reference,
    reference_rows,
    references,
    run_batch,
    supports_reference_guidance,
    synthesize,
)

logger = logging.getLogger(__name__)

TITLE = "AnomalyXFusion: synthesise industrial anomalies"
INTRO = (
    "Put a defect where you point, described in your words, like a reference you pick. "
    "The result equals the input outside the mask, pixel for pixel."
)

# small images (a 32-pixel toy set, a crop) fill their panel, pixels kept sharp
CSS = ".scaled img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def error(message: str) -> str:
    return f"**Error:** {message}"


def shown(n_outputs: int):
    """Wraps a callback returning ``n_outputs`` values whose last is a Markdown message: an exception becomes
    that message (``gr.update()`` for the other outputs), logged with its traceback on the server only."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # the page shows one line; the log keeps the traceback
                if not isinstance(err, AppError):
                    logger.exception("%s failed", fn.__name__)
                return (*[gr.update()] * (n_outputs - 1), error(one_line(err)))

        return inner

    return wrap


def build_app(session: Session) -> gr.Blocks:
    """The page for ``session`` (its model and dataset may be replaced from the page): the panels first, then
    the events that join them."""
    with gr.Blocks(title="AnomalyXFusion") as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        loader = model_panel(session)
        with gr.Tab("Synthesize"):
            synth = synthesize_tab(session)
        with gr.Tab("Dataset"):
            browse = dataset_tab(session)
        with gr.Tab("Batch"):
            batch = batch_tab()
        categories = wire_loading(session, loader, synth, browse, batch)
        wire_synthesize(session, synth)
        wire_dataset(browse)
        wire_batch(session, batch)
        app.load(
            lambda: (*categories(), session.status()),
            None,
            [synth.category, batch.category, loader.message],
        )
    return app


# ---------------------------------------------------------------------------------------------------- panels
def components(scope: dict) -> SimpleNamespace:
    """A panel's components by their variable names, which is how the event wiring below refers to them."""
    return SimpleNamespace(**{k: v for k, v in scope.items() if isinstance(v, gr.components.Component)})


def model_panel(session: Session) -> SimpleNamespace:
    """Model and dataset boxes with a Load button (open while no model is loaded)."""
    with gr.Accordion("Model and dataset", open=session.pipe is None):
        with gr.Row():
            model = gr.Textbox(session.model or "", label="Model (pipeline folder or Hub id)", scale=3)
            dataset = gr.Textbox(
                session.dataset or "", label="Dataset (MVTec Caption export or Hub id; optional)", scale=3
            )
            config = gr.Textbox(session.config or "", label="Config", scale=1)
            button = gr.Button("Load", scale=1)
        message = gr.Markdown(session.status(), elem_id="load-message")
    return components(locals())


def synthesize_tab(session: Session) -> SimpleNamespace:
    """One anomaly: a normal image, a painted or uploaded mask, a caption and an optional reference defect."""
    has_ref_guidance = session.pipe is not None and supports_reference_guidance(session.pipe)
    with gr.Row():
        with gr.Column(scale=3):
            editor = gr.ImageEditor(
                label="Normal image: upload or pick one below, then paint where the defect goes",
                type="pil", format="png", image_mode="RGBA", sources=("upload", "clipboard"),
                brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"), elem_id="editor",
            )  # fmt: skip
            mask_upload = gr.Image(
                label="... or upload a mask (white = defect; replaces the drawing)",
                type="pil", image_mode="L", format="png", height=160, elem_id="mask-upload",
            )  # fmt: skip
            caption = gr.Textbox(label="Caption: the defect in words", lines=2, elem_id="caption")
        with gr.Column(scale=2):
            category = gr.Dropdown(label="Category (dataset)", choices=[], allow_custom_value=False)
            example_button = gr.Button("Load an example", elem_id="example-button")
            normals_gallery = gr.Gallery(
                label="Train normals: click to use", columns=6, height=160, elem_id="normals"
            )
            references_gallery = gr.Gallery(
                label="Reference defects (generator fold): click to use", columns=6, height=200
            )
            with gr.Row():
                reference = gr.Image(label="Reference defect (optional)", type="pil", height=140)
                reference_mask = gr.Image(
                    label="Its mask (optional)", type="pil", image_mode="L", format="png", height=140
                )
            clear_reference = gr.Button("No reference", size="sm")
    with gr.Row():
        steps = gr.Slider(1, 100, value=30, step=1, label="Steps", elem_id="steps")
        guidance = gr.Slider(0, 15, value=4.0, step=0.5, label="Guidance (text)")
        reference_guidance = gr.Slider(
            0, 15, value=4.0, step=0.5,
            label="Reference guidance" + ("" if has_ref_guidance else " (this model: equal to text guidance)"),
        )  # fmt: skip
        seed = gr.Number(0, label="Seed", precision=0)
    generate = gr.Button("Generate", variant="primary", elem_id="generate")
    message = gr.Markdown(elem_id="synth-message")
    with gr.Row():
        shown_as = dict(type="pil", format="png", interactive=False, height=256, elem_classes="scaled")
        out_normal = gr.Image(label="Normal", **shown_as)
        out_mask = gr.Image(label="Mask", **shown_as)
        out_result = gr.Image(label="Result", elem_id="result", **shown_as)
    with gr.Row():
        outside = gr.Number(label="Largest change outside the mask (0 = kept exactly)", interactive=False)
        downloads = gr.File(label="Download image and mask (PNG)", file_count="multiple")
    return components(locals())


def dataset_tab(session: Session) -> SimpleNamespace:
    """A browser over a dataset export, a synthesis output or a Hub id: images with their mask overlays."""
    with gr.Row():
        path = gr.Textbox(
            session.dataset or "", label="MVTec Caption export, `axf synthesize` output or Hub id", scale=3
        )
        config = gr.Textbox(session.config or "", label="Config (empty: default)", scale=1)
        button = gr.Button("Open", scale=1)
    with gr.Row():
        category = gr.Dropdown(label="Category", choices=[])
        group = gr.Dropdown(label="Split / defect type", choices=[])
    gallery = gr.Gallery(label="Images", columns=8, height=220)
    with gr.Row():
        image = gr.Image(label="Image", interactive=False, height=256, elem_classes="scaled")
        overlay = gr.Image(label="Mask overlay", interactive=False, height=256, elem_classes="scaled")
        info = gr.Markdown()
    message = gr.Markdown(elem_id="browse-message")
    browser = gr.State(None)
    shown_rows = gr.State([])
    return components(locals())


def batch_tab() -> SimpleNamespace:
    """``axf synthesize`` for one category of the loaded dataset, with progress and previews."""
    gr.Markdown(
        "Runs `axf synthesize` for one category (and defect type, or all) of the loaded dataset: "
        "N anomalies per type, written as a dataset and an MVTec-layout folder. Rerunning into the "
        "same folder with the same settings resumes."
    )
    with gr.Row():
        category = gr.Dropdown(label="Category", choices=[])
        defect_type = gr.Dropdown(label="Defect type (empty: all)", choices=[], allow_custom_value=True)
        n = gr.Number(4, label="N per defect type", precision=0)
    with gr.Row():
        output = gr.Textbox("outputs/app/batch", label="Output folder")
        size = gr.Number(8, label="Batch size", precision=0)
        use_reference = gr.Checkbox(True, label="Reference defects")
    with gr.Row():
        steps = gr.Slider(1, 100, value=30, step=1, label="Steps")
        guidance = gr.Slider(0, 15, value=4.0, step=0.5, label="Guidance")
        seed = gr.Number(0, label="Seed", precision=0)
    button = gr.Button("Run", variant="primary")
    progress = gr.Markdown()
    gallery = gr.Gallery(label="Made so far", columns=8, height=260)
    message = gr.Markdown()
    return components(locals())


# ---------------------------------------------------------------------------------------------------- events
def wire_loading(session: Session, loader, synth, browse, batch):
    """Load a model and dataset from the page; returns the callback that fills both category lists."""

    def categories_update():
        choices = session.source.categories if session.source is not None else []
        first = choices[0] if choices else None
        return [gr.update(choices=choices, value=first) for _ in range(2)]

    @shown(4)
    def on_load(model, dataset, config):
        status = session.load(model, dataset, config)
        return (*categories_update(), gr.update(value=dataset), status)

    loader.button.click(
        on_load,
        [loader.model, loader.dataset, loader.config],
        [synth.category, batch.category, browse.path, loader.message],
    )
    return categories_update


def wire_synthesize(session: Session, ui):
    """The Synthesize tab: pick a normal, a reference or an example, then generate."""

    @shown(3)
    def on_category(name):
        if session.source is None:
            return [], [], ""
        return normals(session, name), references(session, name), ""

    ui.category.change(on_category, ui.category, [ui.normals_gallery, ui.references_gallery, ui.message])

    @shown(2)
    def on_pick_normal(name, evt: gr.SelectData):
        return editor_value(picked_normal(session, normal_rows(session, name)[evt.index])), ""

    ui.normals_gallery.select(on_pick_normal, ui.category, [ui.editor, ui.message])

    @shown(4)
    def on_pick_reference(name, current_caption, evt: gr.SelectData):
        row = reference_rows(session, name)[evt.index]
        return (*picked_reference(session, row), current_caption or session.source.caption(row), "")

    ui.references_gallery.select(
        on_pick_reference,
        [ui.category, ui.caption],
        [ui.reference, ui.reference_mask, ui.caption, ui.message],
    )
    ui.clear_reference.click(lambda: (None, None), None, [ui.reference, ui.reference_mask])

    @shown(6)
    def on_example(name):
        ex = example(session, name)
        editor_file, mask_file, reference_file, reference_mask_file = ex.files(session)
        return editor_file, mask_file, ex.caption, reference_file, reference_mask_file, ""

    ui.example_button.click(
        on_example,
        ui.category,
        [ui.editor, ui.mask_upload, ui.caption, ui.reference, ui.reference_mask, ui.message],
    )

    @shown(6)
    def on_generate(editor_value, mask, text, ref, ref_mask, n_steps, scale, ref_scale, seed_value):
        out = synthesize(
            session, editor_value, mask, text, ref, ref_mask, n_steps, scale, ref_scale, seed_value
        )
        files = [str(out.image_file), str(out.mask_file)]
        done = f"Done: largest change outside the mask = {out.outside_change}."
        shown_files = (str(out.normal_file), str(out.mask_file), str(out.image_file))
        return (*shown_files, out.outside_change, files, done)

    ui.generate.click(
        on_generate,
        [ui.editor, ui.mask_upload, ui.caption, ui.reference, ui.reference_mask,
         ui.steps, ui.guidance, ui.reference_guidance, ui.seed],
        [ui.out_normal, ui.out_mask, ui.out_result, ui.outside, ui.downloads, ui.message],
        api_name="synthesize",
    )  # fmt: skip


def wire_dataset(ui):
    """The Dataset tab: open, pick a category and a group, click an image for its mask overlay."""

    @shown(4)
    def on_open(path, config):
        opened = Browser(path, config)
        choices = opened.categories()
        return opened, gr.update(choices=choices, value=choices[0] if choices else None), [], ""

    ui.button.click(on_open, [ui.path, ui.config], [ui.browser, ui.category, ui.shown_rows, ui.message])

    @shown(2)
    def on_category(opened, name):
        groups = opened.groups(name) if opened else []
        return gr.update(choices=groups, value=groups[0] if groups else None), ""

    ui.category.change(on_category, [ui.browser, ui.category], [ui.group, ui.message])

    @shown(3)
    def on_group(opened, name, group):
        if not opened:
            return [], [], ""
        return opened.thumbnails(name, group), opened.items(name, group), ""

    ui.group.change(on_group, [ui.browser, ui.category, ui.group], [ui.gallery, ui.shown_rows, ui.message])

    @shown(4)
    def on_select(opened, rows, evt: gr.SelectData):
        k = rows[evt.index]
        image, overlaid, info = opened.detail(k)
        files = [
            opened.pictures.path(f"{name}-{k}", lambda p=p: p)
            for name, p in (("image", image), ("overlay", overlaid))
        ]
        return (*files, info, "")

    ui.gallery.select(on_select, [ui.browser, ui.shown_rows], [ui.image, ui.overlay, ui.info, ui.message])


def wire_batch(session: Session, ui):
    """The Batch tab: a generator callback, so progress and previews stream while the run goes on."""

    @shown(2)
    def on_category(name):
        types = sorted(session.source.all_types.get(name, ())) if session.source is not None else []
        return gr.update(choices=[""] + types, value=""), ""

    ui.category.change(on_category, ui.category, [ui.defect_type, ui.message])

    def on_batch(
        name, defect, n, output, size, use_ref, n_steps, scale, seed_value,
        progress=gr.Progress(),  # noqa: B008 (how Gradio injects a progress bar)
    ):  # fmt: skip
        previews = []
        try:
            args = batch_args(
                session, output, name, defect or None, n, n_steps, scale, seed_value, size, use_ref
            )
            for done, total, new in run_batch(session, args):
                previews += [str(p) for p in new]
                progress(done / max(total, 1), desc=f"{done}/{total}")
                yield f"{done} / {total} made", previews[-48:], ""
            yield (
                f"{done} / {total} made",
                previews[-48:],
                f"Finished: `{args.output}` (dataset + `mvtec/`)",
            )
        except Exception as err:
            if not isinstance(err, AppError):
                logger.exception("batch failed")
            yield gr.update(), previews[-48:], error(one_line(err))

    ui.button.click(
        on_batch,
        [ui.category, ui.defect_type, ui.n, ui.output, ui.size, ui.use_reference,
         ui.steps, ui.guidance, ui.seed],
        [ui.progress, ui.gallery, ui.message],
    )  # fmt: skip


def launch(session: Session, **kwargs):
    """Builds the page and serves it (``kwargs`` go to ``Blocks.launch``); returns the running Blocks."""
    app = build_app(session).queue()
    app.launch(css=CSS, **kwargs)
    return app
