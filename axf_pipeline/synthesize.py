"""`python -m axf_pipeline.synthesize` (and `accelerate launch -m axf_pipeline.synthesize`): `axf synthesize`."""

import sys

from .synthesis.cli import main

if __name__ == "__main__":
    sys.exit(main())
