#!/usr/bin/env bash
# The speed tables of docs/benchmarks.md in one run: every ratio against its baseline timed in the same
# process. Each command's full output goes to benchmarks/results/speed/<date>/<name>.txt (the command is its
# first line). Tiny parts take a few minutes; `--real` adds the SD-1.5-shaped sampling rows (about 10 more).
#   bash benchmarks/bench_speed_suite.sh [--real]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
out=benchmarks/results/speed/$(date +%F)
mkdir -p "$out"
run() {  # name, then the command
  local name=$1
  shift
  echo "== $name: $*"
  { echo "\$ $*"; echo "# $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"; "$@"; } \
    > "$out/$name.txt.tmp" 2>&1 || { echo "FAILED: $name (see $out/$name.txt.tmp)"; return 1; }
  mv "$out/$name.txt.tmp" "$out/$name.txt"
  tail -n 3 "$out/$name.txt"
}
run pipeline_4ch python benchmarks/bench_pipeline.py
run pipeline_9ch python benchmarks/bench_pipeline.py --unet-in-channels 9
run training_lora python benchmarks/bench_training.py --unet lora
run training_full python benchmarks/bench_training.py --unet full
run synthesis python benchmarks/bench_synthesis.py
run ic_lpips python benchmarks/bench_ic_lpips.py
run localization_256 python benchmarks/bench_evaluation_localization.py 60 256 255
run dataset_build python benchmarks/bench_dataset_build.py --scale 0.5
if [[ "${1:-}" == "--real" ]]; then
  run real_size_sampling python benchmarks/bench_real_size_sampling.py --steps 4
  run real_size_sampling_loco python benchmarks/bench_real_size_sampling.py --loco --steps 4
  run real_size_training_memory python benchmarks/bench_real_size_training.py memory
fi
echo "written: $out"
