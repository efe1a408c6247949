"""`axf app`: a Gradio page to try AnomalyXFusion (synthesise, browse a dataset, run a batch).

Optional extra (``pip install .[app]``); nothing else in the package imports this.
"""

from .logic import AppError, Session

__all__ = ["AppError", "Session", "build_app"]


def build_app(session: Session):
    """The Gradio Blocks for ``session`` (imports gradio)."""
    from .ui import build_app as build

    return build(session)
