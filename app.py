"""The Hugging Face Space entry point: `python app.py` (a Gradio Space runs this file as it is).

Environment: AXF_MODEL (pipeline Hub id or folder; default: the demo's outputs), AXF_DATASET (MVTec Caption
Hub id or folder; optional), AXF_DATASET_CONFIG (default "ad"). Listens on 0.0.0.0:$PORT (7860).
"""

import os
import sys

from axf_pipeline.app.cli import serve
from axf_pipeline.app.logic import demo_defaults

if __name__ == "__main__":
    model = os.environ.get("AXF_MODEL") or None
    if model is None and demo_defaults() is None:
        print(
            "app.py: set AXF_MODEL to an AnomalyXFusion pipeline (Hub id or folder) and optionally AXF_DATASET, "
            "or run `bash scripts/demo.sh` first",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(
        serve(
            model,
            os.environ.get("AXF_DATASET") or None,
            os.environ.get("AXF_DATASET_CONFIG") or "ad",
            server_name="0.0.0.0",
            server_port=int(os.environ.get("PORT", os.environ.get("GRADIO_SERVER_PORT", "7860"))),
        )
    )
