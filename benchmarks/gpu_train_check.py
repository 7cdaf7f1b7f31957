"""Training throughput of the paper's CIFAR10 recipe on one GPU: fp32, tf32, bf16, bf16 + compile.

Runs ``ddpm_lib.train.train_step`` — the very step the training loop uses — on synthetic data
(smooth random images made on the device, so no download is needed), at batch 128 by default, and
reports per precision mode: steps/s and images/s (timed after the warm-up / compile steps),
the peak GPU memory, and the mean loss over the first and last fifth of the steps (it must fall).
For reference: the paper trained at 21 steps/s on a TPU v3-8 (App. B); one step of the CIFAR10
model at batch 128 is about 4.6 TFLOP (forward ≈ 12.1 GFLOP per image, backward ≈ 2×).

    python benchmarks/gpu_train_check.py --out gpu_train_check.json            # on the GPU machine
    python benchmarks/gpu_train_check.py --smoke --out /tmp/smoke.json           # CPU, tiny config, seconds

The learning-rate warm-up is shortened (``--lr-warmup``, default 50 steps) so that the loss visibly
falls within a few hundred steps; the recipe's 5000-step warm-up changes nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_lib.configs import get_config  # noqa: E402
from ddpm_lib.train import build_training_state, resolve_device, train_step  # noqa: E402

TFLOP_PER_STEP = {"cifar10": 4.6}  # at batch 128, PAPER.md "Cost"


def smooth_images(n: int, channels: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """n deterministic smooth random images, uint8 [n, C, size, size]: 4×4 noise upsampled bicubically."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g).to(device)
    up = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (up.clamp(0, 1) * 255).round().to(torch.uint8)


def run_mode(mode: str, cfg, device: torch.device, steps: int, warmup_steps: int, pool: torch.Tensor) -> dict:
    """Train ``steps`` steps in ``mode`` ("fp32", "tf32", "bf16", "bf16+compile") from a fresh model."""
    precision, _, extra = mode.partition("+")
    compile = extra == "compile"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    state = build_training_state(cfg, device, precision=precision, compile=compile)
    b = cfg.train.batch_size
    losses = []
    t_compile = time.perf_counter()
    start = None
    for step in range(steps):
        if step == warmup_steps:
            _sync(device)
            start = time.perf_counter()
            compile_s = start - t_compile
        i = (step * b) % (pool.shape[0] - b + 1)
        loss, _ = train_step(state, pool[i:i + b], step)
        losses.append(loss)
    _sync(device)
    elapsed = time.perf_counter() - start
    losses = torch.stack(losses).float().cpu()
    k = max(1, steps // 5)
    timed = steps - warmup_steps
    result = {
        "mode": mode,
        "steps": steps,
        "timed_steps": timed,
        "steps_per_s": timed / elapsed,
        "images_per_s": timed * b / elapsed,
        "warmup_s": compile_s,
        "first_loss": losses[:k].mean().item(),
        "last_loss": losses[-k:].mean().item(),
        "finite": bool(torch.isfinite(losses).all()),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if cfg.name in TFLOP_PER_STEP and b == 128:
        result["achieved_tflops"] = result["steps_per_s"] * TFLOP_PER_STEP[cfg.name]
    del state
    gc.collect()
    if compile:
        torch._dynamo.reset()
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device.type,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30}
    else:
        env |= {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return env


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="cifar10")
    p.add_argument("--steps", type=int, default=200, help="steps per mode, warm-up included")
    p.add_argument("--warmup-steps", type=int, default=20, help="untimed steps first (cudnn autotune, compile)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr-warmup", type=int, default=50, help="learning-rate warm-up steps for this check")
    p.add_argument("--modes", default="fp32,tf32,bf16,bf16+compile")
    p.add_argument("--device", default=None)
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny config, 30 steps, fp32 and bf16")
    p.add_argument("--out", type=Path, required=True, help="JSON report")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.steps, args.warmup_steps, args.batch_size = "tiny", 30, 5, 8
        args.lr_warmup, args.modes, args.device = 5, "fp32,bf16", args.device or "cpu"
    if not 0 < args.warmup_steps < args.steps:
        p.error(f"--warmup-steps={args.warmup_steps} must be in (0, --steps={args.steps})")

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    base = get_config(args.config)
    cfg = dataclasses.replace(base, train=dataclasses.replace(
        base.train, batch_size=args.batch_size, warmup=args.lr_warmup, steps=args.steps))
    m = cfg.model
    pool = smooth_images(8 * args.batch_size, m.in_channels, m.image_size, device)

    report = {"config": cfg.name, "batch_size": args.batch_size, **environment(device), "results": []}
    print(f"{cfg.name} at batch {args.batch_size} on {report.get('gpu', device.type)}, torch {torch.__version__}")
    for mode in args.modes.split(","):
        r = run_mode(mode, cfg, device, args.steps, args.warmup_steps, pool)
        report["results"].append(r)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # keep partial results if a later mode dies

    print(f"\n{'mode':<14}{'steps/s':>9}{'images/s':>10}{'warm-up s':>11}{'peak GiB':>10}"
          f"{'first loss':>12}{'last loss':>11}")
    for r in report["results"]:
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['mode']:<14}{r['steps_per_s']:>9.2f}{r['images_per_s']:>10.0f}{r['warmup_s']:>11.1f}{mem:>10}"
              f"{r['first_loss']:>12.4f}{r['last_loss']:>11.4f}")
    bad = [r["mode"] for r in report["results"] if not (r["finite"] and r["last_loss"] < r["first_loss"])]
    if bad:
        print(f"WARNING: the loss did not fall (or was not finite) in: {', '.join(bad)}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
