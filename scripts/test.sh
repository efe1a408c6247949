#!/usr/bin/env bash
# The README's test command: sets up .venv on a fresh clone, builds the docs (a broken link or a page missing
# from the nav fails), then runs the whole offline suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --quiet
python -m pytest -q "$@"
