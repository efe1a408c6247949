"""Bridges to other libraries (optional extras). The core package never imports this subpackage, so
``import axf_pipeline`` works without them; import a bridge by name, e.g.
``from axf_pipeline.integrations.anomalib import draem_with_synthetic`` (``pip install .[anomalib]``)."""
