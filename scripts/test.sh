#!/usr/bin/env bash
# The README's test command: sets up .venv on a fresh clone, builds the docs (a broken link or a page missing
# from the nav fails), installs the built wheel into a fresh venv and runs it from outside the source tree,
# then runs the whole offline suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
# The app's browser test drives Debian's chromium; in CI (as root) install it when missing. A failed
# install does not fail the run: that test then skips and says why.
if [ "${CI:-}" = "true" ] && [ "$(id -u)" = 0 ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "scripts/test.sh: could not install chromium; the app's browser test will skip" >&2
fi
source scripts/_venv.sh
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --quiet
bash scripts/check_wheel.sh  # the installed wheel, outside the source tree (~30 s)
python -m pytest -q "$@"
