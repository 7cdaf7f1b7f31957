"""The reverse chain with each step replayed from one CUDA graph: ``samplers.sample_loop`` at the speed of its
kernels.

A step of Algorithm 2 is one network call and a dozen element-wise ops: some three hundred kernel launches for
the paper's CIFAR10 UNet. At the batch sizes of evaluation the GPU runs many of them faster than the host can
issue them, so an eager loop waits on Python. ``GraphedSampler`` records one whole step (network, x̂_0, the
mean, the noise, the update of x) once as a CUDA graph (``torch.cuda.CUDAGraph``) over fixed buffers and
replays it once per step, so a step costs one launch.

A step can be captured only if nothing in it waits for the GPU or reads a Python value from a device tensor,
and if everything that changes from step to step lives in device memory. Here:

* the step's position k is a device counter that the step itself advances; the timestep t = τ[k] is gathered
  from a device table of τ, and the schedule's constants by ``GaussianDiffusion``'s own device gathers;
* DDIM's coefficients (eq. 12's √ᾱ_s and √(1 − ᾱ_s − σ²), and σ of eq. 16) are device tables over k, made
  once by ``samplers.ddim_coefficients``, the function ``samplers.ddim_step`` uses;
* the noise is ``rng.ImageNoise``: image i's draw d is a function of (key_i, d), with d a device counter
  advanced by each draw. The per-image CPU generators of ``generate(noise="cpu")`` cannot be captured;
* the input checks (``UNet.forward``, ``GaussianDiffusion._check_t``) are device-side asserts on CUDA.

The images are those of ``sample_loop`` with the same ``ImageNoise`` (x_T is its first draw): the step runs
the same ops in the same order. Off CUDA (``capture=False``) the step runs eagerly over the same buffers,
which is how the tests check that on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Model, model_device
from .diffusion import GaussianDiffusion
from .guidance import guided
from .rng import ImageNoise
from .samplers import ddim_coefficients, ddim_mean, sampling_timesteps


class GraphedSampler:
    """Algorithm 2 (``sampler="ddpm"``) or DDIM from x_T to x_0 for batches of one ``shape`` [B, C, H, W], each
    step one CUDA graph replay (``capture=True``, the default on CUDA) or one eager call (``capture=False``).

    ``steps``, ``spacing``, ``eta`` and ``clip_denoised`` as in ``samplers.sample_loop``. For a class-conditional
    model pass ``conditional=True`` and ``guidance_scale`` w; each call then takes the batch's labels. Call it
    with the images' noise keys (``ImageNoise.for_images(seed, indices).keys``): it returns x_0 [B, C, H, W],
    a new tensor. The graph is recorded at the first call (after ``warmup`` eager steps on a side stream,
    for cuDNN's autotuner and compilation) and reused by later calls.
    """

    def __init__(self, diffusion: GaussianDiffusion, model: Model, shape: Sequence[int], *, sampler: str = "ddpm",
                 steps: int | None = None, spacing: str = "uniform", eta: float = 0.0, clip_denoised: bool = True,
                 conditional: bool = False, guidance_scale: float = 0.0, device: torch.device | str | None = None,
                 capture: bool | None = None, warmup: int = 2):
        self.tau = sampling_timesteps(diffusion.num_timesteps, sampler, steps, None, spacing, eta)
        self.device = torch.device(device) if device is not None else model_device(model)
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}; pass capture=False")
        self.shape = tuple(int(d) for d in shape)
        if len(self.shape) != 4 or min(self.shape) < 1:
            raise ValueError(f"shape must be [B, C, H, W], got {list(shape)}")
        B, dev = self.shape[0], self.device
        self.diffusion, self.sampler, self.clip, self.warmup = diffusion, sampler, clip_denoised, warmup
        self.noise = ImageNoise(torch.zeros(B, dtype=torch.int64), dev)  # keys set by each call
        self.y = torch.zeros(B, dtype=torch.int64, device=dev) if conditional else None
        self.model = guided(model, self.y, guidance_scale)
        self.k = torch.zeros((), dtype=torch.int64, device=dev)  # the step's position in τ
        self.t_table = torch.tensor(self.tau, dtype=torch.int64, device=dev)
        self.x = torch.zeros(self.shape, device=dev)
        if sampler == "ddim":
            nxt = [*self.tau[1:], -1]  # the index each step goes to (−1 after the last)
            coefs = [ddim_coefficients(diffusion, t, s, eta) for t, s in zip(self.tau, nxt, strict=True)]
            c_x0, c_eps, var = (torch.tensor(c, dtype=torch.float64) for c in zip(*coefs, strict=True))
            self.c_x0, self.c_eps = c_x0.to(dev, torch.float32), c_eps.to(dev, torch.float32)
            self.sigma = var.sqrt().to(dev, torch.float32) if eta > 0 else None  # σ = 0 on every step at η = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step(self) -> None:
        """x ← the step's output at position k (x_{t−1} of Algorithm 2, or DDIM's x_s); k ← k + 1."""
        x, k = self.x, self.k.view(1)  # read by index_select: indexing with a 0-d tensor would read it on the host
        t = self.t_table.index_select(0, k).expand(x.shape[0])
        if self.sampler == "ddpm":  # Algorithm 2, lines 3-4 (a draw at every step, as p_sample makes)
            out = self.diffusion.p_sample(self.model, x, t, self.clip, self.noise)["sample"]
        else:  # DDIM eq. 12, by samplers.ddim_step's own mean
            out = ddim_mean(self.diffusion, self.model, x, t, self.c_x0.index_select(0, k),
                            self.c_eps.index_select(0, k), self.clip)[2]
            if self.sigma is not None:  # the last step's σ is 0: its draw is made and multiplied by 0
                out = out + self.sigma.index_select(0, k) * self.noise.randn(x.shape)
        x.copy_(out)
        self.k.add_(1)

    def _record(self) -> None:
        """Warm up on a side stream (the noise counter and x restored after), then capture one step."""
        draw, x = self.noise.draw.clone(), self.x.clone()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.k.zero_()
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.noise.draw.copy_(draw)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()  # recorded, not run
        self.x.copy_(x)

    @torch.no_grad()
    def __call__(self, keys: Tensor, y: Tensor | None = None, x_T: Tensor | None = None,
                 first: int | None = None) -> Tensor:
        """x_0 for the images whose noise keys are ``keys`` [B] (int64); ``y`` [B] their labels for a conditional
        sampler. x_T is the noise's first draw unless given. ``first``: stop after that many steps (a benchmark
        times part of the chain)."""
        B = self.shape[0]
        if tuple(keys.shape) != (B,) or keys.dtype != torch.int64:
            raise ValueError(f"keys must be int64 [{B}], got {keys.dtype} {list(keys.shape)}")
        if (y is None) != (self.y is None):
            raise ValueError("labels y are needed by a conditional sampler (conditional=True) and only by one")
        self.noise.keys.copy_(keys)
        self.noise.draw.zero_()
        if y is not None:
            self.y.copy_(y)
        if x_T is not None and tuple(x_T.shape) != self.shape:
            raise ValueError(f"x_T has shape {list(x_T.shape)}, expected {list(self.shape)}")
        self.x.copy_(x_T if x_T is not None else self.noise.randn(self.shape))
        if self.capture and self.graph is None:
            self._record()
        self.k.zero_()
        for _ in self.tau[:first]:
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        return self.x.clone()
