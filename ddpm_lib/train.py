"""Algorithm 1 at the paper's scale (§4, App. B): the training loop, visible in one file.

    repeat
        x_0 ~ q(x_0);  t ~ Uniform({1, …, T});  ε ~ N(0, I)
        take a gradient step on ∇_θ ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖²
    until converged

The CIFAR10 recipe (``configs.get_config("cifar10").train``): Adam, lr 2e-4 after a linear
warm-up of 5000 steps, gradients clipped to global norm 1, batch 128, random horizontal flips, an
exponential moving average (EMA) of the weights with decay 0.9999, 800k steps. The loss itself
(``GaussianDiffusion.training_losses``) is L_simple, eq. 14.

Engineering, all visible below: CUDA when available; ``precision`` "fp32" (true fp32), "tf32"
(fp32 weights, TF32 matmuls on CUDA) or "bf16" (autocast of the network's forward; the loss,
the master weights, Adam and the EMA stay in fp32); optional ``torch.compile``, with CUDA graphs
through ``compile="reduce-overhead"``; channels_last and fused Adam on CUDA; several GPUs with
``torchrun`` and DistributedDataParallel (the batch size is
the *global* batch); safetensors checkpoints (``checkpoint.py``) from which a run resumes exactly.

Determinism: every random number of step s comes from a generator seeded by (seed, s): the data
order and flips (``data.batch_indices``, ``data.flip_mask``), the timesteps t and noise ε of the
whole global batch (each process takes its slice), and dropout (seeded by (seed, s, rank)). A run
stopped at step k and resumed therefore repeats bit for bit what the uninterrupted run does, and
two processes with half the batch each compute what one process computes with all of it.

Class-conditional models (``ModelConfig.num_classes``, for classifier-free guidance, Ho & Salimans
2022) also read each image's label; with probability ``TrainConfig.label_drop`` a label is replaced by
the null label ∅, drawn for the whole global batch from (seed, "label_drop", step) like the noise, so
the one network learns both ε(x_t, y) and ε(x_t, ∅). Unconditional training draws nothing extra.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import functools
import io
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checkpoint as ckpt_io
from .configs import Config, get_config
from .data import TensorImages, derive_seed, iterate_batches, make_dataset, to_model_range
from .diffusion import GaussianDiffusion, check_choice
from .precision import Autocast, check_precision, set_fp32_precision
from .unet import UNet

# torch.compile modes for ``compile=``; the second pair also replays CUDA graphs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; training stopped, no checkpoint written."""


# --------------------------------------------------------------------------- set-up helpers


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or "auto": CUDA if available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[DistInfo, torch.device, bool]:
    """Join the process group described by torchrun's environment (``env://``), if any.

    Returns (info, this process's device, whether this call created the group). On CUDA each
    process takes GPU ``LOCAL_RANK`` and talks NCCL; on CPU it talks Gloo. The collective timeout
    is an hour, so other processes can wait while the main one samples a grid or writes a checkpoint.
    """
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", 0)))
    elif int(env.get("WORLD_SIZE", "1")) > 1:
        info = DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    else:
        return DistInfo(), device, False
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return info, device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            timeout=datetime.timedelta(hours=1))
    return info, device, True


def learning_rate(step: int, base_lr: float, warmup: int) -> float:
    """App. B's schedule: linear warm-up over the first ``warmup`` updates, then constant.

    ``step`` is the 0-based index of the update, so update 0 already uses base_lr / warmup (the
    official TF code uses step / warmup, i.e. a first update with learning rate 0).
    """
    if warmup <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup)


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← decay · θ_ema + (1 − decay) · θ, in place (one fused ``lerp`` over all tensors)."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


# --------------------------------------------------------------------------- one step of Algorithm 1


@dataclass
class TrainingState:
    """What a training step reads and updates. ``model`` holds the fp32 master weights; ``net`` is
    what the loss calls (the same weights, possibly compiled, DDP-wrapped and under autocast)."""

    cfg: Config
    model: UNet
    ema: UNet
    optimizer: torch.optim.Optimizer
    diffusion: GaussianDiffusion
    net: nn.Module
    device: torch.device
    dist: DistInfo
    noise_gen: torch.Generator
    step: int = 0
    cudagraphs: bool = False  # the compiled network replays CUDA graphs: mark each step's start


