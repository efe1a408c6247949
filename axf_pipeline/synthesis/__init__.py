"""Synthesis at dataset scale: one core (batching, seeds, atomic writes, resume, sharding) under two
front-ends, `axf synthesize` (an MVTec Caption-style dataset in) and `axf generate` (folders in)."""

from .core import Item, Prepared, Summary, SynthesisError, item_seed, run_items
from .masks import MaskSampler, estimate_foreground

__all__ = [
    "Item",
    "MaskSampler",
    "Prepared",
    "Summary",
    "SynthesisError",
    "estimate_foreground",
    "item_seed",
    "run_items",
]
