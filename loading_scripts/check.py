"""Load an exported MVTec Caption folder with `datasets.load_dataset` and print its counts.

python loading_scripts/check.py outputs/mvtec_caption
"""

import sys

from mvtec_caption.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["check", *sys.argv[1:]]))
