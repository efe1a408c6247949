"""``accelerate launch -m axf_pipeline.training ...`` (= ``accelerate launch train.py ...`` = ``axf train ...``)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
