"""Variance-preserving processes, s = 1/√(1+σ²), so unit-variance data keep unit variance (Ho et al. 2020;
Song et al. 2021); and the score SDE's sub-VP process, whose noise variance stays below VP's (Song et al. 2021,
eq. 29)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Process, _t

__all__ = ["SubVPProcess", "VPCosineProcess", "VPDiscreteProcess", "VPLinearProcess", "cosine_betas", "linear_betas"]


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear β schedule (Ho et al. 2020, §4), float64."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64, device="cpu")


def cosine_betas(num_steps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), β ≤ 0.999."""

    def f(i: Tensor) -> Tensor:
        return torch.cos((i / num_steps + offset) / (1 + offset) * math.pi / 2) ** 2

    i = torch.arange(num_steps, dtype=torch.float64, device="cpu")
    return torch.clamp(1 - f(i + 1) / f(i), max=max_beta)


class VPDiscreteProcess(Process):
    """DDPM's discrete VP process: ᾱ_i = ∏_{j≤i} (1 − β_j), i = 0..T−1 (Ho et al. 2020, eq. 4).

    Time is the (real-valued) step index t ∈ [0, T−1]; σ between integer steps is interpolated
    linearly in log σ, as k-diffusion's ``DiscreteSchedule`` and diffusers' Euler schedulers do.
    """

    name = "vp_discrete"

    def __init__(self, betas: Tensor | None = None, schedule: str = "linear", num_steps: int = 1000):
        if betas is None:
            if schedule == "linear":
                betas = linear_betas(num_steps)
            elif schedule == "cosine":
                betas = cosine_betas(num_steps)
            else:
                raise ValueError(f"unknown beta schedule '{schedule}' (expected 'linear' or 'cosine')")
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu")
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D sequence with 0 < β < 1")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.sigmas = torch.sqrt(1 / self.alphas_cumprod - 1)
        self.log_sigmas = torch.log(self.sigmas)
        self.num_steps = len(betas)
        self.t_min, self.t_max = 0.0, float(self.num_steps - 1)
        self._log_sigma_range = (float(self.log_sigmas[0]), float(self.log_sigmas[-1]))
        self._on_device: dict[torch.device, Tensor] = {}

    def _log_sigmas(self, device: torch.device) -> Tensor:
        """The log-σ table on ``device``, copied there once (no per-call transfers or host syncs)."""
        if device not in self._on_device:
            self._on_device[device] = self.log_sigmas.to(device)
        return self._on_device[device]

    def _interp(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t64 = t.double().clamp(self.t_min, self.t_max)
        lo = t64.floor().long().clamp(max=self.num_steps - 2)
        w = t64 - lo
        ls = self._log_sigmas(t.device)
        return ls[lo], ls[lo + 1], w

    def sigma(self, t: Tensor | float) -> Tensor:
        t = _t(t)
        a, b, w = self._interp(t)
        return torch.exp(a + w * (b - a)).to(t.dtype)

    def dsigma_dt(self, t: Tensor | float) -> Tensor:
        t = _t(t)
        a, b, w = self._interp(t)
        return (torch.exp(a + w * (b - a)) * (b - a)).to(t.dtype)

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        sigma = _t(sigma)
        ls = self._log_sigmas(sigma.device)
        x = torch.log(sigma.double()).clamp(*self._log_sigma_range)
        hi = torch.searchsorted(ls, x.contiguous()).clamp(1, self.num_steps - 1)
        lo = hi - 1
        w = (x - ls[lo]) / (ls[hi] - ls[lo])
        return (lo + w).to(sigma.dtype)


class _LinearBeta:
    """The score SDE's linear β(t) = β_min + t(β_max − β_min) and its integral B(t) = ∫₀ᵗ β."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5, t_max: float = 1.0):
        self.beta_min, self.beta_d = beta_min, beta_max - beta_min
        self.t_min, self.t_max = t_min, t_max

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + self.beta_d * t

    def _int_beta(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * self.beta_d * t**2

    def _t_of_int_beta(self, b: Tensor) -> Tensor:
        """Solve ½β_d t² + β_min t − B = 0 for t ≥ 0."""
        return (torch.sqrt(self.beta_min**2 + 2 * self.beta_d * b) - self.beta_min) / self.beta_d


class VPLinearProcess(_LinearBeta, Process):
    """Score-SDE VP with β(t) = β_min + t(β_max − β_min) (Song et al. 2021, eq. 11, 29).

    ᾱ(t) = exp(−∫₀ᵗ β) = exp(−β_min t − ½(β_max − β_min) t²), σ(t) = √(1/ᾱ − 1).
    """

    name = "vp_linear"

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(torch.expm1(self._int_beta(_t(t))))

    def dsigma_dt(self, t: Tensor | float) -> Tensor:
        t = _t(t)
        return self.beta(t) * torch.exp(self._int_beta(t)) / (2 * self.sigma(t))

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        return self._t_of_int_beta(torch.log1p(_t(sigma) ** 2))  # ∫β = ln(1 + σ²)


class SubVPProcess(_LinearBeta, Process):
    """The score SDE's sub-VP process (Song et al. 2021, eq. 29):

        dx = −½β(t) x dt + √(β(t)(1 − e^{−2B(t)})) dw,   B(t) = ∫₀ᵗ β,

    whose marginal is x_t = e^{−B/2} x0 + (1 − e^{−B}) ε. In the EDM view s = e^{−B/2} and
    σ = (1 − e^{−B}) e^{B/2} = 2 sinh(B/2). Its noise variance stays below VP's at every t, which gave the
    paper's best likelihoods. The prior is N(0, I) on x_t as for VP; t_min = 10⁻³ as in the paper's sampling.
    """

    name = "sub_vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        super().__init__(beta_min, beta_max, t_min, t_max)

    def s(self, t: Tensor | float) -> Tensor:
        return torch.exp(-0.5 * self._int_beta(_t(t)))

    def ds_dt(self, t: Tensor | float) -> Tensor:
        t = _t(t)
        return -0.5 * self.beta(t) * self.s(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return 2 * torch.sinh(0.5 * self._int_beta(_t(t)))

    def dsigma_dt(self, t: Tensor | float) -> Tensor:
        t = _t(t)
        return self.beta(t) * torch.cosh(0.5 * self._int_beta(t))

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        return self._t_of_int_beta(2 * torch.asinh(_t(sigma) / 2))


class VPCosineProcess(Process):
    """Continuous cosine VP (Nichol & Dhariwal 2021): ᾱ(t) = cos²φ(t)/cos²φ(0), φ(t) = (t+s)/(1+s)·π/2."""

    name = "vp_cosine"

    def __init__(self, offset: float = 0.008, t_min: float = 1e-4, t_max: float = 0.999):
        self.offset, self.t_min, self.t_max = offset, t_min, t_max
        self._cos0 = math.cos(offset / (1 + offset) * math.pi / 2)

    def _phi(self, t: Tensor) -> Tensor:
        return (t + self.offset) / (1 + self.offset) * math.pi / 2

    def sigma(self, t: Tensor | float) -> Tensor:
        c = torch.cos(self._phi(_t(t)))
        return torch.sqrt(torch.clamp(self._cos0**2 / c**2 - 1, min=0.0))

    def dsigma_dt(self, t: Tensor | float) -> Tensor:
        t = _t(t)
        phi = self._phi(t)
        dphi = math.pi / 2 / (1 + self.offset)
        dsig2 = self._cos0**2 * 2 * torch.sin(phi) / torch.cos(phi) ** 3 * dphi
        return dsig2 / (2 * self.sigma(t))

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        phi = torch.arccos(self._cos0 * torch.rsqrt(1 + _t(sigma) ** 2))
        return phi * 2 / math.pi * (1 + self.offset) - self.offset
