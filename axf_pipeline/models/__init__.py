from .dynamic_dif_fusion import DynamicDifFusion
from .multimodal_in_fusion import MaskEncoder, MultiModalInFusion

__all__ = ["DynamicDifFusion", "MaskEncoder", "MultiModalInFusion"]
