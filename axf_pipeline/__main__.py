"""``python -m axf_pipeline ...`` = ``axf ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
