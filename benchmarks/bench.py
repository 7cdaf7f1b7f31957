"""ddpm_lib against its peer, diffusers' UNet2DModel, on one machine in one run: training and sampling.

For the paper's CIFAR10 network (``--config cifar10``, 35.7M parameters) built twice, as ddpm_lib's
``UNet`` and as diffusers' ``UNet2DModel`` with the identical configuration (same parameter count,
checked), this script measures on the same device, inputs and settings:

* **train**: one step of Algorithm 1 (forward, backward, gradient clipping at 1, Adam, EMA) at the
  recipe's batch 128: steps/s, images/s, peak memory of the timed steps (the warm-up's, which holds
  cuDNN's one-off autotuning of whichever network runs first, apart), and that the loss falls. Ours is
  ``ddpm_lib.train.train_step`` itself; the peer's is the step diffusers' own
  ``train_unconditional`` example takes (``DDPMScheduler.add_noise``, MSE on ε, ``EMAModel``).
  Both get the same precision, memory format (channels_last on CUDA), fused Adam and compile.
* **sample**: 256 images by 1000-step ancestral sampling (Algorithm 2) and by 50-step DDIM (η = 0):
  seconds and peak memory. Ours is ``samplers.sample_loop``;
  the peer's is diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` loop (what ``DDPMPipeline`` runs),
  fed the same β schedule. Where ``sample_steps_timed`` is below the number of steps, that many
  steps are timed and the total is projected (every step costs the same); the JSON marks it.
  On CUDA with compile, also with CUDA graphs: ours replays its whole step from one graph
  (``ddpm_lib.graphed.GraphedSampler``: network, update and on-device noise), the peer its network
  (``CUDAGraphDenoiser`` below), since its scheduler step is host code.
* **activations**: what one training forward pass keeps for its backward, by op (``saved_by_op``), for
  each network and, where the kernels can run (CUDA, or ``TRITON_INTERPRET=1`` on a CPU), ours with the
  fused GroupNorm path. Deterministic, so it explains peak memory on any machine.
* **flops**: FLOPs per image of the forward pass and of forward + backward, counted by
  ``torch.utils.flop_counter`` on the meta device; with them the model FLOP utilisation (MFU)
  against the GPU's dense peak, and the projected time of the 800k-step recipe and of 50k samples,
  beside the paper's TPU v3-8 figures (21 steps/s; 256 images in 17 s; App. B).
* **profile** (``--profile``): GPU kernel time of a few training steps by kind (convolution, matrix
  product, normalization, attention, optimizer, fused Triton, other) against the wall time, to
  tell compute-bound from launch-bound.

Usage::

    python benchmarks/bench.py --out results.json                       # CUDA: everything (~8 min on an H100)
    python benchmarks/bench.py --device cpu --batch-size 8 --out cpu.json   # a CPU at a small batch
    python benchmarks/bench.py --smoke --out /tmp/smoke.json              # CI: tiny model, seconds, checks it works

Speed is never asserted; ``tests/test_bench.py`` runs ``--smoke`` and checks the report's shape.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_lib import fused_norm  # noqa: E402
from ddpm_lib.base import resolve_device  # noqa: E402
from ddpm_lib.configs import Config, ModelConfig, get_config  # noqa: E402
from ddpm_lib.diffusion import GaussianDiffusion  # noqa: E402
from ddpm_lib.graphed import GraphedSampler  # noqa: E402
from ddpm_lib.precision import Autocast, check_precision, fp32_precision, set_fp32_precision  # noqa: E402
from ddpm_lib.pretrained import diffusers_config  # noqa: E402
from ddpm_lib.samplers import ddim_timesteps, sample_loop  # noqa: E402
from ddpm_lib.train import build_training_state, learning_rate, train_step  # noqa: E402
from ddpm_lib.unet import UNet  # noqa: E402

PAPER = {"device": "TPU v3-8", "train_steps_per_s": 21.0, "sample_256_images_s": 17.0,
         "source": "Ho et al. 2020, App. B"}
RECIPE_STEPS = 800_000
FID_SAMPLES = 50_000
# Dense peak TFLOP/s by the vendors' datasheets (SXM parts), for MFU. fp32 = CUDA cores, no TF32.
PEAK_TFLOPS = {  # the first name found in the GPU's name wins
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


# --------------------------------------------------------------------------- the peer


def build_peer(mc: ModelConfig) -> nn.Module:
    import diffusers

    return diffusers.UNet2DModel(**diffusers_config(mc))


class PeerDenoiser(nn.Module):
    """The peer as ε_θ(x, t) → tensor (UNet2DModel returns an output object)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t).sample


def peer_scheduler(kind: str, diffusion: GaussianDiffusion):
    """diffusers' DDPM or DDIM scheduler holding exactly our β (``trained_betas``), ε-prediction,
    x̂_0 clipped to [−1, 1], σ_t² = β_t for DDPM (the paper's CIFAR10 choice)."""
    import diffusers

    betas = diffusion.betas.numpy()
    common = dict(num_train_timesteps=len(betas), trained_betas=betas, clip_sample=True, prediction_type="epsilon")
    if kind == "ddpm":
        return diffusers.DDPMScheduler(variance_type="fixed_large", **common)
    return diffusers.DDIMScheduler(set_alpha_to_one=False, **common)


