"""`axf app`: a Gradio page to try AnomalyXFusion (synthesise, browse a dataset, run a batch).

Optional extra (``pip install .[app]``); nothing else in the package imports this.
"""

from .logic import AppError, Session

__all__ = ["AppError", "Session", "build_app", "launch"]


def build_app(session: Session):
    """The Gradio Blocks for ``session`` (imports gradio)."""
    from .ui import build_app as build

    return build(session)


def launch(session: Session, **kwargs):
    """Serves the page for ``session`` (``kwargs``: ``Blocks.launch``'s); returns the running Blocks."""
    from .ui import launch as serve

    return serve(session, **kwargs)
