#!/usr/bin/env python
"""Train AnomalyXFusion on MVTec Caption: ``accelerate launch train.py --help``.

Thin on purpose: the logic lives in ``axf_pipeline.training``.
"""

import sys

from axf_pipeline.training import main

if __name__ == "__main__":
    sys.exit(main())
