"""Samplers: Algorithm 2 (§3.2), DDIM (Song, Meng & Ermon 2021), and many images from one seed.

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

**Time indices** are 0-based as everywhere in ``ddpm_lib`` (index i is the paper's t = i + 1). After
the smallest index of τ the sampler steps to "index −1", where ᾱ = 1 (DDIM's ᾱ_0 := 1): x_0 = x̂_0.

**Many images from one seed** (``generate``): image i draws its x_T and every z from its own CPU
generator seeded by (seed, i) (``image_generators``). An image is thus the same whatever the batch
size, its position in a batch, or whether the job was interrupted and resumed; and the same on CPU
and GPU up to the network's arithmetic. The noise of a batch is drawn on the CPU, one small
``randn`` per image, and copied to the GPU without waiting for it (``non_blocking``), so it overlaps
the network's forward pass. ``generate(out_path=…)`` writes finished chunks of a fixed number of
images to ``<out_path>.partial/`` and, rerun with the same arguments, continues where it stopped.

**Classifier-free guidance** (Ho & Salimans 2022): for a class-conditional network, every sampler here
takes the class labels ``y`` and the guidance strength w (``guidance_scale``) and runs on
``guidance.Guided(model, y, w)``, ε̃ = (1 + w) ε(x_t, y) − w ε(x_t, ∅), in place of the network.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import atomic_path, write_text_atomic
from .data import derive_seed, to_model_range, to_uint8
from .diffusion import GaussianDiffusion, Generators, Model, check_choice, model_device, randn
from .guidance import check_guidance_scale, guided, num_classes_of, resolve_class_labels
from .precision import Autocast, check_precision, fp32_precision

SAMPLERS = ("ddpm", "ddim")
SPACINGS = ("uniform", "quadratic")
OUTPUT_SUFFIXES = (".npz", ".png")


# --------------------------------------------------------------------------- timesteps and noise


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


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded by (seed, image index): image i's noise stream."""
    return [torch.Generator().manual_seed(derive_seed(seed, "image", int(i))) for i in indices]


# --------------------------------------------------------------------------- one DDIM step


def ddim_mean_variance(diffusion: GaussianDiffusion, model: Model, x_t: Tensor, t: int, t_prev: int,
                       eta: float = 0.0, clip_denoised: bool = True) -> dict[str, Tensor | float]:
    """DDIM eq. 12 as a Gaussian: x_s ~ N(mean, variance·I) for s = ``t_prev`` < t (−1: x_0 itself).

    x̂_0 comes from ``diffusion.p_mean_variance`` (any mean type; with a learned variance only the
    mean part is used), clipped to [−1, 1] when ``clip_denoised``; ε̂ is recomputed from that x̂_0
    (eq. 4 solved for ε), so x_t = √ᾱ_t x̂_0 + √(1 − ᾱ_t) ε̂ holds exactly, as eq. 12 assumes.
    Returns ``mean`` [*x_t.shape], ``variance`` σ² (a float, eq. 16), ``pred_x0`` and ``pred_eps``.
    """
    alpha_bar = diffusion.const("alpha_bar")
    a_t = float(alpha_bar[t])
    a_s = float(alpha_bar[t_prev]) if t_prev >= 0 else 1.0
    var = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)  # eq. 16: σ_t(η)²

    t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    x0 = diffusion.p_mean_variance(model, x_t, t_batch, clip_denoised)["pred_x0"]
    eps = diffusion.predict_eps_from_x0(x_t, t_batch, x0)
    mean = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - var, 0.0)) * eps  # eq. 12 without σ z
    return {"mean": mean, "variance": var, "pred_x0": x0, "pred_eps": eps}


# --------------------------------------------------------------------------- the sampling loop


