"""`MVTecCaption`: the MVTec Caption image–mask–text triples as a `datasets` builder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from .archive import extract_archive
from .captions import TEMPLATE, Captions, read_captions, read_custom_captions, shipped_captions
from .cards import MVTEC_LICENSE
from .errors import MVTecCaptionError
from .images import check_image_bytes
from .layout import (
    CATEGORIES,
    Record,
    check_categories,
    custom_categories,
    find_custom_root,
    find_data_root,
    has_validation,
    iter_custom_records,
    iter_records,
)
from .masks import check_mask_sizes, mask_png

_DESCRIPTION = """\
MVTec Caption (AnomalyXFusion, Hu et al.): 1,258 image–mask–text triples over MVTec AD's 15 categories
and 993 over MVTec LOCO's 5, plus the normal images of both. Captions are the authors'; images and
masks are MVTec's (CC BY-NC-SA 4.0) and are read from the user's local copy.
"""
_HOMEPAGE = "https://github.com/hujiecpp/MVTec-Caption"
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

_CUSTOM_DESCRIPTION = f"""\
Image–mask–text triples built by the MVTec Caption builder from a user's own MVTec-layout tree
(categories and defect types as its folders name them). Captions come from the user's file
(caption_source "human") or from the template "{TEMPLATE}" (caption_source "template").
"""

SPLITS = {
    "ad": (datasets.Split.TRAIN, datasets.Split.TEST),
    "loco": (datasets.Split.TRAIN, datasets.Split.VALIDATION, datasets.Split.TEST),
    # custom: validation only when the tree has <category>/validation/good
    "custom": (datasets.Split.TRAIN, datasets.Split.VALIDATION, datasets.Split.TEST),
}


def caption_features() -> datasets.Features:
    """The MVTec Caption columns; datasets derived from it (e.g. synthetic sets) start from these."""
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
            "caption_source": datasets.Value("string"),
        }
    )


@dataclass
class MVTecCaptionConfig(datasets.BuilderConfig):
    """`captions`: authors' .py or JSON file, None = the authors' captions shipped with the package
    (custom: a JSON file {category: {defect_type: [caption, ...] | {image: caption}}}, None = templates).
    `categories`: subset to build, None = every captioned category (custom: every category folder)."""

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
    """MVTec Caption from a local MVTec AD (`ad`), MVTec LOCO (`loco`) or any MVTec-layout (`custom`)
    copy: folder or `.tar.xz`.

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
        MVTecCaptionConfig(
            name="custom", version=datasets.Version("1.0.0"), description="any MVTec-layout tree"
        ),
    ]
    # Examples carry full-size image bytes: keep few in memory at a time.
    DEFAULT_WRITER_BATCH_SIZE = 16

    def __init__(self, *args, dataset_name: str = "mvtec_caption", **kwargs):
        super().__init__(*args, dataset_name=dataset_name, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        custom = self.config.name == "custom"
        return datasets.DatasetInfo(
            description=_CUSTOM_DESCRIPTION if custom else _DESCRIPTION,
            features=caption_features(),
            homepage="" if custom else _HOMEPAGE,
            license="" if custom else MVTEC_LICENSE,
            citation=CITATION,
        )

    def download_and_prepare(self, *args, **kwargs):
        """As datasets', but a bad tree found while writing raises its own named error."""
        try:
            return super().download_and_prepare(*args, **kwargs)
        except datasets.exceptions.DatasetGenerationError as err:
            if isinstance(err.__cause__, MVTecCaptionError):
                raise err.__cause__ from None
            raise

    def _data_root(self, dl_manager: datasets.DownloadManager) -> Path:
        """The user's folder, or the complete extraction of their archive."""
        data_dir = Path(self.config.data_dir)
        if data_dir.is_file():
            cache = dl_manager.download_config.cache_dir or datasets.config.DOWNLOADED_DATASETS_PATH
            data_dir = extract_archive(data_dir, Path(cache) / "mvtec_caption_extracted")
        elif not data_dir.exists():
            raise MVTecCaptionError(f"data_dir {data_dir} does not exist")
        return data_dir

    def _split_generators(self, dl_manager: datasets.DownloadManager):
        layout = self.config.name
        if not self.config.data_dir:
            raise MVTecCaptionError(
                f"data_dir is required: the {'MVTec ' + layout.upper() if layout != 'custom' else 'MVTec-layout'} "
                "folder or its .tar.xz archive (MVTec images are licence-restricted and are read from your local copy)"
            )
        if layout == "custom":
            return self._custom_split_generators(dl_manager)
        captions = self._load_captions(dl_manager)
        categories = check_categories(layout, captions, self.config.categories or None)
        root = find_data_root(self._data_root(dl_manager), categories)
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

    def _custom_split_generators(self, dl_manager: datasets.DownloadManager):
        captions = read_custom_captions(self.config.captions)
        root = find_custom_root(self._data_root(dl_manager))
        categories = custom_categories(root, self.config.categories, captions)
        source = self.config.captions or "(none: template captions)"
        generators = []
        for split in SPLITS["custom"]:
            if split == datasets.Split.VALIDATION and not has_validation(root, categories):
                continue
            records = [
                (r, check_mask_sizes(r))
                for r in iter_custom_records(root, captions, categories, str(split), source)
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
            data = record.image.read_bytes()
            check_image_bytes(data, record.image)  # a truncated image stops the build here, named
            yield (
                path,
                {
                    "image": {"path": path, "bytes": data},
                    "mask": {"path": None, "bytes": mask_png(record, size)},
                    "caption": record.caption,
                    "category": record.category,
                    "defect_type": record.defect_type,
                    "is_anomaly": record.is_anomaly,
                    "fold": record.fold,
                    "path": path,
                    "caption_source": record.caption_source,
                },
            )
