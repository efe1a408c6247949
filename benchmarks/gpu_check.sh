#!/usr/bin/env bash
# Real-size figures on one GPU, in about 8 minutes: fp16 sampling seconds per image at 512 px / 50 steps
# against diffusers' inpaint pipeline on the same components (plain, with enable_model_cpu_offload, a
# LOCO-sized image, the 9-channel UNet), the LoRA training step's time and its peak memory by lever at
# 512 px, then the tests that need an accelerator (tests/test_gpu.py). Random SD-1.5-shaped weights:
# nothing is downloaded. Most important first; a step that fails or runs past its time is reported and
# the rest still run.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# Without a GPU it says so and runs the same scripts on the CPU at a toy size (a syntax/plumbing check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
failed=()
run() {  # run SECONDS ARGS...: one step, timed, its failure noted
    local limit=$1
    shift
    echo
    echo "\$ $* (limit ${limit} s)"
    local t0=$SECONDS
    timeout "$limit" "$PY" "$@" || failed+=("$* (exit $?)")
    echo "[$((SECONDS - t0)) s]"
}

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    date -u "+%Y-%m-%d %H:%M UTC"
    "$PY" -c "import torch, diffusers, transformers; print(torch.cuda.get_device_name(0), '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
    S=(--steps 50 --repeats 3 --warmup 1 --device cuda --dtype float16 --threads 8)
    run 150 benchmarks/bench_real_size_sampling.py "${S[@]}"
    run 150 benchmarks/bench_real_size_training.py time --device cuda --repeats 5 --steps 3 --warmup 1 --threads 8
    run 300 benchmarks/bench_real_size_training.py memory --device cuda --threads 8
    run 150 benchmarks/bench_real_size_sampling.py "${S[@]}" --offload
    run 240 -m pytest -q -p no:cacheprovider tests/test_gpu.py
    run 120 benchmarks/bench_real_size_sampling.py "${S[@]}" --loco
    run 120 benchmarks/bench_real_size_sampling.py "${S[@]}" --unet-in-channels 9
else
    echo "no CUDA GPU: CPU plumbing check at a toy size (figures mean nothing)"
    run 300 benchmarks/bench_real_size_sampling.py --steps 1 --repeats 1 --size 64
    run 300 benchmarks/bench_real_size_training.py time --resolution 64 --repeats 1
fi
echo
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all steps passed"