def sampling_timesteps(T: int, sampler: str = "ddpm", steps: int | None = None,
                       timesteps: Sequence[int] | None = None, spacing: str = "uniform",
                       eta: float = 0.0) -> list[int]:
    """The indices a sampler visits, in order, after checking its arguments (ValueError names them).

    ``"ddpm"``: all T−1 … 0 (Algorithm 2; ``steps`` may only be T, ``eta`` only 0). ``"ddim"``:
    ``timesteps`` (strictly decreasing indices in 0 … T−1), else ``ddim_timesteps(T, steps, spacing)``,
    else all T; ``eta`` in [0, 1].
    """
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("spacing", spacing, SPACINGS)
    if not 0 <= eta <= 1:
        raise ValueError(f"eta={eta} must lie in [0, 1] (DDIM eq. 16: 0 deterministic, 1 DDPM's posterior)")
    if steps is not None and timesteps is not None:
        raise ValueError("pass steps or timesteps, not both")
    if sampler == "ddpm":
        if timesteps is not None or steps not in (None, T) or eta != 0:
            raise ValueError(f"sampler='ddpm' runs all T={T} steps of Algorithm 2; steps, timesteps and eta "
                             "are for sampler='ddim' (eta=1 on all steps is Algorithm 2 with σ² = β̃_t)")
        return list(range(T - 1, -1, -1))
    if timesteps is not None:
        tau = [int(i) for i in timesteps]
        if not tau or any(not 0 <= i < T for i in tau) or any(a <= b for a, b in zip(tau, tau[1:], strict=False)):
            raise ValueError(f"timesteps must be strictly decreasing indices in 0 … {T - 1}, got {tau}")
        return tau
    return ddim_timesteps(T, steps if steps is not None else T, spacing)


@torch.no_grad()
def sample_loop(diffusion: GaussianDiffusion, model: Model, shape: Sequence[int], *, sampler: str = "ddpm",
                steps: int | None = None, timesteps: Sequence[int] | None = None, spacing: str = "uniform",
                eta: float = 0.0, generator: Generators = None, x_T: Tensor | None = None,
                clip_denoised: bool = True, device: torch.device | str | None = None, progress: bool = False,
                keep_steps: Sequence[int] | None = None, y: Tensor | int | None = None,
                guidance_scale: float = 0.0):
    """From x_T ~ N(0, I) to x_0 with Algorithm 2 (``sampler="ddpm"``) or DDIM (``"ddim"``).

    ``"ddpm"``: x_{t−1} = μ_θ(x_t, t) + σ_t z for every index (no noise at index 0), exactly
    ``GaussianDiffusion.p_sample_loop`` (the same numbers from the same generator). ``"ddim"``: eq. 12
    on ``sampling_timesteps(...)``. ``generator`` is one ``torch.Generator`` or a list with one per image;
    DDIM with η = 0 draws nothing after x_T. Returns x_0 [*shape]; with ``keep_steps`` (indices that
    the sampler visits) ``(x_0, trajectory)`` as ``p_sample_loop`` does (``t``, ``x_t``, ``pred_x0``).
    For a class-conditional model, ``y`` (labels [B] or one int) and ``guidance_scale`` w give
    classifier-free guidance (``guidance.Guided``), for either sampler; w = 0 is plain conditional sampling.
    """
    T = diffusion.num_timesteps
    tau = sampling_timesteps(T, sampler, steps, timesteps, spacing, eta)
    model = guided(model, y, guidance_scale)
    if sampler == "ddpm":  # Algorithm 2 lives with the paper's other equations
        return diffusion.p_sample_loop(model, shape, generator=generator, progress=progress,
                                       clip_denoised=clip_denoised, x_T=x_T, keep_steps=keep_steps, device=device)
    keep = set() if keep_steps is None else {int(i) for i in keep_steps}
    if not keep <= set(tau):
        raise ValueError(f"keep_steps {sorted(keep - set(tau))} are not among the sampler's timesteps")
    device = torch.device(device) if device is not None else model_device(model)
    if x_T is not None and tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    x = x_T.to(device) if x_T is not None else randn(shape, generator, device)
    traj: dict[str, list] = {"t": [], "x_t": [], "pred_x0": []}
    steps_iter = enumerate(tau)
    if progress:
        from tqdm.auto import tqdm
        steps_iter = tqdm(steps_iter, total=len(tau), desc=sampler)
    for k, t in steps_iter:  # DDIM eq. 12
        t_prev = tau[k + 1] if k + 1 < len(tau) else -1
        p = ddim_mean_variance(diffusion, model, x, t, t_prev, eta, clip_denoised)
        x_next = p["mean"]
        if p["variance"] > 0:
            x_next = x_next + math.sqrt(p["variance"]) * randn(x.shape, generator, device, x.dtype)
        if t in keep:
            traj["t"].append(t)
            traj["x_t"].append(x)
            traj["pred_x0"].append(p["pred_x0"])
        x = x_next
    if keep_steps is None:
        return x
    return x, {"t": torch.tensor(traj["t"]), "x_t": torch.stack(traj["x_t"]), "pred_x0": torch.stack(traj["pred_x0"])}