def compile_mode(compile: bool | str) -> str | None:
    """``torch.compile`` mode for the ``compile`` argument: False → None (eager), True → "default",
    or one of ``COMPILE_MODES`` by name. ``"reduce-overhead"`` replays the compiled forward and
    backward from CUDA graphs, which removes the CPU's launch overhead: on one H200 it took the
    cifar10 recipe from 23.5 to 38.2 steps/s (``benchmarks/bench.py``, README)."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "default"
    check_choice("compile", compile, COMPILE_MODES)
    return compile


def build_training_state(cfg: Config, device: torch.device, precision: str = "fp32", compile: bool | str = False,
                         dist_info: DistInfo | None = None) -> TrainingState:
    """Model (initialized from the seed), EMA copy, Adam and the diffusion, ready for ``train_step``.

    ``compile``: False (eager), True (``torch.compile``) or a mode name of ``COMPILE_MODES``."""
    check_precision(precision)
    mode = compile_mode(compile)
    dist_info = dist_info or DistInfo()
    if mode in CUDAGRAPH_MODES and dist_info.world_size > 1:
        raise ValueError(f"compile={mode!r} (CUDA graphs) is not supported with several processes (DDP); "
                         "use compile=True")
    tc = cfg.train
    set_fp32_precision(device, precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # pick the fastest convolution algorithms once

    torch.manual_seed(derive_seed(tc.seed, "init"))  # the same initial weights in every process
    model = UNet.from_config(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate(0, tc.lr, tc.warmup),
                                 fused=True if device.type == "cuda" else None)

    net: nn.Module = model
    cudagraphs = mode in CUDAGRAPH_MODES and device.type == "cuda"
    if mode is not None:
        net = torch.compile(net, mode=None if mode == "default" else mode)
    if dist_info.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    net = Autocast(net, device.type, torch.bfloat16 if precision == "bf16" else None)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    return TrainingState(cfg, model, ema, optimizer, diffusion, net, device, dist_info,
                         torch.Generator(device=device), cudagraphs=cudagraphs)


def drop_labels(labels: Tensor, null_label: int, p: float, seed: int, step: int, global_batch: int,
                rank: int = 0, world_size: int = 1) -> Tensor:
    """Classifier-free guidance's training labels (Ho & Salimans 2022, Algorithm 1): each label of the
    global batch becomes ``null_label`` (∅) with probability ``p``, drawn from (seed, "label_drop", step);
    rank ``rank`` of ``world_size`` gets its contiguous share, as with the noise."""
    g = torch.Generator().manual_seed(derive_seed(seed, "label_drop", step))
    drop = torch.rand(global_batch, generator=g) < p
    local = global_batch // world_size
    drop = drop[rank * local:(rank + 1) * local].to(labels.device)
    if drop.shape != labels.shape:
        raise ValueError(f"got {labels.shape[0]} labels for a share of {local} images")
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def train_step(state: TrainingState, images: Tensor, step: int,
               labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Update ``step`` (0-based) of Algorithm 1 on this process's share ``images`` (uint8 [b, C, H, W]).

    A class-conditional model (``cfg.model.num_classes``) needs ``labels`` [b] (int64, 0 … K−1); a
    fraction ``cfg.train.label_drop`` of them is replaced by the null label (``drop_labels``).
    Returns (mean loss over the share, gradient norm before clipping) as 0-d device tensors,
    without synchronizing with the GPU.
    """
    tc, dev, rank, world = state.cfg.train, state.device, state.dist.rank, state.dist.world_size
    if images.shape[0] * world != tc.batch_size:
        raise ValueError(f"got {images.shape[0]} images for a global batch of {tc.batch_size} over {world} "
                         "process(es)")
    num_classes = state.cfg.model.num_classes
    if (num_classes is None) != (labels is None):
        raise ValueError("labels must be given for a class-conditional model (num_classes set) and only for one; "
                         f"num_classes={num_classes}, labels {'given' if labels is not None else 'missing'}")
    lr = learning_rate(step, tc.lr, tc.warmup)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    if state.cudagraphs:  # a new iteration: the graphs' previous outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()

    x0 = to_model_range(images.to(dev, non_blocking=True))  # §4: pixels scaled to [-1, 1]
    if dev.type == "cuda":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    # t and ε for the whole global batch from (seed, step); this process takes its slice
    g = state.noise_gen.manual_seed(derive_seed(tc.seed, "noise", step))
    share = slice(rank * x0.shape[0], (rank + 1) * x0.shape[0])
    t = torch.randint(0, state.diffusion.num_timesteps, (tc.batch_size,), generator=g, device=dev)[share]
    noise = torch.randn((tc.batch_size, *x0.shape[1:]), generator=g, device=dev)[share]
    torch.manual_seed(derive_seed(tc.seed, "dropout", step, rank))

    net = state.net
    if labels is not None:
        y = drop_labels(labels.to(dev, torch.long), num_classes, tc.label_drop, tc.seed, step, tc.batch_size,
                        rank, world)
        net = functools.partial(state.net, y=y)
    loss = state.diffusion.training_losses(net, x0, t=t, noise=noise).mean()  # eq. 14
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # DDP averages the gradients over processes here
    grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), tc.grad_clip)
    state.optimizer.step()
    ema_update_(state.ema, state.model, tc.ema_decay)
    state.step = step + 1
    return loss.detach(), grad_norm.detach()


