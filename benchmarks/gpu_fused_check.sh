#!/usr/bin/env bash
# The GPU checks of the fused GroupNorm kernels, the graphed sampler and the on-device noise, in one device
# session (about 10 min on an H100 / H200; each stage has its own time limit, so one that overruns does not
# take the others with it):
#  1. the kernels and the graphed sampler against the plain ops and the eager loop, on CUDA
#     (tests/test_fused_norm.py, tests/test_graphed.py, tests/test_image_noise.py);
#  2. training at batch 128, best against best: ours with the plain ops and with the kernels
#     (DDPM_LIB_FUSED_NORM=0/1), the peer, all in bf16 + compile + CUDA graphs, with a profile; the activation
#     count of both networks and of ours fused;
#  3. peak memory in fp32 with the peer measured first (--who peer,ours): whether the 10% gap of the first
#     H200 run followed the order (cuDNN's autotuning falls on whichever network runs first);
#  4. sampling, 256 images, 1000-step DDPM and 50-step DDIM, bf16 + compile, with and without graphs
#     (ours: the whole step in one graph; the peer: its network), kernels on;
#  5. the batch size for 50k samples: GraphedSampler's images x steps per second at B = 256 … 2048.
# Usage: OUT=results_dir bash benchmarks/gpu_fused_check.sh      (SMOKE=1: the tiny config on the CPU, stages 4-5)
set -uo pipefail
export OUT=${OUT:-gpu_fused_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stage() { local limit=$1; shift; echo "== $* (limit ${limit}s)"; timeout "$limit" "$@" || echo "STAGE FAILED ($?): $*"; }

if [ -z "${SMOKE:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
  DDPM_LIB_FUSED_NORM=1 stage 150 python3 -m pytest -q tests/test_fused_norm.py tests/test_graphed.py \
    tests/test_image_noise.py 2>&1 | tee "$OUT/tests.log"
  for fused in 0 1; do
    who=ours; [ "$fused" = 1 ] && who=ours,peer
    DDPM_LIB_FUSED_NORM=$fused stage 170 python3 benchmarks/bench.py --parts flops,activations,train --who $who \
      --modes bf16+compile+cudagraphs --profile 5 --out "$OUT/train_fused$fused.json" 2>&1 | tee "$OUT/train_fused$fused.log"
  done
  stage 120 python3 benchmarks/bench.py --parts train --who peer,ours --modes fp32 --train-steps 25 \
    --out "$OUT/memory_fp32_peer_first.json" 2>&1 | tee "$OUT/memory_fp32.log"
  DDPM_LIB_FUSED_NORM=1 stage 150 python3 benchmarks/bench.py --parts sample --modes bf16+compile \
    --out "$OUT/sample.json" 2>&1 | tee "$OUT/sample.log"
fi
DDPM_LIB_FUSED_NORM=1 stage 120 python3 - <<'PY' 2>&1 | tee "$OUT/batch_sweep.log"
import json, os, time, torch
from ddpm_lib import GaussianDiffusion, UNet, get_config
from ddpm_lib.graphed import GraphedSampler
from ddpm_lib.precision import Autocast
smoke = bool(os.environ.get("SMOKE"))
dev = torch.device("cpu" if smoke else "cuda")
cfg = get_config("tiny" if smoke else "cifar10")
net = UNet.from_config(cfg.model).to(dev).eval().requires_grad_(False)
if not smoke:
    torch.backends.cudnn.benchmark = True
    net = net.to(memory_format=torch.channels_last)
net = Autocast(torch.compile(net, dynamic=False) if not smoke else net, dev.type, torch.bfloat16)
d = GaussianDiffusion.from_config(cfg.diffusion)
rows, k = [], 3 if smoke else 100
for b in ((2, 4) if smoke else (256, 512, 1024, 2048)):
    g = GraphedSampler(d, net, (b, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size), device=dev)
    keys = torch.arange(b, dtype=torch.int64)
    g(keys, first=2)  # records the graph (and compiles this shape)
    if dev.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter(); g(keys, first=k)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    s = time.perf_counter() - t0
    rows.append({"batch": b, "steps_timed": k, "image_steps_per_s": b * k / s,
                 "fid_50k_hours_1000_steps": 50_000 * d.num_timesteps / (b * k / s) / 3600,
                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None})
    print(json.dumps(rows[-1]), flush=True)
    del g
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "batch_sweep.json"), "w"), indent=1)
PY
echo "GPU FUSED CHECK DONE"