def ddim_sample_loop(diffusion: GaussianDiffusion, model: Model, shape: Sequence[int], steps: int | None = None,
                     *, timesteps: Sequence[int] | None = None, spacing: str = "uniform", eta: float = 0.0,
                     generator: Generators = None, x_T: Tensor | None = None, clip_denoised: bool = True,
                     device: torch.device | str | None = None, progress: bool = False,
                     keep_steps: Sequence[int] | None = None, y: Tensor | int | None = None,
                     guidance_scale: float = 0.0):
    """DDIM (eq. 12, σ of eq. 16) on ``steps`` indices spaced by ``spacing`` (``ddim_timesteps``), or on
    the given decreasing ``timesteps``, or on all T. See ``sample_loop`` for the other arguments."""
    return sample_loop(diffusion, model, shape, sampler="ddim", steps=steps, timesteps=timesteps,
                       spacing=spacing, eta=eta, generator=generator, x_T=x_T, clip_denoised=clip_denoised,
                       device=device, progress=progress, keep_steps=keep_steps, y=y,
                       guidance_scale=guidance_scale)


# --------------------------------------------------------------------------- many images


def _autocast(model: Model, device: torch.device, precision: str) -> Model:
    check_precision(precision)
    if precision != "bf16":
        return model  # fp32 / tf32: generate() sets the matmul precision around the loop
    return Autocast(model, device.type, torch.bfloat16)


def _image_shape(model: Model, image_shape: Sequence[int] | None) -> tuple[int, int, int]:
    if image_shape is not None:
        return tuple(int(s) for s in image_shape)
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("image_shape is required for a model without a .config (C, H, W)")
    return (cfg.in_channels, cfg.image_size, cfg.image_size)


