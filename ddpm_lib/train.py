"""Algorithm 1 (§3.2) at the paper's scale (§4, App. B): one update, the loop of a run, and a small loop
for data held in memory.

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
import functools
import os
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt_io
from .base import check_choice, resolve_device
from .configs import TRAINING_NOTES, Config, get_config
from .data import TensorImages, iterate_batches, make_dataset, mirror_invariant, to_model_range
from .diffusion import GaussianDiffusion
from .distributed import DistInfo, barrier, setup_distributed
from .generation import sample_images
from .grids import image_grid, save_grid
from .locks import hold
from .precision import Autocast, check_precision, training_backends
from .rng import derive_seed, global_seed
from .runlog import LossWatch, MetricsLog, NonFiniteLossError
from .runs import check_same_model, validate_train_config
from .unet import UNet

# torch.compile modes for ``compile=``; the second pair also replays CUDA graphs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
LOCK_NAME = ".lock"  # held by the training process of a run directory


# --------------------------------------------------------------------------- one step of Algorithm 1


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


def algorithm1_step(diffusion: GaussianDiffusion, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, x0: Tensor, *, lr: float, grad_clip: float, ema_decay: float,
                    net=None, t: Tensor | None = None, noise: Tensor | None = None,
                    generator: torch.Generator | None = None, check_finite: bool = False) -> tuple[Tensor, Tensor]:
    """One update of Algorithm 1 (§3.2, App. B): the loss of eq. 14 on x0 [B, C, H, W] in [−1, 1], its
    gradient, the gradient clipped to global norm ``grad_clip``, an Adam step at ``lr``, and the EMA.

    ``model`` holds the weights; ``net`` is what the loss calls (default ``model``; the training loop passes
    it compiled, DDP-wrapped or under autocast). t and ε are drawn from ``generator`` unless given. With
    ``check_finite`` a NaN or infinite loss or gradient norm raises ``NonFiniteLossError`` before the weights
    change (a host sync; the training loop checks later instead, through ``runlog.LossWatch``).
    Returns (the mean loss, the gradient norm before clipping) as 0-d tensors.
    """
    loss = diffusion.training_losses(net or model, x0, t=t, noise=noise, generator=generator).mean()  # eq. 14
    if check_finite and not torch.isfinite(loss):
        raise NonFiniteLossError("non-finite loss")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # DDP averages the gradients over processes here
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if check_finite and not torch.isfinite(grad_norm):
        raise NonFiniteLossError("non-finite gradient norm")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    ema_update_(ema, model, ema_decay)
    return loss.detach(), grad_norm.detach()


def fit(diffusion: GaussianDiffusion, model: nn.Module, data: Tensor | Callable[[int, torch.Generator], Tensor], *,
        steps: int, batch_size: int, lr: float,
        warmup: int = 0, grad_clip: float = 1.0, ema_decay: float = 0.999, seed: int = 0,
        loss_window: int = 100) -> dict:
    """Algorithm 1 on data held in memory (the small studies and the book's 2-D examples): ``steps`` calls
    of ``algorithm1_step`` with Adam, the learning-rate warm-up, gradient clipping and an EMA, each on
    ``batch_size`` rows of the tensor ``data`` [N, …] drawn with replacement, or on ``data(batch_size,
    generator)`` for data drawn afresh (a distribution with a sampler). The batches, t and ε come from one
    generator seeded with ``seed + 1``, so runs that differ only in their configuration see the same
    batches. ``ema_decay=0`` keeps the last weights; ``grad_clip=math.inf`` clips nothing. Stops at the first
    non-finite loss or gradient norm. Returns the EMA model (``ema``, eval mode), ``steps_done``,
    ``failure`` (why it stopped early, or None) and the loss means over windows of ``loss_window`` steps."""
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    failure = None
    for step in range(steps):
        x0 = data(batch_size, gen) if callable(data) else data[torch.randint(len(data), (batch_size,), generator=gen)]
        try:
            loss, _ = algorithm1_step(diffusion, model, ema, opt, x0, lr=learning_rate(step, lr, warmup),
                                      grad_clip=grad_clip, ema_decay=ema_decay, generator=gen, check_finite=True)
        except NonFiniteLossError as e:
            failure = f"{e} at step {step}"
            break
        losses.append(loss.item())
    w = loss_window
    windows = [sum(losses[i:i + w]) / len(losses[i:i + w]) for i in range(0, len(losses), w)]
    return {"ema": ema.eval(), "steps_done": len(losses), "failure": failure, "loss_windows": windows}


def weights_finite(*models: nn.Module) -> bool:
    """Whether every parameter of ``models`` is finite (one host sync)."""
    flags = [torch.isfinite(p).all() for m in models for p in m.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


# --------------------------------------------------------------------------- the training state


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
    """Model (initialized from the seed, without touching the caller's random stream), EMA copy, Adam and
    the diffusion, ready for ``train_step``. ``compile``: False (eager), True (``torch.compile``) or a mode
    name of ``COMPILE_MODES``. The TF32 and cuDNN settings of a run are ``precision.training_backends``."""
    check_precision(precision)
    mode = compile_mode(compile)
    dist_info = dist_info or DistInfo()
    if mode in CUDAGRAPH_MODES and dist_info.world_size > 1:
        raise ValueError(f"compile={mode!r} (CUDA graphs) is not supported with several processes (DDP); "
                         "use compile=True")
    tc = cfg.train
    with global_seed(derive_seed(tc.seed, "init"), device):  # the same initial weights in every process
        model = UNet.from_config(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate(0, tc.lr, tc.warmup),
                                 fused=True if device.type == "cuda" else None)
    net: nn.Module = model
    if mode is not None:
        net = torch.compile(net, mode=None if mode == "default" else mode)
    if dist_info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    net = Autocast(net, device.type, torch.bfloat16 if precision == "bf16" else None)
    return TrainingState(cfg, model, ema, optimizer, GaussianDiffusion.from_config(cfg.diffusion), net, device,
                         dist_info, torch.Generator(device=device),
                         cudagraphs=mode in CUDAGRAPH_MODES and device.type == "cuda")


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
    """Update ``step`` (0-based) of Algorithm 1 on this process's share ``images`` (uint8 [b, C, H, W]):
    ``algorithm1_step`` with the run's t, ε and dropout drawn from (seed, step).

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
    net = state.net
    if labels is not None:
        y = drop_labels(labels.to(dev, torch.long), num_classes, tc.label_drop, tc.seed, step, tc.batch_size,
                        rank, world)
        net = functools.partial(state.net, y=y)
    with global_seed(derive_seed(tc.seed, "dropout", step, rank), dev):  # dropout, from (seed, step, rank)
        out = algorithm1_step(state.diffusion, state.model, state.ema, state.optimizer, x0, net=net, t=t,
                              noise=noise, lr=learning_rate(step, tc.lr, tc.warmup), grad_clip=tc.grad_clip,
                              ema_decay=tc.ema_decay)
    state.step = step + 1
    return out


# --------------------------------------------------------------------------- the run


@dataclass
class TrainSummary:
    run_dir: Path
    step: int
    loss: float | None
    images_per_s: float | None


def _check_schedule(log_every: int, ckpt_every: int, keep_every: int, sample_every: int) -> None:
    for name, value in (("log_every", log_every), ("ckpt_every", ckpt_every)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    for name, value in (("keep_every", keep_every), ("sample_every", sample_every)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0 (0 turns it off)")
    if keep_every % ckpt_every:
        raise ValueError(f"keep_every={keep_every} must be a multiple of ckpt_every={ckpt_every}: copies are "
                         "kept of checkpoints, which are written every ckpt_every steps")


# What a run writes before its first checkpoint: a run directory holding only these starts afresh.
RUN_LEFTOVERS = (ckpt_io.CONFIG_NAME, ckpt_io.EMA_NAME, "metrics.csv", "tb", "samples", LOCK_NAME)


def _refuse_foreign(out: Path) -> None:
    """FileExistsError when ``out`` has no checkpoint but holds what no run writes before its first one."""
    if not out.is_dir() or (out / ckpt_io.CKPT_NAME).is_file():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_LEFTOVERS and not ckpt_io.is_temp_file(p))
    if foreign:
        raise FileExistsError(f"run directory {out} is not empty ({', '.join(foreign[:3])}"
                              f"{' …' if len(foreign) > 3 else ''}): choose another output directory")


def _open_run_dir(out: Path, cfg: Config, resume: bool, dist_info: DistInfo) -> bool:
    """Check that ``out`` can start or resume, tidy it and write its config; returns whether the run resumes.

    A directory with a checkpoint resumes (same model and diffusion) or is refused for a new run. One without
    a checkpoint (a first run that stopped early) starts afresh either way: what such a run leaves behind
    (``RUN_LEFTOVERS``) is removed. Temporary files of interrupted writes are removed in every case.
    """
    ckpt_path = out / ckpt_io.CKPT_NAME
    if ckpt_path.is_file():
        if not resume:
            raise FileExistsError(f"{out} holds a run (its checkpoint {ckpt_path.name}): pass --resume "
                                  "(resume=True) to continue it, or choose another output directory")
        check_same_model(ckpt_io.read_config(out), cfg, str(out / ckpt_io.CONFIG_NAME))
    elif resume and dist_info.is_main:
        print(f"{out}: no checkpoint yet (the run stopped before its first one): starting it from step 0")
    barrier(dist_info)  # every process has checked before the main one writes
    if dist_info.is_main:
        for p in out.iterdir():
            leftover = p.name in RUN_LEFTOVERS and p.name != LOCK_NAME  # the lock is held, not left over
            if ckpt_io.is_temp_file(p) or (not ckpt_path.is_file() and leftover):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        ckpt_io.write_config(out, cfg)
    return ckpt_path.is_file()


def train(cfg: Config | str, out_dir: str | os.PathLike, *, resume: bool = False,
          device: str | torch.device | None = None, precision: str = "fp32", compile: bool | str = False,
          log_every: int = 100, ckpt_every: int = 5000, keep_every: int = 0, sample_every: int = 20_000,
          num_samples: int = 64, num_workers: int | None = None, data_cache: str | os.PathLike | None = None,
          progress: bool = True, tensorboard: bool = True) -> TrainSummary:
    """Train ``cfg`` (Algorithm 1) for ``cfg.train.steps`` updates in total, writing to ``out_dir``.

    ``resume=True`` continues the run in ``out_dir`` from its checkpoint (model, EMA, Adam, step;
    the data position and random numbers follow from the step). A new run refuses a directory that holds
    a checkpoint or files no run writes; a directory whose run stopped before its first checkpoint starts
    afresh, resumed or not (``_open_run_dir``). The main process holds ``out_dir/.lock`` for the whole run,
    so a second process on the same directory fails at once. Every ``ckpt_every`` steps (and at the end)
    the main process writes ``ckpt.safetensors`` and ``ema.safetensors`` atomically, keeping a copy every
    ``keep_every`` steps; every ``sample_every`` steps, and at the end, it saves a grid of ``num_samples``
    EMA samples (fixed seed). Weights that turn non-finite stop the run before anything is written from them.
    Under ``torchrun`` each process trains on its shard of the global batch (DDP). ``compile``: False,
    True or a ``torch.compile`` mode (``COMPILE_MODES``; ``"reduce-overhead"`` is the fastest on one GPU).
    The run's TF32 / cuDNN settings and the global random stream are the caller's again afterwards.
    """
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    out = Path(out_dir)
    _check_schedule(log_every, ckpt_every, keep_every, sample_every)
    check_precision(precision)
    dist_info, dev, created_group = setup_distributed(resolve_device(device))
    try:
        validate_train_config(cfg, dist_info.world_size)
        _refuse_foreign(out)  # someone else's folder gets no lock file
        with ExitStack() as held, training_backends(dev, precision):
            if dist_info.is_main:  # one training process per run directory; a killed one releases it
                held.enter_context(hold(out / LOCK_NAME, f"run directory {out}"))
            resume = _open_run_dir(out, cfg, resume, dist_info)
            state = build_training_state(cfg, dev, precision, compile, dist_info)
            mode = compile_mode(compile)
            how = precision + ("" if mode is None else " + compile" if mode == "default" else f" + compile ({mode})")
            return _Run(state, out, resume, how, log_every, ckpt_every, keep_every, sample_every, num_samples,
                        progress, tensorboard).loop(num_workers, data_cache)
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


class _Run:
    """The loop of ``train``: steps, metric rows, sample grids and checkpoints, each in its own method."""

    def __init__(self, state: TrainingState, out: Path, resume: bool, how: str, log_every: int, ckpt_every: int,
                 keep_every: int, sample_every: int, num_samples: int, progress: bool, tensorboard: bool) -> None:
        self.state, self.out, self.cfg, self.how = state, out, state.cfg, how
        self.every = {"log": log_every, "ckpt": ckpt_every, "keep": keep_every, "sample": sample_every}
        self.num_samples, self.progress, self.tensorboard = num_samples, progress, tensorboard
        self.main = state.dist.is_main
        self.ckpt_path = out / ckpt_io.CKPT_NAME
        if resume:
            loaded = ckpt_io.load_training_state(self.ckpt_path, model=state.model, ema=state.ema,
                                                 optimizer=state.optimizer)
            state.step = loaded.step
        self.last_ckpt = state.step if resume else None

    def data(self, num_workers: int | None, data_cache) -> tuple[int, object]:
        """The dataset (the main process downloads first, the others then read its cache) and its batches."""
        cfg, info, dev = self.cfg, self.state.dist, self.state.device
        if not self.main:
            barrier(info)
        dataset = make_dataset(cfg.train.dataset, cfg.model.image_size, cfg.model.in_channels, cache_dir=data_cache)
        if self.main:
            barrier(info)
        flip = cfg.train.random_flip and mirror_invariant(cfg.train.dataset)
        if cfg.train.random_flip and not flip and self.main:
            print(f"{cfg.train.dataset}: no random flips (a mirrored image of it is not one of its images)")
        in_memory = isinstance(dataset, TensorImages)
        if dev.type == "cuda" and in_memory:  # CIFAR10 is 150 MB: keep a copy on the GPU
            dataset = TensorImages(dataset.images.to(dev), name=dataset.name, labels=dataset.labels)
        if num_workers is None:
            num_workers = 0 if in_memory else min(4, os.cpu_count() or 1)
        tc = cfg.train
        return len(dataset), iterate_batches(dataset, tc.batch_size, tc.seed, self.state.step, tc.steps, info.rank,
                                             info.world_size, flip, num_workers,
                                             with_labels=cfg.model.num_classes is not None)

    def loop(self, num_workers: int | None, data_cache) -> TrainSummary:
        from tqdm.auto import tqdm

        start, total = self.state.step, self.cfg.train.steps
        if start >= total:
            if self.main:
                print(f"{self.out}: already at step {start} of {total}; nothing to do (raise --steps to continue)")
            return TrainSummary(self.out, start, None, None)
        n_images, batches = self.data(num_workers, data_cache)
        self.log = MetricsLog(self.out, start, self.tensorboard) if self.main else None
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                        disable=not (self.progress and self.main))
        self.announce(n_images, start, total)
        self.watch = LossWatch(self.state.dist, self.cfg.train.batch_size, start)
        try:
            for s, images, *labels in batches:  # labels: [] for an unconditional model, [y] otherwise
                loss, grad_norm = train_step(self.state, images, s, *labels)
                self.after_step(s + 1, loss, grad_norm, total)
        finally:
            self.bar.close()
            if self.log is not None:
                self.log.close()
        barrier(self.state.dist)
        return TrainSummary(self.out, self.state.step, self.watch.last_loss, self.watch.mean_images_per_s())

    def announce(self, n_images: int, start: int, total: int) -> None:
        if self.main:
            state, tc = self.state, self.cfg.train
            n_params = sum(p.numel() for p in state.model.parameters())
            self.bar.write(f"{self.cfg.name}: {n_params:,} parameters, {n_images:,} images, batch {tc.batch_size} "
                           f"over {state.dist.world_size} process(es) on {state.device}, {self.how}; "
                           f"steps {start} → {total}")
            if self.cfg.name in TRAINING_NOTES:
                self.bar.write(TRAINING_NOTES[self.cfg.name])

    def after_step(self, step: int, loss: Tensor, grad_norm: Tensor, total: int) -> None:
        """Step ``step`` (updates done) is over: log, sample and checkpoint when due."""
        self.watch.add(step, loss, grad_norm)
        self.bar.update(1)
        if step % self.every["log"] == 0 or step == total:
            self.log_row(step)
        if self.every["sample"] and (step % self.every["sample"] == 0 or step == total):  # and one at the end
            self.sample_grid(step)
        if step % self.every["ckpt"] == 0 or step == total:
            self.checkpoint(step)

    def check(self, step: int, weights: bool = False) -> None:
        """Never write a checkpoint or samples after a non-finite loss, or from non-finite weights (the last
        update can break them after every loss so far was finite)."""
        note = (f"the last checkpoint, {self.ckpt_path} at step {self.last_ckpt}, is intact"
                if self.last_ckpt is not None else "no checkpoint was written")
        self.watch.check(note)
        if weights and not weights_finite(self.state.model, self.state.ema):
            lr = learning_rate(step - 1, self.cfg.train.lr, self.cfg.train.warmup)
            raise NonFiniteLossError(f"the weights became non-finite by step {step} (is the learning rate, {lr:g}, "
                                     f"too high?): training stopped; {note}")

    def log_row(self, step: int) -> None:
        self.check(step)
        tc = self.cfg.train
        row = self.watch.row(step, learning_rate(step - 1, tc.lr, tc.warmup))
        if row is not None and self.main:
            self.log.log(row)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
            if not self.progress:  # no bar: a line per metrics row, so a long run is seen to move
                print(f"{self.cfg.name} step {step:,}/{tc.steps:,}: loss {row['loss']:.4f}, "
                      f"{row['images_per_s']:.0f} images/s", flush=True)

    def sample_grid(self, step: int) -> None:
        """A grid of EMA samples (fixed seed; a conditional model: classes 0, 1, … in turn, no guidance)."""
        self.check(step, weights=True)
        with self.watch.paused():  # sampling time is not training throughput
            if self.main:
                labels = "cycle" if self.cfg.model.num_classes is not None else None
                imgs = sample_images(self.state.ema, self.state.diffusion, self.num_samples, seed=self.cfg.train.seed,
                                     class_labels=labels)
                save_grid(imgs, self.out / "samples" / f"step_{step:07d}.png")
                self.log.image("samples", image_grid(imgs), step)

    def checkpoint(self, step: int) -> None:
        self.check(step, weights=True)
        with self.watch.paused():
            if self.main:
                # EMA first: a crash between the two writes leaves a resumable checkpoint
                # and an EMA file at least as new (never an EMA older than the checkpoint).
                state = self.state
                ckpt_io.save_ema(self.out / ckpt_io.EMA_NAME, state.ema, step, self.cfg)
                ckpt_io.save_checkpoint(self.ckpt_path, model=state.model, ema=state.ema,
                                        optimizer=state.optimizer, step=step, cfg=self.cfg)
                if self.every["keep"] and step % self.every["keep"] == 0:
                    ckpt_io.keep_copy(self.ckpt_path, step)
        self.last_ckpt = step
