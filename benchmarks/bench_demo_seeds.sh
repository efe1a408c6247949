#!/usr/bin/env bash
# The demo once per seed at its defaults (issue: "results that hold for every seed"); writes the per-seed rows
# and mean ± std / worst seed to benchmarks/results/demo_seeds/<date>/ (seeds.md, seeds.json, each seed's
# results.md, grids and downstream pictures). About 10 minutes per seed on 2 idle cores.
#   bash benchmarks/bench_demo_seeds.sh            # seeds 0 1 2 3 4
#   bash benchmarks/bench_demo_seeds.sh 5 6 7      # other seeds
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
seeds=("${@:-0 1 2 3 4}")
# shellcheck disable=SC2206
seeds=(${seeds[*]})
work=outputs/demo_seeds
out=benchmarks/results/demo_seeds/$(date +%F)
python -m axf_pipeline.demo --output_dir "$work" --seeds "${seeds[@]}"
mkdir -p "$out.tmp"
cp "$work/seeds.md" "$work/seeds.json" "$out.tmp/"
for s in "${seeds[@]}"; do
  mkdir -p "$out.tmp/seed$s"
  cp "$work/seed$s/results.md" "$work/seed$s/metrics.json" "$out.tmp/seed$s/"
  cp "$work/seed$s"/grids/*.png "$work/seed$s"/downstream/*/maps.png "$out.tmp/seed$s/"
done
rm -rf "$out" && mv "$out.tmp" "$out"
echo "written: $out"
