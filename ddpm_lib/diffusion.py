"""The diffusion model of the paper (§2–3): forward process, reverse process, one step of each
algorithm, and the bound.

One class, ``GaussianDiffusion``, holds the math of one step: q (eqs. 2, 4), the posterior (eqs. 6–7),
p_θ (eq. 1 with §3.2's parameterizations), the loss of Algorithm 1 (eq. 14) and one step of
Algorithm 2; the loops over t that sample (Algorithm 2, DDIM) are ``samplers.sample_loop``. It owns no
network: a model is any callable ``model(x_t, t)`` that maps a batch x_t [B, C, H, W] and timestep
indices t (LongTensor [B]) to a prediction of the same shape, or 2C channels when the variance is
learned (mean part first).

**Time indices.** As in the official code, timesteps are 0-based: index ``i`` (0 … T−1) is the
paper's t = i + 1. So ``t = 0`` here is the paper's t = 1, the decoder step L_0, and ``t = T − 1``
is the paper's t = T, the first step of sampling.

Where the official code differs from the paper's text we follow the official code and say so:

* x̂_0 is clipped to [−1, 1] before it enters the posterior mean when sampling
  (``clip_denoised=True``). Eq. 11 without clipping is ``clip_denoised=False``; both define a valid
  reverse process, so the bound stays a bound either way.
* The variance at the paper's t = 1 (index 0): β̃_1 = 0, so its log is replaced by log β̃_2 for
  ``fixed_small`` and ``fixed_large`` alike (the official code does this for the decoder's scale,
  which is the only place index 0's variance is used: sampling adds no noise at t = 1).
* Schedule constants are computed in float64; they are cast to the data's dtype when gathered.

Beyond the paper, three options from later work, each a choice of the same class:

* ``var_type="learned_range"`` (Nichol & Dhariwal 2021, "Improved DDPM", arXiv:2102.09672, eq. 15): the
  network outputs v per pixel and log Σ_θ = frac · log β_t + (1 − frac) · log β̃_t with frac = (v + 1) / 2,
  so v = 1 is σ² = β_t (``fixed_large``) and v = −1 is σ² = β̃_t (``fixed_small``) exactly, index 0
  included (both ends use this module's fixed log-variances; improved-diffusion's code takes log β_1 there).
* ``loss_type="hybrid"`` (their §3.1): L_hybrid = L_simple + λ L_vlb with λ = 0.001, where the L_vlb term
  sees the predicted mean through a stop-gradient, so L_simple alone trains the mean and L_vlb the
  variance. Per example the L_vlb estimate is T · L_t (one uniformly drawn term, in bits/dim, as the
  ``"vlb"`` loss), so λ T L_t is their code's ``mse + vb`` at T = 1000 (and its "rescaled" variant,
  vb · T / 1000, at any T).
* ``mean_type="v"`` (Salimans & Ho 2022, "Progressive Distillation", arXiv:2202.00512, §4): the network
  predicts v = √ᾱ_t ε − √(1 − ᾱ_t) x_0, from which x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v and
  ε = √(1 − ᾱ_t) x_t + √ᾱ_t v; L_simple is then ‖v − v_θ‖².

The cosine schedule (Nichol & Dhariwal eq. 17) is ``schedules.make_beta_schedule("cosine", T)``, or
``DiffusionConfig(schedule="cosine")`` in a training config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import Model, check_choice
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .rng import Generators, randn
from .schedules import alpha_bar as schedule_alpha_bar
from .schedules import make_beta_schedule

MEAN_TYPES = ("eps", "x0", "mu", "v")
VAR_TYPES = ("fixed_large", "fixed_small", "learned", "learned_range")
LEARNED_VAR_TYPES = ("learned", "learned_range")  # the network outputs 2C channels: mean part, then variance
LOSS_TYPES = ("simple", "vlb", "hybrid")
HYBRID_LAMBDA = 0.001  # λ of L_hybrid (Nichol & Dhariwal 2021, §3.1)


class GaussianDiffusion:
    """Forward process q, reverse process p_θ and their bound, for a fixed schedule β_1 … β_T.

    Args:
        betas: β_1 … β_T, a 1-D tensor (stored in float64), each in (0, 1].
        mean_type: what the network predicts (§3.2, Table 2): ``"eps"`` the noise ε (eq. 11),
            ``"x0"`` the clean image x_0, ``"mu"`` the posterior mean μ̃ directly, ``"v"`` the
            velocity v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022).
        var_type: the reverse variance Σ_θ = σ_t² I (§3.2): ``"fixed_large"`` σ_t² = β_t,
            ``"fixed_small"`` σ_t² = β̃_t (eq. 7), ``"learned"`` a diagonal log-variance
            output by the network (Table 2, "learned diagonal Σ"), ``"learned_range"`` an
            interpolation between log β_t and log β̃_t output by the network (Nichol & Dhariwal, eq. 15).
        loss_type: ``"simple"`` L_simple (eq. 14; for mean types x0, mu and v the same unweighted
            squared error on their own target), ``"vlb"`` the true bound L (eq. 5), or ``"hybrid"``
            L_simple + λ L_vlb (Nichol & Dhariwal §3.1; needs a learned variance).
    """

    def __init__(
        self,
        betas: torch.Tensor | Sequence[float],
        mean_type: str = "eps",
        var_type: str = "fixed_large",
        loss_type: str = "simple",
    ) -> None:
        check_choice("mean_type", mean_type, MEAN_TYPES)
        check_choice("var_type", var_type, VAR_TYPES)
        check_choice("loss_type", loss_type, LOSS_TYPES)
        if loss_type == "simple" and var_type in LEARNED_VAR_TYPES:
            raise ValueError(
                f"loss_type='simple' gives a learned variance no gradient; with var_type={var_type!r} "
                "use loss_type='vlb' (Table 2 trains learned Σ with the true bound L) or 'hybrid' "
                "(L_simple + λ L_vlb, Nichol & Dhariwal 2021)"
            )
        if loss_type == "hybrid" and var_type not in LEARNED_VAR_TYPES:
            raise ValueError(
                f"loss_type='hybrid' adds λ L_vlb to train a learned variance, but var_type={var_type!r} is "
                f"fixed (its L_vlb term has no gradient); use one of {LEARNED_VAR_TYPES} or loss_type='simple'"
            )
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be 1-D with at least 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.num_timesteps = len(betas)

        # All constants in float64 (index i ↔ paper's t = i + 1).
        alphas = 1.0 - betas
        alpha_bar = schedule_alpha_bar(betas)  # ᾱ_t, the same function the schedules chapter plots
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        beta_tilde = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)  # eq. 7
        log_beta_tilde = torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]]))  # β̃_1 = 0: use β̃_2
        self._consts: dict[str, torch.Tensor] = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - alpha_bar).sqrt(),
            "sqrt_recip_alpha_bar": (1.0 / alpha_bar).sqrt(),
            "sqrt_recipm1_alpha_bar": (1.0 / alpha_bar - 1.0).sqrt(),
            "sqrt_alphas": alphas.sqrt(),
            "sqrt_betas": betas.sqrt(),
            "beta_tilde": beta_tilde,
            "log_beta_tilde": log_beta_tilde,
            # eq. 7: μ̃_t(x_t, x_0) = coef_x0 · x_0 + coef_xt · x_t
            "coef_x0": betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            "coef_xt": (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar),
            # fixed variances of p_θ; index 0 takes β̃_2 (see the module docstring)
            "log_var_fixed_large": torch.log(torch.cat([beta_tilde[1:2], betas[1:]])),
            "log_var_fixed_small": log_beta_tilde,
            "log_betas": torch.log(betas),  # the upper end of learned_range at every index, 0 included
        }
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, cfg) -> GaussianDiffusion:
        """From a ``configs.DiffusionConfig`` (or anything with its fields)."""
        return cls(make_beta_schedule(cfg.schedule, cfg.T), cfg.mean_type, cfg.var_type, cfg.loss_type)

    # ------------------------------------------------------------------ helpers

    def const(self, name: str) -> torch.Tensor:
        """A schedule constant as a float64 CPU tensor [T] (e.g. ``"alpha_bar"``, ``"beta_tilde"``)."""
        return self._consts[name]

    @property
    def betas(self) -> torch.Tensor:
        return self._consts["betas"]

    @property
    def alpha_bar(self) -> torch.Tensor:
        return self._consts["alpha_bar"]

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather constant ``name`` at indices t and shape it [B, 1, 1, …] to broadcast against ``like``.

        Constants are cast once per (device, dtype) from their float64 values; a float64 input
        keeps float64 precision, a float32 or bf16 one gets float32.
        """
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (like.device, dtype)
        if key not in self._cache:
            self._cache[key] = {k: v.to(device=like.device, dtype=dtype) for k, v in self._consts.items()}
        out = self._cache[key][name][t]
        return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))

    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        if t.dtype not in (torch.int64, torch.int32) or t.shape != (batch,):
            raise ValueError(f"t must be an integer tensor of shape [{batch}], got {t.dtype} {tuple(t.shape)}")
        T = self.num_timesteps
        msg = f"t must hold 0-based indices in 0 … {T - 1} (index i is the paper's t = i + 1)"
        if t.device.type == "cpu":
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
                raise ValueError(f"{msg}, got values from {int(t.min())} to {int(t.max())}")
        else:  # no host sync on an accelerator: fail on the device instead
            torch._assert_async(((t >= 0) & (t < T)).all(), msg)

    @staticmethod
    def _randn(shape, like: torch.Tensor, generator: Generators) -> torch.Tensor:
        """Standard normal noise from ``generator`` (see ``randn``), on ``like``'s device and dtype."""
        return randn(shape, generator, like.device, like.dtype)

    # ------------------------------------------------------------------ forward process q

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. 2: one step of the forward chain, x_t ~ N(√(1−β_t) x_{t−1}, β_t I)."""
        if noise is None:
            noise = self._randn(x_prev.shape, x_prev, generator)
        return (self._extract("sqrt_alphas", t, x_prev) * x_prev
                + self._extract("sqrt_betas", t, x_prev) * noise)

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Eq. 4: q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) → (mean, variance, log_variance)."""
        mean = self._extract("sqrt_alpha_bar", t, x0) * x0
        var = 1.0 - self._extract("alpha_bar", t, x0)
        return mean, var.expand_as(x0), torch.log(var).expand_as(x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. 4 as a sample: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, ε ~ N(0, I)."""
        self._check_t(t, x0.shape[0])
        if noise is None:
            noise = self._randn(x0.shape, x0, generator)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        return (self._extract("sqrt_alpha_bar", t, x0) * x0
                + self._extract("sqrt_one_minus_alpha_bar", t, x0) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Eqs. 6–7: q(x_{t−1} | x_t, x_0) = N(μ̃_t(x_t, x_0), β̃_t I) → (mean, variance, log_variance).

        The log-variance at index 0 uses β̃_2, since β̃_1 = 0 (see the module docstring).
        """
        mean = self._extract("coef_x0", t, x_t) * x0 + self._extract("coef_xt", t, x_t) * x_t
        var = self._extract("beta_tilde", t, x_t).expand_as(x_t)
        log_var = self._extract("log_beta_tilde", t, x_t).expand_as(x_t)
        return mean, var, log_var

    # ------------------------------------------------------------------ conversions between predictions

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Eq. 15: x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t (eq. 4 solved for x_0)."""
        return (self._extract("sqrt_recip_alpha_bar", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alpha_bar", t, x_t) * eps)

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Eq. 4 solved for ε: ε̂ = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t)."""
        return ((self._extract("sqrt_recip_alpha_bar", t, x_t) * x_t - x0)
                / self._extract("sqrt_recipm1_alpha_bar", t, x_t))

    def predict_x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Salimans & Ho 2022, §4: x̂_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
        return (self._extract("sqrt_alpha_bar", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alpha_bar", t, x_t) * v)

    def predict_v(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Salimans & Ho 2022, §4: the target v = √ᾱ_t ε − √(1 − ᾱ_t) x_0."""
        return (self._extract("sqrt_alpha_bar", t, x0) * eps
                - self._extract("sqrt_one_minus_alpha_bar", t, x0) * x0)

    def predict_x0_from_mean(self, x_t: torch.Tensor, t: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """Eq. 7 solved for x_0, for a network that predicts μ̃ directly."""
        return (mean - self._extract("coef_xt", t, x_t) * x_t) / self._extract("coef_x0", t, x_t)

    def eps_to_score(self, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """§3.2: the score of q(x_t) from ε, ∇ log q(x_t) ≈ s_θ(x_t, t) = −ε_θ(x_t, t) / √(1 − ᾱ_t)."""
        return -eps / self._extract("sqrt_one_minus_alpha_bar", t, eps)

    def score_to_eps(self, score: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Inverse of ``eps_to_score``: ε = −√(1 − ᾱ_t) · score."""
        return -score * self._extract("sqrt_one_minus_alpha_bar", t, score)

    # ------------------------------------------------------------------ reverse process p_θ

    def _check_output(self, out: torch.Tensor, x_t: torch.Tensor) -> None:
        C = x_t.shape[1]
        want = 2 * C if self.var_type in LEARNED_VAR_TYPES else C
        if out.shape[0] != x_t.shape[0] or out.shape[1] != want or out.shape[2:] != x_t.shape[2:]:
            raise ValueError(
                f"model output has shape {tuple(out.shape)}; var_type={self.var_type!r} needs "
                f"{(x_t.shape[0], want, *x_t.shape[2:])}"
            )

    def learned_range_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Nichol & Dhariwal 2021, eq. 15: log Σ_θ = frac · log β_t + (1 − frac) · log β̃_t, frac = (v + 1) / 2.

        v = −1 gives ``fixed_small`` exactly. v = 1 gives log β_t at every index, as in their code, so it
        equals ``fixed_large`` except at index 0: there ``fixed_large`` follows the DDPM code (log β̃_2),
        while the learned range spans [β̃_2, β_1] and the decoder's variance stays learnable. v outside
        [−1, 1] extrapolates, as in their code.
        """
        frac = (v + 1) / 2
        return (frac * self._extract("log_betas", t, v)
                + (1 - frac) * self._extract("log_var_fixed_small", t, v))

    def p_mean_variance_from_output(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                                    clip_denoised: bool = True) -> dict[str, torch.Tensor]:
        """The Gaussian p_θ(x_{t−1} | x_t) = N(μ_θ, Σ_θ) (eq. 1, §3.2) from a network output already computed.

        Read top to bottom, as the official code's ``p_mean_variance``: split the output (mean part first,
        then the variance part when Σ is learned), the log-variance, x̂_0 from the mean part, the clip, and
        the mean μ̃_t(x_t, x̂_0). For ε-prediction that mean is eq. 11 written through x̂_0 (identical to
        eq. 11 when x̂_0 is not clipped). Returns ``mean``, ``variance``, ``log_variance``, ``pred_x0`` (x̂_0)
        and ``pred_eps`` (ε̂).
        """
        self._check_output(out, x_t)
        C = x_t.shape[1]
        out = out.to(x_t.dtype)
        pred, var_out = out[:, :C], out[:, C:]  # the mean part (ε, x_0, μ̃ or v) and, if learned, Σ's part
        if self.var_type == "learned":  # Table 2's learned diagonal Σ: the network outputs log σ²
            log_var = var_out
        elif self.var_type == "learned_range":  # Nichol & Dhariwal eq. 15
            log_var = self.learned_range_log_variance(var_out, t)
        else:  # σ_t² = β_t or β̃_t (§3.2); index 0 takes β̃_2
            log_var = self._extract(f"log_var_{self.var_type}", t, x_t).expand_as(x_t)
        if self.mean_type == "eps":
            x0 = self.predict_x0_from_eps(x_t, t, pred)  # eq. 15
        elif self.mean_type == "v":
            x0 = self.predict_x0_from_v(x_t, t, pred)  # Salimans & Ho §4
        elif self.mean_type == "mu":
            x0 = self.predict_x0_from_mean(x_t, t, pred)  # eq. 7 solved for x_0
        else:
            x0 = pred  # the network predicts x_0
        if clip_denoised:  # the official code's clip (module docstring)
            x0 = x0.clamp(-1.0, 1.0)
        if self.mean_type == "mu":
            mean = pred  # a predicted mean is used as it is (the official code does not clip it)
        else:
            mean = self.q_posterior(x0, x_t, t)[0]  # eq. 7: μ̃_t(x_t, x̂_0); eq. 11 for ε when unclipped
        eps = pred if self.mean_type == "eps" else self.predict_eps_from_x0(x_t, t, x0)  # eq. 4 solved for ε
        return {"mean": mean, "variance": torch.exp(log_var), "log_variance": log_var,
                "pred_x0": x0, "pred_eps": eps}

    def p_mean_variance(self, model: Model, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = True) -> dict[str, torch.Tensor]:
        """Eq. 1 with §3.2's parameterizations: the network at (x_t, t), then ``p_mean_variance_from_output``."""
        self._check_t(t, x_t.shape[0])
        return self.p_mean_variance_from_output(model(x_t, t), x_t, t, clip_denoised)

    def mean_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Eq. 11: μ_θ(x_t, t) = (x_t − β_t / √(1 − ᾱ_t) · ε_θ) / √α_t."""
        coef = self._extract("betas", t, x_t) / self._extract("sqrt_one_minus_alpha_bar", t, x_t)
        return (x_t - coef * eps) / self._extract("sqrt_alphas", t, x_t)

    # ------------------------------------------------------------------ the bound (eq. 5)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim, per example [B] (≈ 1e-5 for the paper's β)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2)

    def vb_terms_bpd_from_output(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                                 t: torch.Tensor, clip_denoised: bool = True) -> dict[str, torch.Tensor]:
        """One term of eq. 5 per example, in bits/dim: L_{t−1} for t ≥ 1 (index > 0), L_0 at index 0.

        L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) (eq. 5), a KL between Gaussians;
        L_0 = −log p_θ(x_0 | x_1), the discretized Gaussian decoder of eq. 13.
        """
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance_from_output(out, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2)
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        ) / math.log(2)
        return {"output": torch.where(t == 0, nll, kl), "pred_x0": p["pred_x0"]}

    @torch.no_grad()
    def vlb_bpd(self, model: Model, x0: torch.Tensor, clip_denoised: bool = True,
                generator: torch.Generator | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
        """The whole bound of eq. 5 for each example, in bits per dimension.

        Returns ``total`` [B] = ``prior`` [B] + ``terms`` [B, T].sum(1), where ``terms[:, 0]`` is the
        decoder NLL L_0 and ``terms[:, i]`` (i ≥ 1) is L_{t−1} at t = i + 1, each from one sample of
        x_t ~ q(x_t | x_0); also ``x0_mse`` [B, T], the squared error of x̂_0 at each step (for
        rate–distortion, §4.3). x0 must lie on the 256-level grid in [−1, 1].
        """
        B, T = x0.shape[0], self.num_timesteps
        terms = torch.zeros(B, T, dtype=torch.float64, device=x0.device)
        mse = torch.zeros_like(terms)
        steps = range(T - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="bound, t", leave=False)
        for i in steps:
            t = torch.full((B,), i, device=x0.device, dtype=torch.long)
            x_t = self.q_sample(x0, t, generator=generator)
            r = self.vb_terms_bpd_from_output(model(x_t, t), x0, x_t, t, clip_denoised)
            terms[:, i] = r["output"].to(torch.float64)
            mse[:, i] = mean_flat((r["pred_x0"] - x0) ** 2).to(torch.float64)
        prior = self.prior_bpd(x0).to(torch.float64)
        return {"total": prior + terms.sum(1), "prior": prior, "terms": terms, "x0_mse": mse}

    # ------------------------------------------------------------------ Algorithm 1: training

    def training_losses(self, model: Model, x0: torch.Tensor, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Algorithm 1's loss for each example, shape [B], in float32.

        t ~ Uniform{0, …, T−1} and ε ~ N(0, I) are drawn from ``generator`` unless given.
        ``loss_type="simple"``: eq. 14, ‖target − network output‖² averaged over pixels, where the
        target is ε, x_0 or the posterior mean mu_tilde_t(x_t, x_0) (eq. 7) for mean types eps, x0 and mu
        (Table 2's rows).
        ``loss_type="vlb"``: the term of eq. 5 at the drawn t, in bits/dim (L_0 at index 0); its
        expectation over t times T, plus L_T, is the bound per dimension. Learned variances train
        only through this loss or the next.
        ``loss_type="hybrid"`` (Nichol & Dhariwal §3.1): L_simple + λ · T · (that term) with λ = 0.001,
        the term computed with the mean output detached (a stop-gradient), so it trains the variance only.
        For mean type v the simple target is v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022).
        """
        B = x0.shape[0]
        if t is None:
            gdev = generator.device if generator is not None else x0.device
            t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device=gdev).to(x0.device)
        self._check_t(t, B)
        if noise is None:
            noise = self._randn(x0.shape, x0, generator)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t).float()
        x0f, x_tf = x0.float(), x_t.float()
        if self.loss_type == "vlb":
            return self.vb_terms_bpd_from_output(out, x0f, x_tf, t, clip_denoised=False)["output"]
        self._check_output(out, x_tf)
        mean_out, var_out = out[:, :x_tf.shape[1]], out[:, x_tf.shape[1]:]
        target = {
            "eps": lambda: noise.float(),
            "x0": lambda: x0f,
            "mu": lambda: self.q_posterior(x0f, x_tf, t)[0],
            "v": lambda: self.predict_v(x0f, t, noise.float()),
        }[self.mean_type]()
        loss = mean_flat((target - mean_out) ** 2)
        if self.loss_type == "hybrid":  # stop-gradient on the mean: L_vlb trains only the variance
            frozen = torch.cat([mean_out.detach(), var_out], dim=1)
            vlb = self.vb_terms_bpd_from_output(frozen, x0f, x_tf, t, clip_denoised=False)["output"]
            loss = loss + HYBRID_LAMBDA * self.num_timesteps * vlb
        return loss

    # ------------------------------------------------------------------ Algorithm 2: one step

    @torch.no_grad()
    def p_sample(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 generator: Generators = None,
                 noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Algorithm 2, lines 3–4: x_{t−1} = μ_θ(x_t, t) + σ_t z, z ~ N(0, I), and z = 0 at t = 1 (index 0).

        z is ``noise`` when given, else drawn from ``generator`` (also at index 0, where it is not used,
        so that every step draws the same amount). The whole loop is ``samplers.sample_loop``.
        """
        self._check_t(t, x_t.shape[0])
        p = self.p_mean_variance_from_output(model(x_t, t), x_t, t, clip_denoised)  # eq. 1: μ_θ and σ_t²
        z = noise.to(x_t) if noise is not None else self._randn(x_t.shape, x_t, generator)  # line 3
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))  # z = 0 at t = 1
        sample = p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * z  # line 4
        return {"sample": sample, "pred_x0": p["pred_x0"]}
