"""The sampling loop: Algorithm 2 (§3.2) and DDIM (Song, Meng & Ermon 2021), from x_T (or any x_t) to x_0.

**DDIM** ("Denoising Diffusion Implicit Models", ICLR 2021, arXiv:2010.02502) reuses a network trained
with Algorithm 1 unchanged. It defines a family of non-Markovian forward processes, indexed by σ, with
the same marginals q(x_t | x_0) (eq. 4 of the DDPM paper) and hence the same L_simple, and samples the
reverse process on a subsequence τ of the timesteps (DDIM §4.2). One step from index t to s < t, with
x̂_0 and ε̂ the network's predictions at x_t, is DDIM eq. 12:

    x_s = √ᾱ_s · x̂_0  +  √(1 − ᾱ_s − σ²) · ε̂  +  σ z,      z ~ N(0, I)
          "predicted x_0"   "direction pointing to x_t"    "random noise"

with σ = σ_t(η) of DDIM eq. 16:  σ² = η² · (1 − ᾱ_s) / (1 − ᾱ_t) · (1 − ᾱ_t / ᾱ_s).
η = 0 makes sampling deterministic (an ODE-like map from x_T to x_0); η = 1 with s = t − 1 gives
σ² = β̃_t and the mean of q(x_{t−1} | x_t, x̂_0), i.e. Algorithm 2 with σ_t² = β̃_t (``fixed_small``).

**One loop.** ``sample_steps`` runs either sampler over its timesteps, one step a line:
``GaussianDiffusion.p_sample`` (Algorithm 2) or ``ddim_step`` (DDIM eq. 12). It is where
classifier-free guidance is applied (``guidance.guided``) and where a chain may start from an x_t
instead of x_T (``t_start``). ``sample_loop`` collects its result; every sampler of ddpm_lib calls it.

**Time indices** are 0-based as everywhere in ``ddpm_lib`` (index i is the paper's t = i + 1). After
the smallest index of τ the sampler steps to "index −1", where ᾱ = 1 (DDIM's ᾱ_0 := 1): x_0 = x̂_0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Model, check_choice, model_device
from .diffusion import GaussianDiffusion
from .guidance import guided
from .rng import Generators, randn

SAMPLERS = ("ddpm", "ddim")
SPACINGS = ("uniform", "quadratic")


# --------------------------------------------------------------------------- timesteps


def ddim_timesteps(T: int, steps: int, kind: str = "uniform") -> list[int]:
    """DDIM's subsequence τ of ``steps`` indices out of 0 … T−1 (DDIM App. D.2), in sampling order
    (decreasing).

    ``"uniform"``: τ_i = ⌊i·T / S⌋, i = 0 … S−1 (exactly S steps; the DDIM code's
    ``range(0, T, T // S)`` when S divides T). ``"quadratic"``: τ_i = ⌊(i·√(0.8 T) / (S−1))²⌋, as the
    DDIM code computes it; the DDIM paper uses it for CIFAR10 (its Table 1) and uniform elsewhere.
    Quadratic indices repeat near 0 for large S (T = 1000: from S = 30); a repeat is a step from t to t,
    the identity of eq. 12, so it is dropped: fewer than S network calls, the same samples.
    """
    check_choice("kind", kind, SPACINGS)
    if not 1 <= steps <= T:
        raise ValueError(f"steps={steps} must lie in 1 … T={T}")
    if kind == "uniform":
        tau = [i * T // steps for i in range(steps)]
    else:  # a repeated index would be a step from t to t, the identity in eq. 12: keep each once
        tau = np.unique((np.linspace(0, np.sqrt(0.8 * T), steps) ** 2).astype(np.int64)).tolist()
    return tau[::-1]


def sampling_timesteps(T: int, sampler: str = "ddpm", steps: int | None = None,
                       timesteps: Sequence[int] | None = None, spacing: str = "uniform",
                       eta: float = 0.0, t_start: int | None = None) -> list[int]:
    """The indices a sampler visits, in order, after checking its arguments (ValueError names them).

    ``"ddpm"``: all T−1 … 0 (Algorithm 2; ``steps`` may only be T, ``eta`` only 0). ``"ddim"``:
    ``timesteps`` (strictly decreasing indices in 0 … T−1), else ``ddim_timesteps(T, steps, spacing)``,
    else all T; ``eta`` in [0, 1]. With ``t_start`` = i the chain starts at index i (from an x_t) and
    then visits the indices below i: for Algorithm 2, i … 0.
    """
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("spacing", spacing, SPACINGS)
    if not 0 <= eta <= 1:
        raise ValueError(f"eta={eta} must lie in [0, 1] (DDIM eq. 16: 0 deterministic, 1 DDPM's posterior)")
    if steps is not None and timesteps is not None:
        raise ValueError("pass steps or timesteps, not both")
    if t_start is not None and not 0 <= int(t_start) < T:
        raise ValueError(f"t_start={t_start} must be a 0-based index in 0 … {T - 1}")
    if sampler == "ddpm":
        if timesteps is not None or steps not in (None, T) or eta != 0:
            raise ValueError(f"sampler='ddpm' runs all T={T} steps of Algorithm 2; steps, timesteps and eta "
                             "are for sampler='ddim' (eta=1 on all steps is Algorithm 2 with σ² = β̃_t)")
        tau = list(range(T - 1, -1, -1))
    elif timesteps is not None:
        tau = [int(i) for i in timesteps]
        if not tau or any(not 0 <= i < T for i in tau) or any(a <= b for a, b in zip(tau, tau[1:], strict=False)):
            raise ValueError(f"timesteps must be strictly decreasing indices in 0 … {T - 1}, got {tau}")
    else:
        tau = ddim_timesteps(T, steps if steps is not None else T, spacing)
    if t_start is not None:
        tau = [int(t_start)] + [i for i in tau if i < int(t_start)]
    return tau


# --------------------------------------------------------------------------- one DDIM step


def ddim_step(diffusion: GaussianDiffusion, model: Model, x_t: Tensor, t: int, t_prev: int, eta: float = 0.0,
              clip_denoised: bool = True, generator: Generators = None) -> dict[str, Tensor | float]:
    """One DDIM step from index t to s = ``t_prev`` < t (−1: to x_0 itself), DDIM eq. 12.

    x̂_0 comes from ``diffusion.p_mean_variance`` (any mean type; with a learned variance only the
    mean part is used), clipped to [−1, 1] when ``clip_denoised``; ε̂ is recomputed from that x̂_0
    (eq. 4 solved for ε), so x_t = √ᾱ_t x̂_0 + √(1 − ᾱ_t) ε̂ holds exactly, as eq. 12 assumes. Noise is
    drawn from ``generator`` only when σ > 0. Returns ``sample`` (x_s), ``mean`` (x_s without σ z),
    ``variance`` σ² (a float), ``pred_x0`` and ``pred_eps``.
    """
    c_x0, c_eps, var = ddim_coefficients(diffusion, t, t_prev, eta)
    t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    x0, eps, mean = ddim_mean(diffusion, model, x_t, t_batch, c_x0, c_eps, clip_denoised)
    sample = mean + math.sqrt(var) * randn(x_t.shape, generator, x_t.device, x_t.dtype) if var > 0 else mean
    return {"sample": sample, "mean": mean, "variance": var, "pred_x0": x0, "pred_eps": eps}


def ddim_mean(diffusion: GaussianDiffusion, model: Model, x_t: Tensor, t: Tensor, c_x0: float | Tensor,
              c_eps: float | Tensor, clip_denoised: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """x̂_0, ε̂ and DDIM eq. 12 without σ z, c_x0 · x̂_0 + c_eps · ε̂, at timestep indices t [B]; the coefficients
    (``ddim_coefficients``) as floats, or as device tensors for a step recorded in a CUDA graph (``graphed``)."""
    x0 = diffusion.p_mean_variance(model, x_t, t, clip_denoised)["pred_x0"]  # x̂_0 (eq. 15 for ε)
    eps = diffusion.predict_eps_from_x0(x_t, t, x0)  # ε̂ consistent with the clipped x̂_0
    return x0, eps, c_x0 * x0 + c_eps * eps


def ddim_coefficients(diffusion: GaussianDiffusion, t: int, t_prev: int, eta: float) -> tuple[float, float, float]:
    """DDIM eq. 12's coefficients of x̂_0 and ε̂, √ᾱ_s and √(1 − ᾱ_s − σ²), and σ² = σ_t(η)² (eq. 16), for the
    step from index t to s = ``t_prev`` (−1: ᾱ_s = 1), in float64."""
    alpha_bar = diffusion.const("alpha_bar")
    a_t = float(alpha_bar[t])
    a_s = float(alpha_bar[t_prev]) if t_prev >= 0 else 1.0  # ᾱ at index −1 is 1 (DDIM's ᾱ_0)
    var = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)  # DDIM eq. 16: σ_t(η)²
    return math.sqrt(a_s), math.sqrt(max(1 - a_s - var, 0.0)), var


# --------------------------------------------------------------------------- the loop


@torch.no_grad()
def sample_steps(diffusion: GaussianDiffusion, model: Model, shape: Sequence[int], *, sampler: str = "ddpm",
                 steps: int | None = None, timesteps: Sequence[int] | None = None, spacing: str = "uniform",
                 eta: float = 0.0, generator: Generators = None, x_T: Tensor | None = None,
                 t_start: int | None = None, clip_denoised: bool = True, device: torch.device | str | None = None,
                 progress: bool = False, y: Tensor | int | None = None,
                 guidance_scale: float = 0.0) -> Iterator[dict]:
    """The sampling chain step by step: yields, for each index t the sampler visits (``sampling_timesteps``),
    a dict with ``t``, ``x_t`` (the step's input), ``pred_x0`` (x0_hat, the x_0 predicted from it) and ``sample``
    (the step's output: x_{t−1} for Algorithm 2, x_s for DDIM).

    Starts from ``x_T`` (default N(0, I) drawn from ``generator``), or, with ``t_start``, from the x_t
    given as ``x_T`` at that index (a noised image, for the paper's shared-latent and interpolation
    figures). ``generator``: one ``torch.Generator`` or a list with one per image. Tensors live on the
    model's device (or ``device``). For a class-conditional model, ``y`` (labels [B] or one int) and
    ``guidance_scale`` w sample with classifier-free guidance (``guidance.Guided``).
    """
    tau = sampling_timesteps(diffusion.num_timesteps, sampler, steps, timesteps, spacing, eta, t_start)
    model = guided(model, y, guidance_scale)  # the one place guidance enters sampling
    device = torch.device(device) if device is not None else model_device(model)
    if x_T is not None and tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    x = x_T.to(device) if x_T is not None else randn(shape, generator, device)
    order = enumerate(tau)
    if progress:
        from tqdm.auto import tqdm
        order = tqdm(order, total=len(tau), desc=f"{sampler}, step", unit="step", leave=False)
    for k, t in order:
        if sampler == "ddpm":  # Algorithm 2, line 4
            t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            out = diffusion.p_sample(model, x, t_batch, clip_denoised, generator)
        else:  # DDIM eq. 12, to the next index of τ (−1 after the last)
            out = ddim_step(diffusion, model, x, t, tau[k + 1] if k + 1 < len(tau) else -1, eta, clip_denoised,
                            generator)
        yield {"t": t, "x_t": x, "pred_x0": out["pred_x0"], "sample": out["sample"]}
        x = out["sample"]


@torch.no_grad()
def sample_loop(diffusion: GaussianDiffusion, model: Model, shape: Sequence[int], *, sampler: str = "ddpm",
                keep_steps: Sequence[int] | None = None, **kwargs):
    """From x_T ~ N(0, I) to x_0 with Algorithm 2 (``sampler="ddpm"``) or DDIM (``"ddim"``): ``sample_steps``
    run to the end. Returns x_0 [*shape]; with ``keep_steps`` (indices that the sampler visits)
    ``(x_0, trajectory)``, where trajectory holds ``t`` [K], ``x_t`` [K, *shape] and ``pred_x0``
    [K, *shape] at those steps (for the progressive-generation figures, Fig. 6). The other arguments are
    ``sample_steps``'s: ``steps``, ``timesteps``, ``spacing``, ``eta`` (DDIM), ``generator``, ``x_T``,
    ``t_start``, ``clip_denoised``, ``device``, ``progress``, and ``y`` / ``guidance_scale`` for guidance.
    DDIM with η = 0 draws nothing after x_T.
    """
    keep = set() if keep_steps is None else {int(i) for i in keep_steps}
    visited = sampling_timesteps(diffusion.num_timesteps, sampler, kwargs.get("steps"), kwargs.get("timesteps"),
                                 kwargs.get("spacing", "uniform"), kwargs.get("eta", 0.0), kwargs.get("t_start"))
    if not keep <= set(visited):
        raise ValueError(f"keep_steps {sorted(keep - set(visited))} are not among the sampler's timesteps")
    traj: dict[str, list] = {"t": [], "x_t": [], "pred_x0": []}
    x = None
    for step in sample_steps(diffusion, model, shape, sampler=sampler, **kwargs):
        if step["t"] in keep:
            traj["t"].append(step["t"])
            traj["x_t"].append(step["x_t"])
            traj["pred_x0"].append(step["pred_x0"])
        x = step["sample"]
    if keep_steps is None:
        return x
    return x, {"t": torch.tensor(traj["t"]), "x_t": torch.stack(traj["x_t"]), "pred_x0": torch.stack(traj["pred_x0"])}


def ddim_sample_loop(diffusion: GaussianDiffusion, model: Model, shape: Sequence[int], steps: int | None = None,
                     **kwargs):
    """``sample_loop(sampler="ddim", steps=steps, ...)``: DDIM on ``steps`` indices spaced by ``spacing``, on
    the given decreasing ``timesteps``, or on all T."""
    return sample_loop(diffusion, model, shape, sampler="ddim", steps=steps, **kwargs)
