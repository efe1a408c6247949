"""Build MVTec Caption into the Hub layout (Parquet + card).

    python loading_scripts/build.py --config loco --data-dir /data/mvtec_loco_anomaly_detection.tar.xz \\
        --captions Construct_MVTEC-LOCO-Caption.py --output outputs/mvtec_caption
    python loading_scripts/build.py            # no MVTec copy: a generated sample tree, clearly labelled
"""

import sys

from mvtec_caption.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["build", *sys.argv[1:]]))
