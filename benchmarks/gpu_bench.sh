#!/usr/bin/env bash
# The device session for the benchmarks (issue 7) and the sampling times of issue 4, in one command:
# benchmarks/bench.py on CUDA (ours vs diffusers' UNet2DModel: training at batch 128, 1000-step DDPM and
# 50-step DDIM sampling of 256 images, in bf16 + compile (with and without CUDA graphs), bf16 and fp32,
# FLOPs, MFU and a kernel profile of each training mode). About 8 minutes on an H100 or H200.
# diffusers is pure Python; where the GPU machine lacks it, put its wheel (and importlib_metadata's) in .whl/.
# Usage: OUT=results_dir bash benchmarks/gpu_bench.sh
set -uo pipefail
OUT=${OUT:-gpu_bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 benchmarks/bench.py --profile 5 --out "$OUT/bench_cuda.json" "$@" 2>&1 | tee "$OUT/bench.log"
