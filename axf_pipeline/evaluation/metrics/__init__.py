"""`evaluate` metric modules shipped with the package; load them offline with ``evaluate.load(metric_path(name))``."""

from importlib import resources

__all__ = ["METRICS", "metric_path"]

METRICS = ("localization", "ic_lpips")


def metric_path(name: str) -> str:
    """Local directory of the shipped `evaluate` module ``name`` (``evaluate.load`` takes it offline)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric module {name!r}; shipped: {', '.join(METRICS)}")
    return str(resources.files(__name__) / name)
