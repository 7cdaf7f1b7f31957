#!/usr/bin/env bash
# The training path's GPU check (one script, a single device session, < 8 minutes on an H100):
#  1. training throughput of the cifar10 recipe at batch 128 in fp32, tf32, bf16, bf16 + compile and
#     bf16 + compile + CUDA graphs (benchmarks/bench.py, ours only), and that the loss falls;
#  2. the CLI end to end on CUDA: train bf16 on a folder of images, stop, resume, sample a grid.
# Usage: OUT=results_dir bash benchmarks/gpu_check.sh
set -euo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"

python3 benchmarks/bench.py --parts train --who ours --modes fp32,tf32,bf16,bf16+compile,bf16+compile+cudagraphs \
  --out "$OUT/train_check.json" 2>&1 | tee "$OUT/train_check.log"

# CLI: 256 generated 32x32 PNGs, train 40 steps, resume to 60, sample.
DATA=$(mktemp -d)
python3 - "$DATA" <<'PY'
import sys
from PIL import Image
sys.path.insert(0, "benchmarks")
from bench import smooth_images  # the benchmark's synthetic images
for i, im in enumerate(smooth_images(256, 3, 32, "cpu")):
    Image.fromarray(im.permute(1, 2, 0).numpy()).save(f"{sys.argv[1]}/img{i:03d}.png")
PY
RUN=$(mktemp -d)/run
{
  python3 -m ddpm_lib train --config cifar10 --data "$DATA" --out "$RUN" --steps 40 --precision bf16 \
    --ckpt-every 20 --log-every 10 --sample-every 0 --no-progress
  python3 -m ddpm_lib train --out "$RUN" --resume --steps 60 --precision bf16 --log-every 10 \
    --sample-every 0 --no-progress
  cat "$RUN/metrics.csv"
  echo "sampling 16 images x 1000 steps:"
  time python3 -m ddpm_lib sample --checkpoint "$RUN" --n 16 --out "$OUT/cli_grid.png" --no-progress
  ls -la "$RUN"
} 2>&1 | tee "$OUT/cli.log"
echo "GPU CHECK DONE"
