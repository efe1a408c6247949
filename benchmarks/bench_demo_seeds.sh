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
# the README's picture: the first seed's grid, one row per caption (the grid has two per caption)
python - "$out/seed${seeds[0]}/all_AnomalyXFusion.png" docs/assets/demo_seed0.png <<'PY'
import sys
from PIL import Image
grid = Image.open(sys.argv[1])
row = grid.height // 16
picture = Image.new("RGB", (grid.width, 8 * row))
for i in range(8):
    picture.paste(grid.crop((0, 2 * i * row, grid.width, (2 * i + 1) * row)), (0, i * row))
picture.save(sys.argv[2] + ".tmp.png")
PY
mv docs/assets/demo_seed0.png.tmp.png docs/assets/demo_seed0.png
echo "written: $out, docs/assets/demo_seed0.png"