# --------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def smooth_images(n: int, channels: int, size: int, device: torch.device, seed: int = 0) -> Tensor:
    """n deterministic smooth random images, uint8 [n, C, size, size]: 4×4 noise upsampled bicubically."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    up = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (up.clamp(0, 1) * 255).round().to(torch.uint8).to(device)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight N(0, 0.02²): the fresh model's zero-initialized layers would make sampling trivial."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@dataclasses.dataclass(frozen=True)
class Mode:
    """``PRECISION[+compile[+cudagraphs][+nchw]]``: fp32 / tf32 / bf16 autocast; ``compile``:
    ``torch.compile`` of the network; ``cudagraphs``: compiled with ``mode="reduce-overhead"`` (the
    compiled forward and backward replayed from CUDA graphs; training only); ``nchw``: keep the
    default NCHW layout instead of channels_last (ours only, for comparison)."""

    precision: str
    compile: bool = False
    cudagraphs: bool = False
    nchw: bool = False


def parse_mode(mode: str) -> Mode:
    precision, *extras = mode.split("+")
    check_precision(precision)
    unknown = set(extras) - {"compile", "cudagraphs", "nchw"}
    if unknown or len(set(extras)) != len(extras) or ("cudagraphs" in extras and "compile" not in extras):
        raise ValueError(f"mode {mode!r}: expected PRECISION[+compile[+cudagraphs][+nchw]]")
    return Mode(precision, "compile" in extras, "cudagraphs" in extras, "nchw" in extras)


class ContiguousInput(nn.Module):
    """Runs ``net`` on an NCHW-contiguous input (so convolutions stay in NCHW)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x.contiguous(), t)


def reset_compiler(compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()


def environment(device: torch.device) -> dict:
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "python": platform.python_version(), "device": device.type}
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "multiprocessors": props.multi_processor_count}
    else:
        env |= {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return env


def peak_tflops(env: dict, precision: str) -> float | None:
    for name, peaks in PEAK_TFLOPS.items():
        if name in (env.get("gpu") or ""):
            return peaks[precision]
    return None


# --------------------------------------------------------------------------- FLOPs


def count_flops(mc: ModelConfig) -> dict:
    """FLOPs per image (forward; forward + backward) of ours and the peer, on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for who in ("ours", "peer"):
        with torch.device("meta"):
            net = UNet.from_config(mc) if who == "ours" else PeerDenoiser(build_peer(mc))
            x = torch.randn(1, mc.in_channels, mc.image_size, mc.image_size)
            t = torch.zeros(1, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter:
            net(x, t)
        fwd = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            net(x, t).pow(2).mean().backward()
        out[who] = {"forward_gflop_per_image": fwd / 1e9, "train_gflop_per_image": counter.get_total_flops() / 1e9,
                    "params": sum(p.numel() for p in net.parameters())}
    return out


# --------------------------------------------------------------------------- training


class PeerTrainer:
    """The training step diffusers' ``examples/unconditional_image_generation`` takes, with our settings."""

    def __init__(self, cfg: Config, device: torch.device, precision: str, compile: bool, cudagraphs: bool = False):
        """``cudagraphs``: the network compiled with ``mode="reduce-overhead"`` (its forward and backward replayed
        as CUDA graphs), as ours is in the same mode; each step marks its start, as ``train_step`` does."""
        from diffusers.training_utils import EMAModel

        tc = cfg.train
        set_fp32_precision(device, precision)
        torch.manual_seed(tc.seed)
        self.unet = build_peer(cfg.model).to(device)
        if device.type == "cuda":
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.ema = EMAModel(self.unet.parameters(), decay=tc.ema_decay, foreach=True)
        self.ema.to(device)
        self.opt = torch.optim.Adam(self.unet.parameters(), lr=tc.lr, fused=True if device.type == "cuda" else None)
        self.sched = peer_scheduler("ddpm", GaussianDiffusion.from_config(cfg.diffusion))
        mode = "reduce-overhead" if cudagraphs else None
        self.net = torch.compile(self.unet, mode=mode) if compile else self.unet
        self.cudagraphs = cudagraphs and compile and device.type == "cuda"
        self.cfg, self.device, self.precision = cfg, device, precision
        self.gen = torch.Generator(device=device).manual_seed(tc.seed)

    def step(self, images: Tensor, step: int) -> Tensor:
        tc, dev = self.cfg.train, self.device
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(step, tc.lr, tc.warmup)
        x0 = images.to(dev).float() / 127.5 - 1.0
        if dev.type == "cuda":
            x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = torch.randn(x0.shape, generator=self.gen, device=dev)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (x0.shape[0],), generator=self.gen, device=dev)
        x_t = self.sched.add_noise(x0, noise, t)
        if self.cudagraphs:  # a new iteration: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            pred = self.net(x_t, t).sample
        loss = F.mse_loss(pred.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.unet.parameters(), tc.grad_clip)
        self.opt.step()
        self.ema.step(self.unet.parameters())
        return loss.detach()