# --------------------------------------------------------------------------- logging


class MetricsLog:
    """metrics.csv (step, loss, lr, grad_norm, images_per_s) and TensorBoard, on the main process.

    On resume, CSV rows after the resumed step (logged past the last checkpoint) are dropped.
    """

    FIELDS = ("step", "loss", "lr", "grad_norm", "images_per_s")

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.csv"
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, self.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        ckpt_io.write_text_atomic(self.path, text.getvalue())  # a crash here never loses the history
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: metrics go to metrics.csv only "
                              "(pip install tensorboard)", stacklevel=2)
            else:
                purge = start_step + 1 if start_step else None  # drop events logged after the checkpoint
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def log(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)
        if self.tb is not None:
            for key in self.FIELDS[1:]:
                self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def image(self, tag: str, grid: Tensor, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, grid, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class LossWatch:
    """Loss and gradient norm of recent steps, kept on the device between checks (no GPU sync per step).

    ``check`` brings them to the CPU (averaged over processes, so all stop together) and raises
    ``NonFiniteLossError`` naming the first step whose loss or gradient norm is NaN or infinite;
    ``row`` turns the steps since the last row into one metrics row (means, lr, images/s), where
    time spent inside ``paused()`` (sampling, checkpointing) does not count as training time.
    """

    def __init__(self, dist_info: DistInfo, batch_size: int, start_step: int) -> None:
        self.dist, self.batch_size = dist_info, batch_size
        self.pending: list[tuple[int, Tensor, Tensor]] = []
        self.window: list[tuple[int, float, float]] = []  # checked (step, loss, grad_norm)
        self.row_step, self.row_time, self.paused_s = start_step, time.perf_counter(), 0.0
        self.last_loss: float | None = None
        self.rates: list[float] = []

    def add(self, step: int, loss: Tensor, grad_norm: Tensor) -> None:
        self.pending.append((step, loss, grad_norm))

    def check(self, note: str) -> None:
        if not self.pending:
            return
        steps = [s for s, _, _ in self.pending]
        vals = torch.stack([torch.stack([loss.float(), gn.float()]) for _, loss, gn in self.pending])
        self.pending.clear()
        if self.dist.world_size > 1:
            dist.all_reduce(vals)
            vals /= self.dist.world_size
        vals = vals.cpu()
        bad = (~torch.isfinite(vals)).any(1).nonzero()
        if len(bad):
            i = int(bad[0])
            raise NonFiniteLossError(f"non-finite training loss at step {steps[i]} (loss={vals[i, 0].item()}, "
                                     f"grad_norm={vals[i, 1].item()}): training stopped; {note}")
        self.window += [(s, v[0].item(), v[1].item()) for s, v in zip(steps, vals, strict=True)]

    def row(self, step: int, lr: float) -> dict[str, float] | None:
        """One metrics row for the checked steps since the last row (call ``check`` first)."""
        if not self.window:
            return None
        now = time.perf_counter()
        seconds = max(now - self.row_time - self.paused_s, 1e-9)
        ips = (step - self.row_step) * self.batch_size / seconds
        loss = sum(v[1] for v in self.window) / len(self.window)
        grad_norm = sum(v[2] for v in self.window) / len(self.window)
        self.window.clear()
        self.row_step, self.row_time, self.paused_s = step, now, 0.0
        self.last_loss = loss
        self.rates.append(ips)
        return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "images_per_s": ips}

    @contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0

    def mean_images_per_s(self) -> float | None:
        """Throughput over the rows after the first (which includes start-up and compilation)."""
        rates = self.rates[1:] or self.rates
        return sum(rates) / len(rates) if rates else None


