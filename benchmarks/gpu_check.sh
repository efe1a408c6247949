#!/usr/bin/env bash
# Real-size figures on one GPU, in about 8 minutes: fp16 sampling seconds per image at 512 px / 50 steps
# (with and without enable_model_cpu_offload, each against diffusers' inpaint pipeline on the same
# components), the LoRA training step's time and its peak memory by lever at 512 px, then the pipeline
# tests that need an accelerator. Random SD-1.5-shaped weights: nothing is downloaded.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
# Without a GPU it says so and runs the same scripts on the CPU at a toy size (a syntax/plumbing check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
run() { echo; echo "\$ $*"; timeout "${STEP_TIMEOUT:-200}" "$PY" "$@"; }

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    date -u "+%Y-%m-%d %H:%M UTC"
    "$PY" -c "import torch; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
    S=(--steps 50 --repeats 3 --warmup 1 --device cuda --dtype float16)
    run benchmarks/bench_real_size_sampling.py "${S[@]}"
    run benchmarks/bench_real_size_sampling.py "${S[@]}" --offload
    run benchmarks/bench_real_size_sampling.py "${S[@]}" --loco
    run benchmarks/bench_real_size_training.py time --device cuda --repeats 5 --steps 3 --warmup 1
    STEP_TIMEOUT=300 run benchmarks/bench_real_size_training.py memory --device cuda
    echo
    # pipeline tests that need an accelerator (none is collected on a CPU-only machine)
    "$PY" -m pytest -q tests/test_pipeline.py -k "cuda or gpu or offload or fp16" || [ $? -eq 5 ]
else
    echo "no CUDA GPU: CPU plumbing check at a toy size (figures mean nothing)"
    run benchmarks/bench_real_size_sampling.py --steps 1 --repeats 1 --size 64
    run benchmarks/bench_real_size_training.py time --resolution 64 --repeats 1
fi