def bench_train(who: str, cfg: Config, device: torch.device, mode: str, steps: int, warmup: int,
                pool: Tensor, profile_steps: int = 0) -> dict:
    m = parse_mode(mode)
    precision, compile = m.precision, m.compile
    reset_memory(device)
    b = cfg.train.batch_size
    if who == "ours":
        how = "reduce-overhead" if m.cudagraphs else compile  # the library's own CUDA-graph option
        set_fp32_precision(device, precision)  # what train() sets for its run (precision.training_backends)
        state = build_training_state(cfg, device, precision=precision, compile=False if m.nchw else how)
        if m.nchw:  # a variant for comparison only: the library always uses channels_last on CUDA
            if m.cudagraphs:
                raise ValueError(f"mode {mode!r}: nchw is measured without CUDA graphs")
            state.model.to(memory_format=torch.contiguous_format)
            state.ema.to(memory_format=torch.contiguous_format)
            net: nn.Module = ContiguousInput(state.model)
            state.net = Autocast(torch.compile(net) if compile else net, device.type,
                                 torch.bfloat16 if precision == "bf16" else None)

        def step_fn(imgs: Tensor, i: int) -> Tensor:
            return train_step(state, imgs, i)[0]
    else:
        if m.nchw:
            raise ValueError(f"mode {mode!r} is measured for ours only")
        trainer = PeerTrainer(cfg, device, precision, compile, cudagraphs=m.cudagraphs)
        step_fn = trainer.step
    batches = [pool[(i * b) % (pool.shape[0] - b + 1):][:b] for i in range(8)]
    losses, t0 = [], time.perf_counter()
    for i in range(warmup):
        losses.append(step_fn(batches[i % 8], i))
    sync(device)
    # The peak of building and warming up (cuDNN's autotuner tries algorithms with large workspaces, once per
    # process and shape, so it falls on whichever network runs first), apart from the steady steps' peak.
    warmup_peak = peak_memory_gib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    for i in range(warmup, steps):
        losses.append(step_fn(batches[i % 8], i))
    sync(device)
    elapsed = time.perf_counter() - t1
    loss = torch.stack(losses).float().cpu()
    k = max(1, steps // 5)
    result = {
        "part": "train", "who": who, "mode": mode, "batch_size": b, "timed_steps": steps - warmup,
        "steps_per_s": (steps - warmup) / elapsed, "images_per_s": (steps - warmup) * b / elapsed,
        "warmup_s": t1 - t0, "first_loss": loss[:k].mean().item(), "last_loss": loss[-k:].mean().item(),
        "finite": bool(torch.isfinite(loss).all()), "peak_memory_gib": peak_memory_gib(device),
        "warmup_peak_memory_gib": warmup_peak,
    }
    if profile_steps:
        try:
            result["profile"] = profile(lambda i: step_fn(batches[i % 8], steps + i), profile_steps, device)
        except Exception as e:  # noqa: BLE001 - the timing stands without its profile
            result["profile"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    reset_compiler(compile)
    return result


# --------------------------------------------------------------------------- activations


def _node_tensors(node) -> list[Tensor]:
    """The tensors one autograd node holds for its backward: a built-in op's ``_saved_*`` attributes, or a
    custom ``autograd.Function``'s ``saved_tensors``."""
    found = []
    for name in dir(node):
        if name.startswith("_saved_"):
            value = getattr(node, name)
            found += [v for v in (value if isinstance(value, (tuple, list)) else [value]) if isinstance(v, Tensor)]
    if not found and hasattr(node, "saved_tensors"):
        found = [v for v in node.saved_tensors if isinstance(v, Tensor)]
    return found


def saved_by_op(out: Tensor, params: set[int]) -> dict[str, int]:
    """Bytes held for the backward of ``out``'s graph, by the op that holds them (autograd node name without
    ``Backward`` and its number): every node reached from ``out.grad_fn``, each storage counted once, under the
    first op of the forward pass that kept it; the storages in ``params`` (the weights) not at all."""
    nodes, stack = {}, [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes[node] = node._sequence_nr()  # the order in which the forward pass made the nodes
            stack.extend(fn for fn, _ in node.next_functions)
    seen, by_op = set(params), {}
    for node in sorted(nodes, key=nodes.get):
        op = re.sub(r"Backward\d*$", "", node.name().rsplit(".", 1)[-1])
        for v in _node_tensors(node):
            storage = v.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                by_op[op] = by_op.get(op, 0) + storage.nbytes()
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


@contextlib.contextmanager
def fused_path(on: bool) -> Iterator[None]:
    """``norm_act`` takes the fused kernels (``on``) or the plain ops, whatever ``DDPM_LIB_FUSED_NORM`` says; on
    the CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` before the import)."""
    saved = fused_norm.enabled
    fused_norm.enabled = lambda x: on
    try:
        yield
    finally:
        fused_norm.enabled = saved


def fused_runnable(device: torch.device) -> bool:
    """Whether the fused kernels can run here: Triton on CUDA, or Triton's interpreter on the CPU."""
    return fused_norm.triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def bench_activations(who: str, mc: ModelConfig, device: torch.device, precision: str, batch: int) -> dict:
    """What one training forward pass at ``batch`` keeps for its backward (the activation memory of training,
    without the weights, gradients and optimizer state, which are the same for both networks), by op.
    Deterministic, so it can be compared on any device; on CUDA the ops are CUDA's (attention's saved
    tensors depend on the backend chosen). With the fused GroupNorm path on (``fused_norm.enabled``) ours
    keeps only each norm's input and statistics, where the plain ops keep the norm's output for SiLU and a
    dropout mask besides."""
    torch.manual_seed(0)
    raw = UNet.from_config(mc) if who == "ours" else build_peer(mc)
    raw = raw.to(device).train()
    if device.type == "cuda":
        raw = raw.to(memory_format=torch.channels_last)
    net: nn.Module = raw if who == "ours" else PeerDenoiser(raw)
    net = Autocast(net, device.type, torch.bfloat16 if precision == "bf16" else None)
    x = torch.randn(batch, mc.in_channels, mc.image_size, mc.image_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device=device)
    with fp32_precision(precision):
        out = net(x, t)
    by_op = saved_by_op(out, {q.untyped_storage().data_ptr() for q in raw.parameters()})
    total = sum(by_op.values())
    fused = who == "ours" and fused_norm.enabled(x)
    return {"part": "activations", "who": who, "mode": precision, "fused_norm": fused, "batch_size": batch,
            "saved_gib": total / 2**30, "saved_mib_per_image": total / 2**20 / batch,
            "by_op_mib": {k: round(v / 2**20, 3) for k, v in by_op.items()}, "finite": bool(torch.isfinite(out).all())}


# --------------------------------------------------------------------------- profile

KERNEL_KINDS = [  # first match wins, on the lower-cased kernel name
    ("attention", r"flash|fmha|attention|efficient_attention|softmax"),
    ("optimizer", r"adam|multi_tensor|foreach|lerp|_amp_|norm_kernel|clip"),
    ("normalization", r"group_norm|groupnorm|welford|batch_norm|layer_norm|rowwisemoments|computefusedparams|"
                      r"computeinternalgradients|compute1dbackward"),
    ("convolution", r"conv|cudnn|implicit|dgrad|wgrad|fprop|xmma|nhwc|nchw|winograd|im2col|cutlass"),
    ("matrix product", r"gemm|matmul|sm90_|sm80_|cublas|splitk"),
    ("fused triton", r"^triton_"),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def profile(step: Callable[[int], object], n: int, device: torch.device) -> dict:
    """Kernel time by kind over ``n`` steps, per step, against the wall time per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        sync(device)
        wall = time.perf_counter() - t0
    kinds: dict[str, float] = {}
    top = []
    launches = 0
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != DeviceType.CUDA:  # operators; their kernels are listed apart
            continue
        # ranges on the GPU's timeline that are not kernels: profiler annotations (``Optimizer.step#…``)
        # and operator ranges; counting them would count their kernels twice
        if getattr(evt, "is_user_annotation", False) or evt.key.startswith("aten::") or "#" in evt.key:
            continue
        us = evt.self_device_time_total
        if us <= 0:
            continue
        launches += evt.count
        kinds[kernel_kind(evt.key)] = kinds.get(kernel_kind(evt.key), 0.0) + us
        top.append((us, evt.count, evt.key))
    top.sort(reverse=True)
    busy_ms = sum(kinds.values()) / 1e3 / n
    if busy_ms > wall * 1e3 / n * 1.02:
        print(f"WARNING: the profile's kernel time ({busy_ms:.1f} ms) exceeds the wall time "
              f"({wall * 1e3 / n:.1f} ms) per step: some ranges are counted twice", flush=True)
    return {
        "steps": n, "wall_ms_per_step": wall * 1e3 / n, "gpu_busy_ms_per_step": busy_ms,
        "kernels_per_step": launches / n,
        "ms_per_step_by_kind": {k: round(v / 1e3 / n, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"ms_per_step": round(us / 1e3 / n, 3), "calls_per_step": c / n, "name": name[:120]}
                        for us, c, name in top[:15]],
    }


# --------------------------------------------------------------------------- sampling


class CUDAGraphDenoiser(nn.Module):
    """``net(x, t)`` for one fixed batch shape, replayed from a CUDA graph (``torch.cuda.graphs``).

    Sampling calls the network on a batch of one shape T times; the graph records its few hundred
    kernel launches once and replays them with one call, so a step costs the kernels' time alone.

    ``x_example`` / ``t_example`` fix the shapes, dtypes and device of the inputs (the values do not
    matter). Calls with another shape, dtype or device raise ValueError rather than silently running
    un-graphed. The returned tensor is a copy, so the caller may keep it across calls.
    """

    def __init__(self, net: Callable[[Tensor, Tensor], Tensor], x_example: Tensor, t_example: Tensor,
                 warmup: int = 3):
        super().__init__()
        if x_example.device.type != "cuda" or t_example.device != x_example.device:
            raise ValueError(f"CUDA graphs need CUDA inputs on one device, got x on {x_example.device} "
                             f"and t on {t_example.device}")
        self.net = net
        self.static_x, self.static_t = x_example.clone(), t_example.clone()
        side = torch.cuda.Stream(device=x_example.device)
        side.wait_stream(torch.cuda.current_stream(x_example.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):  # lazy initialization, cuDNN autotuning, compile: not in the graph
                net(self.static_x, self.static_t)
        torch.cuda.current_stream(x_example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_out = net(self.static_x, self.static_t)

    def _check(self, name: str, got: Tensor, want: Tensor) -> None:
        if got.shape != want.shape or got.dtype != want.dtype or got.device != want.device:
            raise ValueError(f"the graph was captured for {name} {tuple(want.shape)} {want.dtype} on {want.device}, "
                             f"got {tuple(got.shape)} {got.dtype} on {got.device}")

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self._check("x", x, self.static_x)
        self._check("t", t, self.static_t)
        self.static_x.copy_(x)
        self.static_t.copy_(t)
        self.graph.replay()
        return self.static_out.clone()




def ours_sampler(model: nn.Module, diffusion: GaussianDiffusion, kind: str, steps: int):
    """(run(x_T, generator, k) → x after the first k of the sampler's steps, total step count)."""
    if kind == "ddpm":
        def run(x_T: Tensor, gen: torch.Generator, k: int) -> Tensor:
            return sample_loop(diffusion, model, x_T.shape, generator=gen, x_T=x_T, t_start=k - 1, device=x_T.device)
        return run, diffusion.num_timesteps

    tau = ddim_timesteps(diffusion.num_timesteps, steps)

    def run_ddim(x_T: Tensor, gen: torch.Generator, k: int) -> Tensor:
        return sample_loop(diffusion, model, x_T.shape, sampler="ddim", timesteps=tau[:k], generator=gen, x_T=x_T,
                           device=x_T.device)
    return run_ddim, len(tau)


def ours_graphed_sampler(model: nn.Module, diffusion: GaussianDiffusion, kind: str, steps: int):
    """As ``ours_sampler``, each step replayed from one CUDA graph (``graphed.GraphedSampler``: network, update
    and the on-device noise in one graph), the graph recorded at the first call."""
    made: dict[str, GraphedSampler] = {}

    def run(x_T: Tensor, gen: torch.Generator, k: int) -> Tensor:
        if "sampler" not in made:
            made["sampler"] = GraphedSampler(diffusion, model, x_T.shape, sampler=kind,
                                             steps=None if kind == "ddpm" else steps, device=x_T.device)
        keys = torch.arange(x_T.shape[0], dtype=torch.int64)
        return made["sampler"](keys, x_T=x_T, first=k)
    return run, diffusion.num_timesteps if kind == "ddpm" else len(ddim_timesteps(diffusion.num_timesteps, steps))


def peer_sampler(model: nn.Module, diffusion: GaussianDiffusion, kind: str, steps: int):
    sched = peer_scheduler(kind, diffusion)
    sched.set_timesteps(diffusion.num_timesteps if kind == "ddpm" else steps)
    timesteps = [int(t) for t in sched.timesteps]

    def run(x_T: Tensor, gen: torch.Generator, k: int) -> Tensor:
        x = x_T
        for t in timesteps[:k]:
            eps = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
            extra = {"eta": 0.0} if kind == "ddim" else {}
            x = sched.step(eps, t, x, generator=gen, **extra).prev_sample
        return x
    return run, len(timesteps)


def time_samplers(who: str, net: nn.Module, diffusion: GaussianDiffusion, x_T: Tensor, mode: str,
                  ddim_steps: int, timed_steps: int | None, make: Callable | None = None) -> list[dict]:
    """Time 1000-step ancestral sampling and DDIM from x_T with ``net``; one row each. ``make``: the loop
    (default ``ours_sampler`` or ``peer_sampler``)."""
    device, rows = x_T.device, []
    make = make or (ours_sampler if who == "ours" else peer_sampler)
    for kind, steps in (("ddpm", diffusion.num_timesteps), ("ddim", ddim_steps)):
        run, total = make(net, diffusion, kind, steps)
        gen = torch.Generator(device=device).manual_seed(2)
        t0 = time.perf_counter()
        with torch.no_grad():
            run(x_T, gen, min(3, total))  # warm-up: cuDNN autotuning, compilation
        sync(device)
        warm = time.perf_counter() - t0
        k = total if not timed_steps else min(timed_steps, total)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = run(x_T, gen, k)
        sync(device)
        elapsed = time.perf_counter() - t0
        rows.append({
            "part": "sample", "who": who, "mode": mode, "sampler": kind, "steps": total, "images": x_T.shape[0],
            "timed_steps": k, "projected": k < total, "seconds": elapsed * total / k, "ms_per_step": elapsed * 1e3 / k,
            "warmup_s": warm, "finite": bool(torch.isfinite(x).all()), "peak_memory_gib": peak_memory_gib(device),
        })
    return rows


def bench_sample(who: str, mc: ModelConfig, diffusion: GaussianDiffusion, device: torch.device, mode: str,
                 n: int, ddim_steps: int, timed_steps: int | None, graph: bool = False) -> list[dict]:
    """Ancestral (all T steps) and ``ddim_steps``-step DDIM sampling of n images: two result rows, and
    with ``graph`` two more with the same (compiled) network replayed from a CUDA graph."""
    m = parse_mode(mode)
    if m.cudagraphs or m.nchw:
        raise ValueError(f"mode {mode!r}: sampling takes PRECISION[+compile] (CUDA graphs: --graphs)")
    precision, compile = m.precision, m.compile
    reset_memory(device)
    set_fp32_precision(device, precision)
    torch.manual_seed(0)
    raw = UNet.from_config(mc) if who == "ours" else build_peer(mc)
    raw = randomize_(raw).to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        raw = raw.to(memory_format=torch.channels_last)
    net: nn.Module = raw if who == "ours" else PeerDenoiser(raw)
    if compile:
        net = torch.compile(net)
    net = Autocast(net, device.type, torch.bfloat16 if precision == "bf16" else None)
    shape = (n, mc.in_channels, mc.image_size, mc.image_size)
    x_T = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(1)).to(device)
    rows = time_samplers(who, net, diffusion, x_T, mode, ddim_steps, timed_steps)
    if graph:  # ours: the whole step in one graph (the library's GraphedSampler); the peer: its network
        try:
            if who == "ours":
                rows += time_samplers(who, net, diffusion, x_T, mode + "+graph", ddim_steps, timed_steps,
                                      make=ours_graphed_sampler)
            else:
                graphed = CUDAGraphDenoiser(net, x_T, torch.zeros(n, dtype=torch.long, device=device))
                rows += time_samplers(who, graphed, diffusion, x_T, mode + "+graph", ddim_steps, timed_steps)
                del graphed
        except Exception as e:  # noqa: BLE001 - keep the rows measured without graphs
            rows.append({"part": "sample", "who": who, "mode": mode + "+graph", "error": f"{type(e).__name__}: {e}"})
    del net, raw
    reset_compiler(compile)
    return rows


# --------------------------------------------------------------------------- report


def add_derived(report: dict) -> None:
    """Ratios ours / peer, MFU, and projections beside the paper's figures."""
    flops = report.get("flops", {})
    res = [r for r in report["results"] if "error" not in r]
    for r in res:
        peer = next((p for p in res if p["who"] == "peer" and p["part"] == r["part"] and p["mode"] == r["mode"]
                     and p.get("sampler") == r.get("sampler")), None)
        if r["who"] == "ours" and peer:
            if r["part"] == "train":
                r["speedup_vs_peer"] = r["steps_per_s"] / peer["steps_per_s"]
            elif r["part"] == "sample":
                r["speedup_vs_peer"] = peer["seconds"] / r["seconds"]
            for key, name in (("peak_memory_gib", "memory_vs_peer"), ("saved_gib", "activations_vs_peer"),
                              ("warmup_peak_memory_gib", "warmup_memory_vs_peer")):
                if r.get(key) and peer.get(key):
                    r[name] = r[key] / peer[key]
        if r["part"] == "activations":
            continue
        f = flops.get(r["who"])
        precision = r["mode"].split("+")[0]
        peak = peak_tflops(report, precision)
        if r["part"] == "train":
            r["recipe_hours"] = RECIPE_STEPS / r["steps_per_s"] / 3600
            if f:
                r["achieved_tflops"] = r["images_per_s"] * f["train_gflop_per_image"] / 1e3
        else:
            r["fid_50k_hours"] = r["seconds"] * FID_SAMPLES / r["images"] / 3600
            if f:
                r["achieved_tflops"] = r["images"] * f["forward_gflop_per_image"] / (r["ms_per_step"] / 1e3) / 1e3
        if f and peak:
            r["mfu"] = r["achieved_tflops"] / peak


def print_table(report: dict) -> None:
    print(f"\n{'part':<7}{'who':<6}{'mode':<20}{'sampler':<9}{'steps/s | s':>12}{'peak GiB':>10}{'TFLOP/s':>9}"
          f"{'ours/peer':>10}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['part']:<7}{r['who']:<6}{r['mode']:<20}failed: {r['error'][:60]}")
            continue
        if r["part"] == "activations":
            ratio = f"{r['activations_vs_peer']:.2f}x" if "activations_vs_peer" in r else ""
            mode = r["mode"] + ("+fused" if r["fused_norm"] else "")
            print(f"{'saved':<7}{r['who']:<6}{mode:<20}{'':<9}{r['saved_mib_per_image']:>9.1f}MiB{'':>19}{ratio:>10}")
            continue
        speed = (f"{r['steps_per_s']:.2f}" if r["part"] == "train"
                 else f"{r['seconds']:.2f}" + ("*" if r["projected"] else ""))
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        tf = f"{r['achieved_tflops']:.1f}" if "achieved_tflops" in r else "-"
        ratio = f"{r['speedup_vs_peer']:.2f}x" if "speedup_vs_peer" in r else ""
        print(f"{r['part']:<7}{r['who']:<6}{r['mode']:<20}{r.get('sampler', ''):<9}{speed:>12}{mem:>10}{tf:>9}"
              f"{ratio:>10}")
    print("(* projected from the timed steps; train: steps/s, sample: seconds for all images; saved: what one "
          "training forward keeps for the backward, per image)")


def markdown_tables(report: dict) -> str:
    """The report as two Markdown tables (training; sampling), ours beside the peer, for README."""
    res = [r for r in report["results"] if "error" not in r]
    peer = {(r["part"], r["mode"], r.get("sampler")): r for r in res if r["who"] == "peer"}

    def gib(r: dict | None) -> str:
        return "–" if r is None or r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"

    def mfu(r: dict) -> str:
        return f"{r['achieved_tflops']:.0f}" + (f" ({r['mfu']:.0%})" if "mfu" in r else "")

    where = report.get("gpu") or f"{report.get('cpu')} CPU, {report.get('threads')} threads"
    batch = next((r["batch_size"] for r in res if r["part"] == "train"), 0)
    lines = [f"{report['config']} on {where}, torch {report['torch']}, diffusers {report['diffusers']}, "
             f"{report['date']}", "",
             f"| training, batch {batch} | ours steps/s | peer steps/s | ours/peer | peak GiB ours / peer | "
             "TFLOP/s (MFU) | 800k steps |", "|---|---|---|---|---|---|---|"]
    for r in res:
        if r["part"] == "train" and r["who"] == "ours":
            p = peer.get(("train", r["mode"], None))
            lines.append(f"| {r['mode']} | {r['steps_per_s']:.2f} | "
                         + (f"{p['steps_per_s']:.2f} | {r['speedup_vs_peer']:.2f}× | " if p else "– | – | "))
            lines[-1] += f"{gib(r)} / {gib(p)} | {mfu(r)} | {r['recipe_hours']:.1f} h |"
    lines += ["", "| sampling | sampler | images | ours s | peer s | peer/ours | peak GiB ours / peer | "
              "TFLOP/s (MFU) | 50k images |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        if r["part"] == "sample" and r["who"] == "ours":
            p = peer.get(("sample", r["mode"], r["sampler"]))
            star = "*" if r["projected"] else ""
            name = f"{r['steps']}-step {'DDPM' if r['sampler'] == 'ddpm' else 'DDIM'}"
            lines.append(f"| {r['mode']} | {name} | {r['images']} | {r['seconds']:.2f}{star} | "
                         + (f"{p['seconds']:.2f}{'*' if p['projected'] else ''} | {r['speedup_vs_peer']:.2f}× | "
                            if p else "– | – | ")
                         + f"{gib(r)} / {gib(p)} | {mfu(r)} | {r['fid_50k_hours']:.2f} h |")
    lines.append("")
    lines.append("\\* projected from the steps timed (every step costs the same).")
    acts = [r for r in res if r["part"] == "activations"]
    if acts:
        lines += ["", "| kept for the backward | who | MiB per image | ours/peer | largest ops (MiB per image) |",
                  "|---|---|---|---|---|"]
        for r in acts:
            top = ", ".join(f"{k} {v / r['batch_size']:.1f}" for k, v in list(r["by_op_mib"].items())[:4])
            ratio = f"{r['activations_vs_peer']:.2f}×" if "activations_vs_peer" in r else "–"
            lines.append(f"| {r['mode']} | {r['who']}{' (fused norm)' if r['fused_norm'] else ''} | "
                         f"{r['saved_mib_per_image']:.1f} | {ratio} | {top} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="cifar10")
    p.add_argument("--device", default=None)
    p.add_argument("--parts", default="flops,activations,train,sample",
                   help="comma list of flops, activations, train, sample")
    p.add_argument("--modes", default=None, help="comma list of fp32, tf32, bf16 with optional +compile "
                   "(default: bf16+compile,bf16,fp32 on CUDA; fp32,bf16 on CPU)")
    p.add_argument("--who", default="ours,peer")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--activation-batch", type=int, default=None,
                   help="batch of the activation count (default: the training batch)")
    p.add_argument("--train-steps", type=int, default=50, help="per mode, warm-up included")
    p.add_argument("--train-warmup", type=int, default=15, help="untimed steps first (autotuning, compile)")
    p.add_argument("--lr-warmup", type=int, default=20, help="learning-rate warm-up for the benchmark's steps")
    p.add_argument("--sample-images", type=int, default=256)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--sample-steps-timed", default=None,
                   help="MODE=K,...: time K steps and project (default: all steps on CUDA in compile modes, "
                        "100 in other CUDA modes, 3 on CPU)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="also sample with CUDA graphs in compile modes (default: on for CUDA)")
    p.add_argument("--profile", type=int, default=0, help="profile this many training steps per run")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU, a few steps: checks that it works")
    p.add_argument("--out", type=Path, help="JSON report (rewritten after every measurement)")
    p.add_argument("--markdown", type=Path, metavar="JSON", help="print the tables of an existing report and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown_tables(json.loads(args.markdown.read_text())))
        return {}
    if args.out is None:
        p.error("--out is required")
    if args.smoke:
        args.config, args.device, args.batch_size, args.train_steps, args.train_warmup = "tiny", "cpu", 4, 4, 2
        args.sample_images, args.ddim_steps, args.lr_warmup, args.profile = 2, 5, 2, 2
        args.modes = args.modes or "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0 < args.train_warmup < args.train_steps:
        p.error(f"--train-warmup={args.train_warmup} must be in (0, --train-steps={args.train_steps})")
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as a training run sets it, for both networks
    cuda = device.type == "cuda"
    # On CUDA the headline mode first, so that a run cut short still has it.
    modes = (args.modes or ("bf16+compile,bf16,fp32" if cuda else "fp32,bf16")).split(",")
    for m in modes:
        parse_mode(m)
    timed = {m: (None if cuda and "compile" in m else 100 if cuda else 3) for m in modes}
    if args.smoke:
        timed = dict.fromkeys(modes, 3)
    for item in (args.sample_steps_timed or "").split(","):
        if item:
            m, _, k = item.partition("=")
            timed[m] = int(k) or None
    graphs = cuda if args.graphs is None else args.graphs
    if graphs and not cuda:
        p.error("--graphs needs a CUDA device")
    who = args.who.split(",")
    parts = args.parts.split(",")
    if "peer" in who:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            p.error("the peer needs diffusers (pip install diffusers), or pass --who ours")

    base = get_config(args.config)
    cfg = dataclasses.replace(base, train=dataclasses.replace(
        base.train, batch_size=args.batch_size, warmup=args.lr_warmup, steps=args.train_steps))
    mc = cfg.model
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    report = {"config": cfg.name, **environment(device), "paper": PAPER, "results": []}

    def attempt(what: str, fn: Callable[[], list[dict]]) -> None:
        """One measurement; a failure (say, a compiler error in one mode) is recorded, not fatal."""
        try:
            rows = fn()
        except Exception as e:  # noqa: BLE001 - the report says what failed and the run goes on
            if args.smoke:
                raise
            report.setdefault("errors", []).append({"what": what, "error": f"{type(e).__name__}: {e}"[:2000]})
            print(f"FAILED {what}: {type(e).__name__}: {e}", flush=True)
            reset_memory(device)
            torch._dynamo.reset()
            return
        report["results"].extend(rows)
        for r in rows:
            if "error" in r:
                print(f"FAILED {r['part']} {r['who']} {r['mode']}: {r['error']}", flush=True)
            elif r["part"] == "activations":
                print(f"activations {r['who']}{' fused' if r['fused_norm'] else ''} {r['mode']}: "
                      f"{r['saved_mib_per_image']:.1f} MiB per image", flush=True)
            elif r["part"] == "train":
                print(f"train {r['who']} {r['mode']}: {r['steps_per_s']:.2f} steps/s, loss {r['first_loss']:.3f} "
                      f"→ {r['last_loss']:.3f}", flush=True)
            else:
                print(f"sample {r['who']} {r['mode']} {r['sampler']}: {r['seconds']:.2f} s"
                      f"{' (projected)' if r['projected'] else ''}", flush=True)
        save()

    def save() -> None:
        add_derived(report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{cfg.name} on {report.get('gpu', device.type)}, torch {torch.__version__}, "
          f"diffusers {report['diffusers']}", flush=True)
    if "flops" in parts:
        report["flops"] = count_flops(mc)
        if "peer" in report["flops"] and report["flops"]["peer"]["params"] != report["flops"]["ours"]["params"]:
            raise RuntimeError(f"the peer is not the same network: {report['flops']}")
        print(json.dumps(report["flops"]), flush=True)
        save()
    if "activations" in parts:
        precisions = list(dict.fromkeys(parse_mode(m).precision for m in modes))
        for precision in precisions:
            runs = [(w, False) for w in who] + ([("ours", True)] if "ours" in who and fused_runnable(device) else [])
            for w, fused in runs:
                def count(w=w, fused=fused, precision=precision) -> list[dict]:
                    with fused_path(fused):
                        return [bench_activations(w, mc, device, precision, args.activation_batch or args.batch_size)]
                attempt(f"activations {w} {precision}{' fused' if fused else ''}", count)
    pool = smooth_images(8 * args.batch_size, mc.in_channels, mc.image_size, device)
    for mode in modes:
        if "train" in parts:
            for w in who:
                if w == "peer" and "nchw" in mode.split("+"):
                    continue  # a variant of ours, compared with ours
                attempt(f"train {w} {mode}", lambda w=w, mode=mode: [bench_train(
                    w, cfg, device, mode, args.train_steps, args.train_warmup, pool, args.profile)])
        if "sample" in parts and not ({"cudagraphs", "nchw"} & set(mode.split("+"))):
            for w in who:
                g = graphs and "compile" in mode
                attempt(f"sample {w} {mode}", lambda w=w, mode=mode, g=g: bench_sample(
                    w, mc, diffusion, device, mode, args.sample_images, args.ddim_steps, timed[mode], graph=g))
    save()
    print_table(report)
    bad = [f"{r['who']} {r['mode']}" for r in report["results"]
           if "error" not in r and (not r["finite"] or (r["part"] == "train" and not math.isfinite(r["last_loss"])))]
    if bad:
        print(f"WARNING: non-finite results in: {', '.join(bad)}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