# --------------------------------------------------------------------------- sampling helpers


# Released weights that load_for_sampling accepts by name → the config whose diffusion they were trained
# with (the paper's CIFAR10 run: linear β, T = 1000, ε-prediction, σ² = β_t).
@dataclass
class LoadedModel:
    """EMA weights ready for Algorithm 2: the network, its diffusion, the config and the step."""

    model: UNet
    diffusion: GaussianDiffusion
    config: Config
    step: int


def load_for_sampling(path: str | os.PathLike, device: str | torch.device | None = None) -> LoadedModel:
    """The EMA model of a run directory, an ``ema.safetensors`` or a ``ckpt.safetensors`` (eval mode);
    or, when ``path`` is not a local file and names released weights (``pretrained.PRETRAINED``,
    e.g. "google/ddpm-cifar10-32", with the diffusion of the config listed there), those weights from the Hub
    (``pretrained.load_pretrained``; online the first time) with ``step`` −1 (unknown)."""
    device = resolve_device(device)
    from . import pretrained

    if str(path) in pretrained.PRETRAINED and not os.path.exists(path):
        model = pretrained.load_pretrained(str(path))
        base = get_config(pretrained.PRETRAINED[str(path)]["config"])
        cfg = dataclasses.replace(base, name=str(path), model=model.config)
        return LoadedModel(model.to(device).eval(), GaussianDiffusion.from_config(cfg.diffusion), cfg, -1)
    weights, cfg, step = ckpt_io.ema_state_dict(path)
    model = UNet.from_config(cfg.model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ckpt_io.CheckpointError(f"{path}: the weights do not fit config {cfg.name!r}: {e}") from e
    return LoadedModel(model.to(device).eval(), GaussianDiffusion.from_config(cfg.diffusion), cfg, step)


def sample_images(model: nn.Module, diffusion: GaussianDiffusion, n: int, *, batch_size: int | None = None,
                  seed: int = 0, progress: bool = False, class_labels=None,
                  guidance_scale: float = 0.0) -> Tensor:
    """``n`` samples of Algorithm 2 as a CPU float tensor [n, C, H, W] on the 256 levels of [-1, 1].

    ``samplers.generate`` with ``sampler="ddpm"``: image i's noise comes from its own generator seeded
    by (seed, i), so the images do not depend on ``batch_size`` (default all ``n`` at once).
    ``class_labels`` and ``guidance_scale`` are for a class-conditional model (see ``generate``).
    """
    from .samplers import generate

    images = generate(model, diffusion, n, sampler="ddpm", seed=seed, batch_size=batch_size, progress=progress,
                      class_labels=class_labels, guidance_scale=guidance_scale)
    return to_model_range(images.permute(0, 3, 1, 2))


def image_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """Images in [-1, 1] [n, C, H, W] → one grid [3, H', W'] in [0, 1], ``nrow`` per row (default ⌈√n⌉)."""
    from torchvision.utils import make_grid

    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    return make_grid((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2)


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Save images in [-1, 1] as one PNG grid (see ``image_grid``)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(images, nrow), str(path))
    return path


# --------------------------------------------------------------------------- configs of runs


MODEL_SECTIONS = ("model", "diffusion")


def run_config(out_dir: str | os.PathLike, cfg: Config | str | None = None, resume: bool = False,
               **train_overrides) -> Config:
    """The config a run will use: ``cfg`` (or a name) with ``TrainConfig`` fields overridden.

    With ``resume`` the run directory's stored config is the base; a ``cfg`` given as well must
    agree with it on the model and diffusion (a checkpoint cannot change architecture).
    """
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    if resume:
        stored = ckpt_io.read_config(out_dir)
        if cfg is not None:
            check_same_model(stored, cfg, f"{out_dir}/{ckpt_io.CONFIG_NAME}")
        cfg = stored
    if cfg is None:
        raise ValueError("config is required for a new run (e.g. config='cifar10')")
    overrides = {k: v for k, v in train_overrides.items() if v is not None}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg.train)}
    if unknown:
        raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))


def check_same_model(stored: Config, cfg: Config, where: str) -> None:
    """ValueError when ``cfg`` would change the model or diffusion recorded in ``where``."""
    for section in MODEL_SECTIONS:
        a, b = getattr(stored, section), getattr(cfg, section)
        if a != b:
            diff = {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
                    if getattr(a, f.name) != getattr(b, f.name)}
            raise ValueError(f"cannot resume: the {section} config differs from {where} "
                             f"(stored vs requested: {diff}); start a new run directory instead")


