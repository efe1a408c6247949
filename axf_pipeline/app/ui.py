"""The Gradio page: Synthesize, Dataset and Batch tabs over :mod:`.logic`.

Every callback goes through :func:`shown`, so bad input (and any failure) becomes one readable line in the
page instead of a traceback, and the server keeps serving.
"""

from __future__ import annotations

import functools
import logging

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
    """The page for ``session`` (its model and dataset may be replaced from the page)."""
    has_ref_guidance = session.pipe is not None and supports_reference_guidance(session.pipe)
    with gr.Blocks(title="AnomalyXFusion") as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Accordion("Model and dataset", open=session.pipe is None):
            with gr.Row():
                model_box = gr.Textbox(
                    session.model or "", label="Model (pipeline folder or Hub id)", scale=3
                )
                dataset_box = gr.Textbox(
                    session.dataset or "", label="Dataset (MVTec Caption export or Hub id; optional)", scale=3
                )
                config_box = gr.Textbox(session.config or "", label="Config", scale=1)
                load_button = gr.Button("Load", scale=1)
            load_message = gr.Markdown(session.status(), elem_id="load-message")

        with gr.Tab("Synthesize"):
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
                shown_as = dict(
                    type="pil", format="png", interactive=False, height=256, elem_classes="scaled"
                )
                out_normal = gr.Image(label="Normal", **shown_as)
                out_mask = gr.Image(label="Mask", **shown_as)
                out_result = gr.Image(label="Result", elem_id="result", **shown_as)
            with gr.Row():
                outside = gr.Number(
                    label="Largest change outside the mask (0 = kept exactly)", interactive=False
                )
                downloads = gr.File(label="Download image and mask (PNG)", file_count="multiple")

        with gr.Tab("Dataset"):
            with gr.Row():
                browse_box = gr.Textbox(
                    session.dataset or "",
                    label="MVTec Caption export, `axf synthesize` output or Hub id",
                    scale=3,
                )
                browse_config = gr.Textbox(session.config or "", label="Config (empty: default)", scale=1)
                browse_button = gr.Button("Open", scale=1)
            with gr.Row():
                browse_category = gr.Dropdown(label="Category", choices=[])
                browse_group = gr.Dropdown(label="Split / defect type", choices=[])
            browse_gallery = gr.Gallery(label="Images", columns=8, height=220)
            with gr.Row():
                browse_image = gr.Image(label="Image", interactive=False, height=256, elem_classes="scaled")
                browse_overlay = gr.Image(
                    label="Mask overlay", interactive=False, height=256, elem_classes="scaled"
                )
                browse_info = gr.Markdown()
            browse_message = gr.Markdown(elem_id="browse-message")
            browser = gr.State(None)
            shown_rows = gr.State([])

        with gr.Tab("Batch"):
            gr.Markdown(
                "Runs `axf synthesize` for one category (and defect type, or all) of the loaded dataset: "
                "N anomalies per type, written as a dataset and an MVTec-layout folder. Rerunning into the "
                "same folder with the same settings resumes."
            )
            with gr.Row():
                batch_category = gr.Dropdown(label="Category", choices=[])
                batch_type = gr.Dropdown(
                    label="Defect type (empty: all)", choices=[], allow_custom_value=True
                )
                batch_n = gr.Number(4, label="N per defect type", precision=0)
            with gr.Row():
                batch_output = gr.Textbox("outputs/app/batch", label="Output folder")
                batch_size = gr.Number(8, label="Batch size", precision=0)
                batch_reference = gr.Checkbox(True, label="Reference defects")
            with gr.Row():
                batch_steps = gr.Slider(1, 100, value=30, step=1, label="Steps")
                batch_guidance = gr.Slider(0, 15, value=4.0, step=0.5, label="Guidance")
                batch_seed = gr.Number(0, label="Seed", precision=0)
            batch_button = gr.Button("Run", variant="primary")
            batch_progress = gr.Markdown()
            batch_gallery = gr.Gallery(label="Made so far", columns=8, height=260)
            batch_message = gr.Markdown()

        # ------------------------------------------------------------------ events
        def categories_update():
            choices = session.source.categories if session.source is not None else []
            first = choices[0] if choices else None
            return [gr.update(choices=choices, value=first) for _ in range(2)]

        @shown(4)
        def on_load(model, dataset, config):
            status = session.load(model, dataset, config)
            return (*categories_update(), gr.update(value=dataset), status)

        load_button.click(
            on_load,
            [model_box, dataset_box, config_box],
            [category, batch_category, browse_box, load_message],
        )

        @shown(3)
        def on_category(name):
            if session.source is None:
                return [], [], ""
            return normals(session, name), references(session, name), ""

        category.change(on_category, category, [normals_gallery, references_gallery, message])

        @shown(2)
        def on_pick_normal(name, evt: gr.SelectData):
            return editor_value(picked_normal(session, normal_rows(session, name)[evt.index])), ""

        normals_gallery.select(on_pick_normal, category, [editor, message])

        @shown(4)
        def on_pick_reference(name, current_caption, evt: gr.SelectData):
            row = reference_rows(session, name)[evt.index]
            return (*picked_reference(session, row), current_caption or session.source.caption(row), "")

        references_gallery.select(
            on_pick_reference, [category, caption], [reference, reference_mask, caption, message]
        )
        clear_reference.click(lambda: (None, None), None, [reference, reference_mask])

        @shown(6)
        def on_example(name):
            ex = example(session, name)
            editor_file, mask_file, reference_file, reference_mask_file = ex.files(session)
            return editor_file, mask_file, ex.caption, reference_file, reference_mask_file, ""

        example_button.click(
            on_example, category, [editor, mask_upload, caption, reference, reference_mask, message]
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

        generate.click(
            on_generate,
            [
                editor,
                mask_upload,
                caption,
                reference,
                reference_mask,
                steps,
                guidance,
                reference_guidance,
                seed,
            ],
            [out_normal, out_mask, out_result, outside, downloads, message],
            api_name="synthesize",
        )

        @shown(4)
        def on_open(path, config):
            opened = Browser(path, config)
            choices = opened.categories()
            return opened, gr.update(choices=choices, value=choices[0] if choices else None), [], ""

        browse_button.click(
            on_open, [browse_box, browse_config], [browser, browse_category, shown_rows, browse_message]
        )

        @shown(2)
        def on_browse_category(opened, name):
            groups = opened.groups(name) if opened else []
            return gr.update(choices=groups, value=groups[0] if groups else None), ""

        browse_category.change(on_browse_category, [browser, browse_category], [browse_group, browse_message])

        @shown(3)
        def on_browse_group(opened, name, group):
            if not opened:
                return [], [], ""
            return opened.thumbnails(name, group), opened.items(name, group), ""

        browse_group.change(
            on_browse_group,
            [browser, browse_category, browse_group],
            [browse_gallery, shown_rows, browse_message],
        )

        @shown(4)
        def on_browse_select(opened, rows, evt: gr.SelectData):
            k = rows[evt.index]
            image, overlaid, info = opened.detail(k)
            files = [
                opened.pictures.path(f"{name}-{k}", lambda p=p: p)
                for name, p in (("image", image), ("overlay", overlaid))
            ]
            return (*files, info, "")

        browse_gallery.select(
            on_browse_select,
            [browser, shown_rows],
            [browse_image, browse_overlay, browse_info, browse_message],
        )

        @shown(2)
        def on_batch_category(name):
            types = sorted(session.source.all_types.get(name, ())) if session.source is not None else []
            return gr.update(choices=[""] + types, value=""), ""

        batch_category.change(on_batch_category, batch_category, [batch_type, batch_message])

        def on_batch(
            name,
            defect,
            n,
            output,
            size,
            use_ref,
            n_steps,
            scale,
            seed_value,
            progress=gr.Progress(),  # noqa: B008 (how Gradio injects a progress bar)
        ):
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

        batch_button.click(
            on_batch,
            [
                batch_category,
                batch_type,
                batch_n,
                batch_output,
                batch_size,
                batch_reference,
                batch_steps,
                batch_guidance,
                batch_seed,
            ],
            [batch_progress, batch_gallery, batch_message],
        )
        app.load(
            lambda: (*categories_update(), session.status()), None, [category, batch_category, load_message]
        )
    return app


def launch(session: Session, **kwargs):
    """Builds the page and serves it (``kwargs`` go to ``Blocks.launch``); returns the running Blocks."""
    app = build_app(session).queue()
    app.launch(css=CSS, **kwargs)
    return app