def weights_fingerprint(model: Model) -> str:
    """SHA-256 of a module's state dict (names and bytes); a callable's class name otherwise."""
    if not isinstance(model, nn.Module):
        return type(model).__qualname__
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def generate(model: Model, diffusion: GaussianDiffusion, n: int, *, sampler: str = "ddpm",
             steps: int | None = None, spacing: str = "uniform", eta: float = 0.0, seed: int = 0,
             batch_size: int | None = None, device: torch.device | str | None = None, precision: str = "fp32",
             clip_denoised: bool = True, image_shape: Sequence[int] | None = None,
             out_path: str | Path | None = None, chunk_size: int = 1000, progress: bool = True,
             class_labels: int | str | Sequence[int] | Tensor | None = None, guidance_scale: float = 0.0,
             compile: bool = False) -> Tensor:
    """``n`` images as uint8 [n, H, W, C] (CPU), the same for a given seed whatever ``batch_size``.

    Image i's noise comes from its own generator (``image_generators(seed, [i])``), see the module
    docstring. ``sampler``, ``steps``, ``spacing``, ``eta`` as in ``sample_loop``. The model runs on
    ``device`` (default: where its weights are; an ``nn.Module`` is moved there and put in eval mode,
    since dropout would break the seed's promise), in ``precision`` (fp32, tf32 or bf16 autocast),
    ``batch_size`` images at a time (default min(n, chunk_size)). ``image_shape`` (C, H, W) defaults
    to ``model.config``.

    With ``out_path`` (``.npz`` or ``.png``) the images are also written: ``.npz`` holds ``images``
    and ``job`` (a JSON string of the arguments that determine the images), plus a grid of the first 64
    beside it (same name, ``.png``); ``.png`` is a grid of all of them. The job runs in chunks of
    ``chunk_size`` images written to ``<out_path>.partial/``; rerun with the same arguments it
    skips the chunks already there (any batch size); other arguments (or other weights) raise
    ValueError. The partial folder is removed once the output is written.

    A class-conditional model (``model.config.num_classes``) samples image i from class
    ``class_labels[i]``: one int for all, ``"cycle"`` (i mod K) or n labels
    (``guidance.resolve_class_labels``), with classifier-free guidance of strength ``guidance_scale``
    (w ≥ 0; 0 is plain conditional sampling). Without labels it samples with the null label ∅, i.e.
    the model's unconditional half. Both enter the job of ``out_path``.

    ``compile=True`` runs the network through ``torch.compile`` (on CUDA, with channels_last as in
    training). In ``benchmarks/bench.py``'s sampling loop (one generator, not this function's
    per-image ones) that took 256 cifar10 images × 1000 steps from 34.5 s to 11.8 s in bf16 on one
    H200. Compiled kernels round differently from eager ones, so it enters the job of ``out_path``.
    """
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    for name, value, low in (("chunk_size", chunk_size, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    if out_path is not None and Path(out_path).suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"out_path {out_path}: the suffix must be one of {OUTPUT_SUFFIXES}")
    tau = sampling_timesteps(diffusion.num_timesteps, sampler, steps, None, spacing, eta)
    guidance_scale = check_guidance_scale(guidance_scale)
    num_classes = num_classes_of(model)
    labels = None
    if class_labels is not None:
        if num_classes is None:
            raise ValueError("class_labels were given, but the model is unconditional (no num_classes in its config)")
        labels = resolve_class_labels(class_labels, n, num_classes)
    elif guidance_scale != 0:
        raise ValueError(f"guidance_scale={guidance_scale:g} needs class_labels (guidance steers towards a class)")
    shape = _image_shape(model, image_shape)
    device = torch.device(device) if device is not None else model_device(model)
    if isinstance(model, nn.Module):
        model.to(device).eval()
        if compile and device.type == "cuda":
            model.to(memory_format=torch.channels_last)
    net = _autocast(torch.compile(model, dynamic=False) if compile else model, device, precision)
    batch_size = batch_size or min(n, chunk_size)

    def sample(indices: Sequence[int]) -> np.ndarray:  # uint8 [b, H, W, C]
        y = None if labels is None else labels[list(indices)].to(device)
        with fp32_precision(precision):
            x = sample_loop(diffusion, guided(net, y, guidance_scale, num_classes), (len(indices), *shape),
                            sampler=sampler, steps=steps, spacing=spacing, eta=eta,
                            generator=image_generators(seed, indices), clip_denoised=clip_denoised, device=device)
        return to_uint8(x.float()).permute(0, 2, 3, 1).cpu().numpy()

    if out_path is None:
        return torch.from_numpy(_run_batches(sample, list(range(n)), batch_size, progress, 0, n))
    job = {"format": "ddpm_lib-samples", "version": 1, "n": n, "chunk_size": chunk_size, "sampler": sampler,
           "steps": len(tau), "spacing": spacing if sampler == "ddim" else None,
           "eta": float(eta), "seed": seed, "clip_denoised": clip_denoised, "precision": precision,
           "image_shape": list(shape), "T": diffusion.num_timesteps, "weights": weights_fingerprint(model)}
    if compile:  # only when set, so that jobs without it keep their old description
        job["compile"] = True
    if labels is not None:  # only for conditional jobs, so unconditional jobs keep their old description
        job["class_labels"] = hashlib.sha256(labels.numpy().astype("<i8").tobytes()).hexdigest()
        job["guidance_scale"] = guidance_scale
    return torch.from_numpy(_generate_to_file(Path(out_path), job, sample, batch_size, progress))


def _run_batches(sample: Callable[[Sequence[int]], np.ndarray], indices: list[int], batch_size: int,
                 progress: bool, done: int, total: int,
                 on_batch: Callable[[dict[int, np.ndarray]], None] | None = None) -> np.ndarray | None:
    """Sample ``indices`` in batches. With ``on_batch``, hand it each batch ({index: image}) and keep
    nothing (the caller stores them); without, return all images stacked."""
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=done, unit="img", desc="sampling")
    out = []
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        images = sample(batch)
        if on_batch is not None:
            on_batch(dict(zip(batch, images, strict=True)))
        else:
            out.append(images)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return np.concatenate(out) if out else None


