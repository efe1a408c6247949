"""Build MVTec Caption into the Hub layout (Parquet + card).

    python loading_scripts/build.py --config loco --data-dir /data/mvtec_loco_anomaly_detection.tar.xz \\
        --output outputs/mvtec_caption     # the authors' captions ship with the package
    python loading_scripts/build.py --config custom --data-dir MY_TREE --captions my.json --name mine
    python loading_scripts/build.py            # no MVTec copy: a generated sample tree, clearly labelled
"""

import sys

from mvtec_caption.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["build", *sys.argv[1:]]))
