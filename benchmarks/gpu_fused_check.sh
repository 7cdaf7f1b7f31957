#!/usr/bin/env bash
# GPU checks of the fused GroupNorm kernels and the on-device noise, in one device session:
#  1. the kernels against the plain ops on CUDA (tests/test_fused_norm.py: forward and gradients, fp32 and bf16,
#     NCHW and channels_last, dropout, the whole UNet);
#  2. training throughput of the cifar10 recipe at batch 128, bf16 + compile (+ CUDA graphs), with the plain ops
#     and with the kernels (DDPM_LIB_FUSED_NORM=1), in one run each (benchmarks/bench.py, ours only);
#  3. generate() of 256 cifar10-sized images (random weights), DDIM-100, bf16 + compile, with the noise made on
#     the host per image (noise="cpu") and on the GPU (noise="device", rng.ImageNoise).
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
python3 - <<'PY' 2>&1 | tee "$OUT/noise_check.log"
import time, torch
from ddpm_lib import GaussianDiffusion, UNet, get_config
from ddpm_lib.generation import generate
cfg = get_config("cifar10")
net = UNet.from_config(cfg.model).cuda()
d = GaussianDiffusion.from_config(cfg.diffusion)
for noise in ("cpu", "device", "cpu", "device"):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    generate(net, d, 256, sampler="ddim", steps=100, batch_size=256, precision="bf16", compile=True,
             noise=noise, progress=False)
    torch.cuda.synchronize(); print(f"noise={noise}: {time.perf_counter() - t0:.2f} s (the first of each compiles)")
PY
echo "GPU FUSED CHECK DONE"
