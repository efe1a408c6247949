#!/usr/bin/env bash
# The README's test command: sets up .venv on a fresh clone, then runs the whole offline suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
python -m pytest -q "$@"
