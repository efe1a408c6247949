"""What `axf synthesize` makes: N items per (category, defect type), each a pure function of its seed.

Item k of (category, defect type) gets ``item_seed(seed, category, defect_type, k)``; from it alone come
the normal image (a train normal of the category, drawn with replacement), the real mask that is
transformed, the caption and the reference defect (generator fold of the type), the mask transform and
the diffusion noise.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import PIL.Image

from .core import Item, Prepared, SynthesisError, item_seed
from .masks import TEXTURE_CATEGORIES, MaskSampler, estimate_foreground
from .source import SourceData


def digits(n: int) -> int:
    """File-number width: MVTec's 3 digits, more when N needs them."""
    return max(3, len(str(max(n - 1, 0))))


def select(
    source: SourceData, categories: Sequence[str] | None, defect_types: Sequence[str] | None
) -> list[tuple[str, str]]:
    """The (category, defect type) pairs to make, checked: unknown names list the available ones."""
    available = source.categories
    chosen = list(categories) if categories else available
    for category in chosen:
        if category not in available:
            raise SynthesisError(f"unknown category {category!r}; {source.name} has {', '.join(available)}")
    types_here = sorted({t for c in chosen for t in source.all_types.get(c, ())})
    for defect in defect_types or ():
        if defect not in types_here:
            raise SynthesisError(
                f"unknown defect type {defect!r} in categories {', '.join(chosen)}; available: {', '.join(types_here)}"
            )
    pairs = []
    for category in chosen:
        types = sorted(source.all_types.get(category, ()))
        if defect_types:
            types = [t for t in types if t in defect_types]
        if not types:
            raise SynthesisError(f"category {category!r} of {source.name} has no anomalies (test split)")
        if not source.bases_and_held_out(category)[0]:
            raise SynthesisError(f"category {category!r} of {source.name} has no train normals to start from")
        for defect in types:
            if not source.generator[(category, defect)]:
                raise SynthesisError(
                    f"defect type {category}/{defect} has no generator-fold anomaly in {source.name}; "
                    "drop it with --defect-types"
                )
            pairs.append((category, defect))
    return pairs


def plan_items(
    source: SourceData,
    pairs: Sequence[tuple[str, str]],
    n: int,
    seed: int,
    prompt: str | None = None,
    reference: bool = True,
    model: str = "",
    texture_categories: Collection[str] = TEXTURE_CATEGORIES,
) -> list[Item]:
    """The items of every pair, in (category, defect type, k) order. ``model``: the name provenance gives the
    model (never a local path); ``texture_categories``: categories whose masks go anywhere, not on the object."""
    if n < 1:
        raise SynthesisError(f"--num-per-defect-type must be at least 1, got {n}")
    width = digits(n)
    items = []
    for category, defect in pairs:
        sampler = MaskSampler(
            source.generator_masks(category, defect), texture=category in texture_categories
        )
        bases = source.bases_and_held_out(category)[0]
        generator = source.generator[(category, defect)]
        for k in range(n):
            s = item_seed(seed, category, defect, k)
            rng = np.random.default_rng(s)
            base = bases[int(rng.integers(len(bases)))]
            mask_source = int(rng.integers(len(generator)))
            caption_row = generator[int(rng.integers(len(generator)))]
            reference_row = generator[int(rng.integers(len(generator)))]
            record = {
                "caption": prompt if prompt is not None else source.caption(caption_row),
                "category": category,
                "defect_type": defect,
                "is_anomaly": True,
                "source_image": source.path("train", base),
                "reference": source.path("test", reference_row) if reference else "",
                "mask_source": source.path("test", generator[mask_source]),
                "seed": s,
                "model": model,
            }
            stem = f"{k:0{width}d}"
            items.append(
                Item(
                    image_path=f"mvtec/{category}/test/{defect}/{stem}.png",
                    mask_path=f"mvtec/{category}/ground_truth/{defect}/{stem}_mask.png",
                    seed=s,
                    size=source.normal_size(base),
                    prepare=_preparer(source, sampler, base, mask_source, reference_row if reference else None,
                                      record["caption"], s),
                    record=record,
                    context={"base": base, "sampler": sampler, "mask_source": mask_source},
                )
            )  # fmt: skip
    return items


def _preparer(
    source: SourceData, sampler: MaskSampler, base: int, mask_source: int, reference_row, caption, s
):
    def prepare() -> Prepared:
        image = source.normal(base)
        pixels = np.asarray(image)
        foreground = None if sampler.texture else estimate_foreground(pixels)
        mask, _ = sampler.sample(np.random.default_rng([s, 1]), pixels.shape[:2], foreground, mask_source)
        mask_image = PIL.Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
        ref = ref_mask = None
        if reference_row is not None:
            ref, ref_mask = source.anomaly(reference_row)
        return Prepared(image, mask_image, caption, ref, ref_mask)

    return prepare


def texture_categories_of(source: SourceData, named: Sequence[str] | None) -> frozenset[str]:
    """``--texture-categories``: None keeps MVTec AD's textures; names must be categories of the source."""
    if named is None:
        return TEXTURE_CATEGORIES
    if unknown := sorted(set(named) - set(source.categories)):
        raise SynthesisError(
            f"--texture-categories: {', '.join(unknown)} not in {source.name}; it has {', '.join(source.categories)}"
        )
    return frozenset(named)


def mark_fallbacks(output: Path, items: Sequence[Item]) -> int:
    """Sets each item's ``mask_fallback`` record (its written mask is the real one resized, the sampler's
    fallback) from the mask on disk, so items made by another process or an earlier run are marked too;
    returns how many are."""
    for item in items:
        with PIL.Image.open(output / item.mask_path) as mask:
            written = np.asarray(mask.convert("L")) > 0
        item.record["mask_fallback"] = item.context["sampler"].is_fallback(
            written, item.context["mask_source"]
        )
    return sum(item.record["mask_fallback"] for item in items)