def _generate_to_file(out: Path, job: dict, sample: Callable[[Sequence[int]], np.ndarray], batch_size: int,
                      progress: bool) -> np.ndarray:
    """The resumable job behind ``generate(out_path=…)``: chunk c holds images c·K … (c+1)·K − 1."""
    n, K = job["n"], job["chunk_size"]
    partial = out.with_name(out.name + ".partial")
    job_file = partial / "job.json"
    if job_file.is_file():
        old = json.loads(job_file.read_text())
        if old != job:
            diff = ", ".join(f"{k}: {old.get(k)!r} there, {job.get(k)!r} now"
                             for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k))
            raise ValueError(f"{partial} holds an unfinished job with other arguments ({diff}); rerun it with "
                             f"the same arguments to continue it, or delete {partial} to start afresh")
    else:
        partial.mkdir(parents=True, exist_ok=True)
        write_text_atomic(job_file, json.dumps(job, indent=2) + "\n")

    chunks = [range(c * K, min(n, (c + 1) * K)) for c in range((n + K - 1) // K)]

    def chunk_path(c: int) -> Path:
        return partial / f"chunk-{c:06d}.npy"

    todo = [c for c in range(len(chunks)) if not chunk_path(c).is_file()]
    pending: dict[int, dict[int, np.ndarray]] = {c: {} for c in todo}

    def save_finished(images: dict[int, np.ndarray]) -> None:
        for i, image in images.items():
            pending[i // K][i] = image
        for c in [c for c, got in pending.items() if len(got) == len(chunks[c])]:
            got = pending.pop(c)
            _save_chunk(chunk_path(c), np.stack([got[i] for i in chunks[c]]))

    indices = [i for c in todo for i in chunks[c]]
    _run_batches(sample, indices, batch_size, progress, n - len(indices), n, save_finished)

    images = np.concatenate([_load_chunk(chunk_path(c), (len(chunks[c]), *_hwc(job))) for c in range(len(chunks))])
    if out.suffix.lower() == ".npz":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, job=np.array(json.dumps(job, sort_keys=True)))
        save_uint8_grid(images[:64], out.with_suffix(".png"))
    else:
        save_uint8_grid(images, out)
    shutil.rmtree(partial)
    return images


def _hwc(job: dict) -> tuple[int, int, int]:
    c, h, w = job["image_shape"]
    return (h, w, c)


def _save_chunk(path: Path, images: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, images)


def _load_chunk(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    images = np.load(path)
    if images.dtype != np.uint8 or images.shape != shape:
        raise ValueError(f"{path} holds {images.dtype} {images.shape}, expected uint8 {shape}; delete it to redo it")
    return images


def save_uint8_grid(images: np.ndarray | Tensor, path: str | Path) -> Path:
    """uint8 images [n, H, W, C] as one PNG grid (``train.save_grid``)."""
    from .train import save_grid

    images = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
    return save_grid(to_model_range(images), path)
