"""Publish an exported MVTec Caption folder as a Hub dataset repo (no remote code needed to load it).

python loading_scripts/push.py outputs/mvtec_caption --repo-id <user>/mvtec_caption [--private]
"""

import sys

from mvtec_caption.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["push", *sys.argv[1:]]))
