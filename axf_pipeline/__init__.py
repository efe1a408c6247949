"""AnomalyXFusion: multi-modal industrial anomaly synthesis with diffusion.

A saved pipeline folder carries its own code (:mod:`axf_pipeline.remote_code`); folders saved before that
record the custom classes by module path (``axf_pipeline.models.multimodal_in_fusion``,
``axf_pipeline.models.dynamic_dif_fusion``): those module paths are public and must stay stable.
"""

from .models import DynamicDifFusion, MultiModalInFusion

__all__ = ["AnomalyXFusionPipeline", "AnomalyXFusionPipelineOutput", "DynamicDifFusion", "MultiModalInFusion"]

__version__ = "0.1.0"


def __getattr__(name):
    # The pipeline pulls in transformers; import it on first use so `axf_pipeline.models` stays light.
    if name in ("AnomalyXFusionPipeline", "AnomalyXFusionPipelineOutput"):
        from . import pipeline_anomaly_x_fusion as module

        return getattr(module, name)
    raise AttributeError(f"module 'axf_pipeline' has no attribute {name!r}")
