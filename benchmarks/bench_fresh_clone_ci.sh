#!/usr/bin/env bash
# What a newcomer and CI do: a fresh `git clone` of HEAD into an empty temporary folder, then `bash .ci/run`
# (the README's test command), timed. Writes benchmarks/results/ci/<date>.txt: the commit, the wall time of
# the install and of the tests, pytest's summary line and the slowest tests. The clone is removed afterwards.
#   bash benchmarks/bench_fresh_clone_ci.sh
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=benchmarks/results/ci/$(date +%F).txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git clone -q "$root" "$tmp/clone"
cd "$tmp/clone"
started=$(date +%s)
CI=true PYTEST_ADDOPTS="--durations=15" bash .ci/run > "$tmp/log.txt" 2>&1
rc=$?
ended=$(date +%s)
mkdir -p "$root/$(dirname "$out")"
{
  echo "\$ git clone <repo> && bash .ci/run   # commit $(git rev-parse --short HEAD), $(date -u +%FT%TZ)"
  echo "# $(nproc) cores; load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "exit code: $rc"
  echo "wall time: $((ended - started)) s"
  grep -aE "[0-9]+ (passed|failed)" "$tmp/log.txt" | tail -n 1
  echo
  echo "## slowest tests"
  sed -n '/slowest .* durations/,/^=/p' "$tmp/log.txt" | head -n 20
  echo
  echo "## last lines"
  tail -n 15 "$tmp/log.txt"
} > "$root/$out.tmp"
mv "$root/$out.tmp" "$root/$out"
cat "$root/$out"
exit "$rc"
