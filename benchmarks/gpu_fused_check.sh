#!/usr/bin/env bash
# The fused GroupNorm + SiLU + dropout kernels (ddpm_lib/fused_norm.py) on a GPU, in one device session:
#  1. the kernels against the plain ops on CUDA (tests/test_fused_norm.py: forward and gradients, fp32 and bf16,
#     NCHW and channels_last, dropout, the whole UNet);
#  2. training throughput of the cifar10 recipe at batch 128, bf16 + compile (+ CUDA graphs), with the plain ops
#     and with the kernels (DDPM_LIB_FUSED_NORM=1), in one run each (benchmarks/bench.py, ours only).
# Usage: OUT=results_dir bash benchmarks/gpu_fused_check.sh
set -euo pipefail
OUT=${OUT:-gpu_fused_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"

DDPM_LIB_FUSED_NORM=1 python3 -m pytest -q tests/test_fused_norm.py 2>&1 | tee "$OUT/fused_tests.log"

for fused in 0 1; do
  DDPM_LIB_FUSED_NORM=$fused python3 benchmarks/bench.py --parts train --who ours \
    --modes bf16+compile,bf16+compile+cudagraphs --out "$OUT/train_fused$fused.json" 2>&1 \
    | tee "$OUT/train_fused$fused.log"
done
echo "GPU FUSED CHECK DONE"
