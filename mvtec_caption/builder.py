"""`MVTecCaption`: the MVTec Caption image–mask–text triples as a `datasets` builder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from .captions import Captions, read_captions, shipped_captions
from .errors import MVTecCaptionError
from .layout import CATEGORIES, Record, check_categories, find_data_root, iter_records
from .masks import check_mask_sizes, mask_png

_DESCRIPTION = """\
MVTec Caption (AnomalyXFusion, Hu et al.): 1,258 image–mask–text triples over MVTec AD's 15 categories
and 993 over MVTec LOCO's 5, plus the normal images of both. Captions are the authors'; images and
masks are MVTec's (CC BY-NC-SA 4.0) and are read from the user's local copy.
"""
_HOMEPAGE = "https://github.com/hujiecpp/MVTec-Caption"
LICENSE = "cc-by-nc-sa-4.0"
CITATION = """\
@article{hu2024anomalyxfusion,
  title   = {AnomalyXFusion: Multi-modal Anomaly Synthesis with Diffusion},
  author  = {Hu, Jie and Huang, Yawen and Lu, Yilin and Xie, Guoyang and Jiang, Guannan and Zheng, Yefeng and Lu, Zhichao},
  journal = {arXiv preprint arXiv:2404.19444},
  year    = {2024}
}
@inproceedings{bergmann2019mvtec,
  title     = {MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author    = {Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle = {CVPR},
  year      = {2019}
}
@article{bergmann2022beyond,
  title   = {Beyond Dents and Scratches: Logical Constraints in Unsupervised Anomaly Detection and Localization},
  author  = {Bergmann, Paul and Batzner, Kilian and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  journal = {International Journal of Computer Vision},
  year    = {2022}
}
"""

SPLITS = {
    "ad": (datasets.Split.TRAIN, datasets.Split.TEST),
    "loco": (datasets.Split.TRAIN, datasets.Split.VALIDATION, datasets.Split.TEST),
}


def _features() -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(mode="RGB"),
            "mask": datasets.Image(mode="L"),
            "caption": datasets.Value("string"),
            "category": datasets.Value("string"),
            "defect_type": datasets.Value("string"),
            "is_anomaly": datasets.Value("bool"),
            "fold": datasets.Value("string"),
            "path": datasets.Value("string"),
        }
    )


@dataclass
class MVTecCaptionConfig(datasets.BuilderConfig):
    """`captions`: authors' .py or JSON file, None = the authors' captions shipped with the package.
    `categories`: subset to build, None = every captioned category."""

    captions: str | None = None
    categories: Sequence[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.captions is not None:
            self.captions = str(self.captions)
        if isinstance(self.categories, str):
            self.categories = [self.categories]
        if self.categories is not None:
            self.categories = tuple(self.categories)


class MVTecCaption(datasets.GeneratorBasedBuilder):
    """MVTec Caption from a local MVTec AD (`ad`) or MVTec LOCO (`loco`) copy: folder or `.tar.xz`.

    `MVTecCaption(config_name="loco", data_dir=..., captions=..., categories=[...])`, then
    `download_and_prepare()` and `as_dataset()`.
    """

    BUILDER_CONFIG_CLASS = MVTecCaptionConfig
    BUILDER_CONFIGS = [
        MVTecCaptionConfig(
            name="ad", version=datasets.Version("1.0.0"), description="MVTec AD, 15 categories"
        ),
        MVTecCaptionConfig(
            name="loco", version=datasets.Version("1.0.0"), description="MVTec LOCO, 5 categories"
        ),
    ]
    # Examples carry full-size image bytes: keep few in memory at a time.
    DEFAULT_WRITER_BATCH_SIZE = 16

    def __init__(self, *args, dataset_name: str = "mvtec_caption", **kwargs):
        super().__init__(*args, dataset_name=dataset_name, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=_DESCRIPTION,
            features=_features(),
            homepage=_HOMEPAGE,
            license=LICENSE,
            citation=CITATION,
        )

    def _split_generators(self, dl_manager: datasets.DownloadManager):
        layout = self.config.name
        if not self.config.data_dir:
            raise MVTecCaptionError(
                f"data_dir is required: the MVTec {layout.upper()} folder or its official .tar.xz archive "
                "(MVTec images are licence-restricted and are read from your local copy)"
            )
        captions = self._load_captions(dl_manager)
        categories = check_categories(layout, captions, self.config.categories or None)
        data_dir = Path(self.config.data_dir)
        if data_dir.is_file():
            data_dir = Path(dl_manager.extract(str(data_dir)))
        root = find_data_root(data_dir, categories)
        generators = []
        for split in SPLITS[layout]:
            # Walk and check the whole split before writing anything: a bad tree fails fast.
            records = [
                (r, check_mask_sizes(r)) for r in iter_records(root, layout, captions, categories, str(split))
            ]
            generators.append(
                datasets.SplitGenerator(name=split, gen_kwargs={"root": str(root), "records": records})
            )
        return generators

    def _load_captions(self, dl_manager: datasets.DownloadManager) -> Captions:
        layout = self.config.name
        if self.config.captions is None:
            return shipped_captions(layout)  # the authors' captions, shipped with the package
        captions = read_captions(self.config.captions)
        unknown = [c for c in captions if c not in CATEGORIES[layout]]
        if unknown:
            raise MVTecCaptionError(
                f"Captions file {self.config.captions} names categories {unknown} that are not "
                f"MVTec {layout.upper()} categories; is it the captions file of the other config?"
            )
        return captions

    def _generate_examples(self, root: str, records: list[tuple[Record, tuple[int, int]]]):
        for record, size in records:
            path = record.image.relative_to(root).as_posix()
            yield (
                path,
                {
                    "image": {"path": path, "bytes": record.image.read_bytes()},
                    "mask": {"path": None, "bytes": mask_png(record, size)},
                    "caption": record.caption,
                    "category": record.category,
                    "defect_type": record.defect_type,
                    "is_anomaly": record.is_anomaly,
                    "fold": record.fold,
                    "path": path,
                },
            )
