"""Side-by-side comparison of generators on one real dataset: every metric, per category, one report."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from .baselines import perlin_anomalies
from .data import RealData, Sample, check_anomalies, group_by
from .downstream import classification_accuracy, evaluate_localization, train_classifier, train_localization
from .generation import ic_lpips, inception_score

__all__ = ["ALL_METRICS", "HarnessOptions", "evaluate_generators"]

ALL_METRICS = ("inception_score", "ic_lpips", "localization", "classification")


@dataclass
class HarnessOptions:
    metrics: tuple[str, ...] = ALL_METRICS
    resolution: int = 256
    classifier_resolution: int = 224
    epochs: int = 10
    classifier_epochs: int = 10
    batch_size: int = 8
    unet_channels: int = 64
    unet_depth: int = 5
    classifier_weights: str | None = None
    inception_weights: str | None = None
    lpips_weights: str | None = None
    lpips_net: str = "vgg"
    lpips_resolution: int = 256
    max_cluster_size: int | None = 50
    small_clusters: str = "skip"
    baseline_per_defect_type: int = 0
    random_backbones: bool = False
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


def evaluate_generators(
    real: RealData,
    generators: dict[str, list[Sample]],
    options: HarnessOptions,
    categories: list[str] | None = None,
) -> tuple[dict, dict]:
    """Run the chosen metrics for every generator and category; return ``(report, curves)``.

    ``options.baseline_per_defect_type > 0`` adds the Perlin baseline as generator ``"perlin"``.
    """
    if unknown := sorted(set(options.metrics) - set(ALL_METRICS)):
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}")
    categories = list(categories or real.categories)
    by_gen = _generators_by_category(real, generators, options, categories)
    results: dict = {g: {} for g in by_gen}
    curves: dict = {c: {} for c in categories}
    steps = tqdm(
        [(g, c) for g in by_gen for c in categories],
        desc="generators × categories",
        disable=not options.progress,
    )
    for g, c in steps:
        steps.set_postfix_str(f"{g}/{c}")
        results[g][c], curve = _measure(real, c, by_gen[g][c], options)
        if curve is not None:
            curves[c][g] = curve
    report = {
        "generators": list(by_gen),
        "categories": categories,
        "settings": asdict(options),
        "results": results,
    }
    return report, {c: v for c, v in curves.items() if v}


def _generators_by_category(real: RealData, generators, options: HarnessOptions, categories) -> dict:
    """Each generator's checked anomalies (plus the Perlin baseline if asked) by category; every category
    must have some."""
    for name, samples in generators.items():  # the baseline's own anomalies need no check
        check_anomalies([s for s in samples if s.category in categories], name, options.progress)
    generators = dict(generators)
    if options.baseline_per_defect_type > 0:
        generators["perlin"] = [
            s
            for c in categories
            for s in perlin_anomalies(
                real.normals(c),
                real.centres(c),
                per_defect_type=options.baseline_per_defect_type,
                resolution=options.resolution,
                seed=options.seed,
            )
        ]
    if not generators:
        raise ValueError(
            "no generator to evaluate: pass --generated NAME=PATH and/or --baseline-per-defect-type N"
        )
    by_gen = {g: group_by(samples, "category") for g, samples in generators.items()}
    for g, cats in by_gen.items():
        if missing := [c for c in categories if not cats.get(c)]:
            raise ValueError(f"generator {g!r} has no anomalies for category/categories {missing}")
    return by_gen


def _measure(
    real: RealData, c: str, samples: list[Sample], options: HarnessOptions
) -> tuple[dict, dict | None]:
    """Every chosen metric of one generator on category ``c``; the localisation curves (or None)."""
    out = {"n_generated": len(samples)}
    curve = None
    if "inception_score" in options.metrics:
        out["inception_score"] = inception_score(
            [s.load_image() for s in samples],
            weights=options.inception_weights,
            random_backbone=options.random_backbones,
            device=options.device,
            progress=options.progress,
        ).to_dict()
    if "ic_lpips" in options.metrics:
        out["ic_lpips"] = _ic_lpips(real, c, samples, options)
    if "localization" in options.metrics:
        loc = _localization(real, c, samples, options)
        out["localization"] = loc.to_dict()
        curve = {"pixel": loc.pixel_counts, "image": loc.image_counts}
    if "classification" in options.metrics:
        out["classification"] = _classification(real, c, samples, options)
    return out, curve


def _run_settings(options: HarnessOptions) -> dict:
    """Device, seed and progress bars: the same for every metric."""
    return {"device": options.device, "seed": options.seed, "progress": options.progress}


def _ic_lpips(real: RealData, c: str, samples: list[Sample], options: HarnessOptions) -> dict:
    gen_by_type = {t: [s.load_image() for s in v] for t, v in group_by(samples, "defect_type").items()}
    centres = {t: [s.load_image() for s in v] for t, v in group_by(real.centres(c), "defect_type").items()}
    return ic_lpips(
        gen_by_type,
        centres,
        net=options.lpips_net,
        weights=options.lpips_weights,
        max_cluster_size=options.max_cluster_size,
        small_clusters=options.small_clusters,
        resolution=options.lpips_resolution,
        random_backbone=options.random_backbones,
        **_run_settings(options),
    ).to_dict()


def _localization(real: RealData, c: str, samples: list[Sample], options: HarnessOptions):
    """The DRAEM-style U-Net trained on the category's normals and these anomalies, tested on its real test set."""
    model = train_localization(
        real.normals(c),
        samples,
        resolution=options.resolution,
        epochs=options.epochs,
        batch_size=options.batch_size,
        base_channels=options.unet_channels,
        depth=options.unet_depth,
        **_run_settings(options),
    )
    return evaluate_localization(
        model, real.test_set(c), resolution=options.resolution, device=options.device
    )


def _classification(real: RealData, c: str, samples: list[Sample], options: HarnessOptions) -> dict:
    """A defect-type classifier trained on these anomalies, scored on the real evaluation fold."""
    classes = real.defect_types(c)
    classifier = train_classifier(
        samples,
        classes,
        resolution=options.classifier_resolution,
        epochs=options.classifier_epochs,
        batch_size=options.batch_size,
        weights=options.classifier_weights,
        **_run_settings(options),
    )
    evaluation_fold = [s for s in real.test_set(c) if s.is_anomaly]
    return classification_accuracy(
        classifier,
        evaluation_fold,
        classes,
        resolution=options.classifier_resolution,
        device=options.device,
    ).to_dict()
