#!/usr/bin/env bash
# The README's main job: the offline end-to-end demo (sets up .venv on a fresh clone first).
# Extra arguments go to `python -m axf_pipeline.demo` (e.g. --ablation, --output_dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
python -m axf_pipeline.demo "$@"
