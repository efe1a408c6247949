"""MVTec Caption: image–mask–text triples for MVTec AD, MVTec LOCO and any MVTec-layout tree as a Hugging Face dataset."""

from .builder import MVTecCaption, MVTecCaptionConfig, caption_features
from .captions import read_captions
from .errors import MVTecCaptionError
from .export import check_export, export_dataset, push_to_hub
from .sample_tree import make_custom_tree, make_sample_tree

__all__ = [
    "MVTecCaption",
    "MVTecCaptionConfig",
    "MVTecCaptionError",
    "caption_features",
    "check_export",
    "export_dataset",
    "make_custom_tree",
    "make_sample_tree",
    "push_to_hub",
    "read_captions",
]