def validate_train_config(cfg: Config, world_size: int = 1) -> None:
    tc = cfg.train
    checks = [
        ("steps", tc.steps >= 0, "must be >= 0"),
        ("batch_size", tc.batch_size >= 1, "must be >= 1"),
        ("lr", tc.lr > 0, "must be > 0"),
        ("warmup", tc.warmup >= 0, "must be >= 0"),
        ("grad_clip", tc.grad_clip > 0, "must be > 0"),
        ("ema_decay", 0 <= tc.ema_decay < 1, "must be in [0, 1)"),
        ("seed", tc.seed >= 0, "must be >= 0"),
        ("label_drop", 0 <= tc.label_drop <= 1, "must be in [0, 1]"),
    ]
    for name, ok, msg in checks:
        if not ok:
            raise ValueError(f"train.{name}={getattr(tc, name)!r} {msg}")
    if tc.batch_size % world_size:
        raise ValueError(f"batch_size={tc.batch_size} (the global batch) does not divide by the "
                         f"number of processes ({world_size})")


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainSummary:
    run_dir: Path
    step: int
    loss: float | None
    images_per_s: float | None


def train(cfg: Config | str, out_dir: str | os.PathLike, *, resume: bool = False,
          device: str | torch.device | None = None, precision: str = "fp32", compile: bool | str = False,
          log_every: int = 100, ckpt_every: int = 5000, keep_every: int = 0, sample_every: int = 20_000,
          num_samples: int = 64, num_workers: int | None = None, data_cache: str | os.PathLike | None = None,
          progress: bool = True, tensorboard: bool = True) -> TrainSummary:
    """Train ``cfg`` (Algorithm 1) for ``cfg.train.steps`` updates in total, writing to ``out_dir``.

    ``resume=True`` continues the run in ``out_dir`` from its checkpoint (model, EMA, Adam, step;
    the data position and random numbers follow from the step). A new run refuses a non-empty
    ``out_dir``. Every ``ckpt_every`` steps (and at the end) the main process writes
    ``ckpt.safetensors`` and ``ema.safetensors`` atomically, keeping a copy every ``keep_every``
    steps; every ``sample_every`` steps it saves a grid of ``num_samples`` EMA samples (fixed seed).
    Under ``torchrun`` each process trains on its shard of the global batch (DDP). ``compile``: False,
    True or a ``torch.compile`` mode (``COMPILE_MODES``; ``"reduce-overhead"`` is the fastest on one GPU).
    """
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    out = Path(out_dir)
    for name, value in (("log_every", log_every), ("ckpt_every", ckpt_every)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    for name, value in (("keep_every", keep_every), ("sample_every", sample_every)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0 (0 turns it off)")
    if keep_every % ckpt_every:
        raise ValueError(f"keep_every={keep_every} must be a multiple of ckpt_every={ckpt_every}: copies are "
                         "kept of checkpoints, which are written every ckpt_every steps")
    check_precision(precision)

    dist_info, dev, created_group = setup_distributed(resolve_device(device))
    main = dist_info.is_main
    try:
        validate_train_config(cfg, dist_info.world_size)
        ckpt_path = out / ckpt_io.CKPT_NAME
        if resume:
            if not ckpt_path.is_file():
                raise ckpt_io.CheckpointError(f"cannot resume: {ckpt_path} does not exist")
            check_same_model(ckpt_io.read_config(out), cfg, str(out / ckpt_io.CONFIG_NAME))
        elif out.exists() and any(out.iterdir()):
            raise FileExistsError(f"run directory {out} is not empty: pass resume=True (--resume) to "
                                  "continue that run, or choose another output directory")
        _barrier(dist_info)  # every process has checked before the main one writes
        if main:
            out.mkdir(parents=True, exist_ok=True)
            ckpt_io.write_config(out, cfg)
        return _train_loop(cfg, out, dist_info, dev, resume=resume, precision=precision, compile=compile,
                           log_every=log_every, ckpt_every=ckpt_every, keep_every=keep_every,
                           sample_every=sample_every, num_samples=num_samples, num_workers=num_workers,
                           data_cache=data_cache, progress=progress, tensorboard=tensorboard)
    finally:
        if created_group:
            dist.destroy_process_group()


def _barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _train_loop(cfg: Config, out: Path, dist_info: DistInfo, dev: torch.device, *, resume: bool,
                precision: str, compile: bool | str, log_every: int, ckpt_every: int, keep_every: int,
                sample_every: int, num_samples: int, num_workers: int | None, data_cache, progress: bool,
                tensorboard: bool) -> TrainSummary:
    from tqdm.auto import tqdm

    tc, main = cfg.train, dist_info.is_main
    ckpt_path = out / ckpt_io.CKPT_NAME
    state = build_training_state(cfg, dev, precision, compile, dist_info)
    if resume:
        loaded = ckpt_io.load_training_state(ckpt_path, model=state.model, ema=state.ema,
                                             optimizer=state.optimizer)
        state.step = loaded.step
    start, total = state.step, tc.steps
    if start >= total:
        if main:
            print(f"{out}: already at step {start} of {total}; nothing to do (raise --steps to continue)")
        return TrainSummary(out, start, None, None)

    # Data: the main process downloads first, the others wait and then read the cache.
    if not main:
        _barrier(dist_info)
    dataset = make_dataset(tc.dataset, cfg.model.image_size, cfg.model.in_channels, cache_dir=data_cache)
    if main:
        _barrier(dist_info)
    in_memory = isinstance(dataset, TensorImages)
    if dev.type == "cuda" and in_memory:
        dataset.images = dataset.images.to(dev)  # CIFAR10 is 150 MB: keep it on the GPU
    if num_workers is None:
        num_workers = 0 if in_memory else min(4, os.cpu_count() or 1)
    conditional = cfg.model.num_classes is not None
    batches = iterate_batches(dataset, tc.batch_size, tc.seed, start, total, dist_info.rank,
                              dist_info.world_size, tc.random_flip, num_workers, with_labels=conditional)

    log = MetricsLog(out, start, tensorboard) if main else None
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not (progress and main))
    if main:
        n_params = sum(p.numel() for p in state.model.parameters())
        mode = compile_mode(compile)
        how = precision + ("" if mode is None else " + compile" if mode == "default" else f" + compile ({mode})")
        bar.write(f"{cfg.name}: {n_params:,} parameters, {len(dataset):,} images, batch {tc.batch_size} over "
                  f"{dist_info.world_size} process(es) on {dev}, {how}; steps {start} → {total}")

    watch = LossWatch(dist_info, tc.batch_size, start)
    last_ckpt = start if resume else None

    def check() -> None:  # never write a checkpoint or samples after a non-finite loss
        watch.check(f"the last checkpoint, {ckpt_path} at step {last_ckpt}, is intact" if last_ckpt is not None
                    else "no checkpoint was written")

    def log_row(step: int) -> None:
        check()
        row = watch.row(step, learning_rate(step - 1, tc.lr, tc.warmup))
        if row is not None and main:
            log.log(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")

    try:
        for s, images, *labels in batches:  # labels: [] for an unconditional model, [y] otherwise
            loss, grad_norm = train_step(state, images, s, *labels)
            step = s + 1  # updates done
            watch.add(step, loss, grad_norm)
            bar.update(1)
            if step % log_every == 0 or step == total:
                log_row(step)
            if sample_every and step % sample_every == 0:
                check()
                with watch.paused():  # sampling time is not training throughput
                    if main:  # a conditional model: classes 0, 1, … in turn, no guidance
                        labels = "cycle" if conditional else None
                        imgs = sample_images(state.ema, state.diffusion, num_samples, seed=tc.seed,
                                             class_labels=labels)
                        save_grid(imgs, out / "samples" / f"step_{step:07d}.png")
                        log.image("samples", image_grid(imgs), step)
            if step % ckpt_every == 0 or step == total:
                check()
                with watch.paused():
                    if main:
                        # EMA first: a crash between the two writes leaves a resumable checkpoint
                        # and an EMA file at least as new (never an EMA older than the checkpoint).
                        ckpt_io.save_ema(out / ckpt_io.EMA_NAME, state.ema, step, cfg)
                        ckpt_io.save_checkpoint(ckpt_path, model=state.model, ema=state.ema,
                                                optimizer=state.optimizer, step=step, cfg=cfg)
                        if keep_every and step % keep_every == 0:
                            ckpt_io.keep_copy(ckpt_path, step)
                last_ckpt = step
    finally:
        bar.close()
        if log is not None:
            log.close()
    _barrier(dist_info)
    return TrainSummary(out, state.step, watch.last_loss, watch.mean_images_per_s())
