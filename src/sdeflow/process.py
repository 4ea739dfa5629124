"""Forward processes in the EDM view.

Every forward (noising) process is written as

    x_t = s(t) · (x0 + σ(t) · ε),      ε ~ N(0, I)                       (Karras et al. 2022, eq. 10)

so a process is nothing but the pair of schedules ``s(t)`` and ``σ(t)`` on a time interval
``[t_min, t_max]``.  The *unscaled* variable ``x̃ = x_t / s(t) = x0 + σ ε`` lives in the
"σ-space" of EDM, where one denoiser ``D(x̃, σ)`` serves every process.

Implemented processes:

===================  ===========================================  ===============================
name                 s(t), σ(t)                                    reference
===================  ===========================================  ===============================
``vp_discrete``      s = √ᾱ_t, σ = √(1/ᾱ_t − 1), ᾱ from betas       Ho et al. 2020 (DDPM)
``vp_linear``        β(t) = β_min + t(β_max − β_min), t ∈ (0, 1]    Song et al. 2021 (score SDE)
``vp_cosine``        ᾱ(t) = cos²(φ(t)) / cos²(φ(0))                 Nichol & Dhariwal 2021
``ve``               s = 1, σ = σ_min (σ_max/σ_min)^t               Song & Ermon 2019; Song 2021
``edm``              s = 1, σ = t                                   Karras et al. 2022
``flow``             s = 1 − t, σ = t / (1 − t)                     Liu 2022; Lipman 2022; SD3
===================  ===========================================  ===============================

Every VP process satisfies s = 1/√(1+σ²) (variance preserving for unit-variance data).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "EDMProcess",
    "FlowProcess",
    "Process",
    "VEProcess",
    "VPCosineProcess",
    "VPDiscreteProcess",
    "VPLinearProcess",
    "cosine_betas",
    "get_process",
    "linear_betas",
    "shift_time",
]


def _t(x: Tensor | float) -> Tensor:
    """Float input → float64 tensor; tensors keep their dtype and device."""
    return x if isinstance(x, Tensor) else torch.tensor(float(x), dtype=torch.float64)


def shift_time(t: Tensor | float, shift: float) -> Tensor:
    """SD3's timestep shift (Esser et al. 2024, eq. 23): t' = α t / (1 + (α − 1) t).

    With α > 1 the time is pushed towards the noisy end; α = 1 is the identity.
    """
    t = _t(t)
    return shift * t / (1 + (shift - 1) * t)


class Process(ABC):
    """A forward process ``x_t = s(t)(x0 + σ(t) ε)`` on ``[t_min, t_max]``."""

    name: str = "process"
    t_min: float
    t_max: float

    # --- the two schedules and their derivatives -------------------------------------------------
    @abstractmethod
    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise level σ(t) of the unscaled variable x̃ = x0 + σ ε."""

    @abstractmethod
    def dsigma_dt(self, t: Tensor | float) -> Tensor:
        """dσ/dt."""

    @abstractmethod
    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        """Inverse schedule t(σ)."""

    def s(self, t: Tensor | float) -> Tensor:
        """Scale s(t). Default: the variance-preserving s = 1/√(1+σ²)."""
        return torch.rsqrt(1 + self.sigma(t) ** 2)

    def ds_dt(self, t: Tensor | float) -> Tensor:
        """ds/dt. Default (VP): ds/dt = −s³ σ σ'."""
        sig = self.sigma(t)
        return -(self.s(t) ** 3) * sig * self.dsigma_dt(t)

    # --- derived quantities ------------------------------------------------------------------------
    def log_snr(self, t: Tensor | float) -> Tensor:
        """λ(t) = log SNR = log(s² / (s σ)²) = −2 log σ(t)."""
        return -2 * torch.log(self.sigma(t))

    def noise_std(self, t: Tensor | float) -> Tensor:
        """Standard deviation of the noise in x_t: s(t)·σ(t)."""
        return self.s(t) * self.sigma(t)

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.t_min))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(self.t_max))

    def prior_std(self, sigma: float | None = None) -> float:
        """Std of the prior on the *unscaled* x̃ at noise level σ (default σ_max): what samplers start from.

        VP: x_t ~ N(0, I) for unit-variance data, so x̃ = x_t / s has std √(1+σ²). VE, EDM, flow: σ.
        """
        sigma = self.sigma_max if sigma is None else sigma
        return math.sqrt(1 + sigma**2)

    def sample_prior(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, sigma: float | None = None, **kw: Any
    ) -> Tensor:
        """x̃ ~ N(0, prior_std(σ)² I) in σ-space, at σ_max unless given."""
        return torch.randn(shape, generator=generator, **kw) * self.prior_std(sigma)

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = s(t)(x0 + σ(t) ε), t broadcast over the leading batch dimension."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return self.s(t).reshape(shape).to(x0) * (x0 + self.sigma(t).reshape(shape).to(x0) * noise)

    def check_sigma(self, sigma: Tensor | float, rtol: float = 1e-4) -> None:
        """Raise ValueError if σ lies outside [σ_min, σ_max] (relative tolerance rtol)."""
        sig = _t(sigma)
        lo, hi = self.sigma_min * (1 - rtol), self.sigma_max * (1 + rtol)
        if sig.numel() and (bool((sig < lo).any()) or bool((sig > hi).any())):
            raise ValueError(
                f"σ outside the range of process '{self.name}': got [{float(sig.min()):.6g}, "
                f"{float(sig.max()):.6g}], allowed [{self.sigma_min:.6g}, {self.sigma_max:.6g}]"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(t∈[{self.t_min:g}, {self.t_max:g}], σ∈[{self.sigma_min:.4g}, {self.sigma_max:.4g}])"
        )


# ------------------------------------------------------------------------------------------------
# Variance preserving
# ------------------------------------------------------------------------------------------------
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


class VPLinearProcess(Process):
    """Score-SDE VP with β(t) = β_min + t(β_max − β_min) (Song et al. 2021, eq. 11, 29).

    ᾱ(t) = exp(−∫₀ᵗ β) = exp(−β_min t − ½(β_max − β_min) t²), σ(t) = √(1/ᾱ − 1).
    """

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5, t_max: float = 1.0):
        self.beta_min, self.beta_d = beta_min, beta_max - beta_min
        self.t_min, self.t_max = t_min, t_max

    def _int_beta(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * self.beta_d * t**2

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(torch.expm1(self._int_beta(_t(t))))

    def dsigma_dt(self, t: Tensor | float) -> Tensor:
        t = _t(t)
        beta = self.beta_min + self.beta_d * t
        return beta * torch.exp(self._int_beta(t)) / (2 * self.sigma(t))

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        log1p_s2 = torch.log1p(_t(sigma) ** 2)  # = ∫β, solve ½β_d t² + β_min t − L = 0
        return (torch.sqrt(self.beta_min**2 + 2 * self.beta_d * log1p_s2) - self.beta_min) / self.beta_d


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


# ------------------------------------------------------------------------------------------------
# Variance exploding, EDM, flow
# ------------------------------------------------------------------------------------------------
class _UnitScale:
    """Mixin for processes with s(t) = 1."""

    def s(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_t(t))

    def ds_dt(self, t: Tensor | float) -> Tensor:
        return torch.zeros_like(_t(t))

    def prior_std(self, sigma: float | None = None) -> float:
        return self.sigma_max if sigma is None else sigma  # type: ignore[attr-defined]


class VEProcess(_UnitScale, Process):
    """SMLD / score-SDE VE: s = 1, σ(t) = σ_min (σ_max/σ_min)^t, t ∈ [t_min, 1] (Song et al. 2021, eq. 31)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5, t_max: float = 1.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self._smin, self._log_ratio = sigma_min, math.log(sigma_max / sigma_min)
        self.t_min, self.t_max = t_min, t_max

    def sigma(self, t: Tensor | float) -> Tensor:
        return self._smin * torch.exp(self._log_ratio * _t(t))

    def dsigma_dt(self, t: Tensor | float) -> Tensor:
        return self.sigma(t) * self._log_ratio

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        return torch.log(_t(sigma) / self._smin) / self._log_ratio


class EDMProcess(_UnitScale, Process):
    """EDM: s = 1, σ(t) = t (Karras et al. 2022, Table 1), t ∈ [0.002, 80]."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t_min, self.t_max = sigma_min, sigma_max

    def sigma(self, t: Tensor | float) -> Tensor:
        return _t(t).clone()

    def dsigma_dt(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(_t(t))

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        return _t(sigma).clone()


class FlowProcess(Process):
    """Rectified flow / flow matching with the linear path x_t = (1 − t) x0 + t ε.

    In the EDM view s(t) = 1 − t and σ(t) = t/(1 − t) (Liu et al. 2022; Lipman et al. 2022).
    ``shift`` is SD3's timestep shift (Esser et al. 2024, §5.3.2), used by the default training-time
    sampler and sampling schedules; it does not change the path itself.  t_max < 1 keeps σ finite.
    """

    name = "flow"

    def __init__(self, shift: float = 1.0, t_min: float = 1e-4, t_max: float = 1 - 1e-4):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        if not 0 <= t_min < t_max < 1:
            raise ValueError(f"need 0 <= t_min < t_max < 1, got {t_min}, {t_max}")
        self.shift, self.t_min, self.t_max = shift, t_min, t_max

    def s(self, t: Tensor | float) -> Tensor:
        return 1 - _t(t)

    def ds_dt(self, t: Tensor | float) -> Tensor:
        return -torch.ones_like(_t(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        t = _t(t)
        return t / (1 - t)

    def dsigma_dt(self, t: Tensor | float) -> Tensor:
        return 1 / (1 - _t(t)) ** 2

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        sigma = _t(sigma)
        return sigma / (1 + sigma)

    def noise_std(self, t: Tensor | float) -> Tensor:
        return _t(t).clone()

    def prior_std(self, sigma: float | None = None) -> float:
        # x_t ≈ t ε near t = 1 ⇒ x̃ = x_t / (1 − t) ≈ σ ε
        return self.sigma_max if sigma is None else sigma


_PROCESSES: dict[str, type[Process]] = {
    "vp_discrete": VPDiscreteProcess,
    "ddpm": VPDiscreteProcess,
    "vp_linear": VPLinearProcess,
    "vp": VPLinearProcess,
    "vp_cosine": VPCosineProcess,
    "ve": VEProcess,
    "smld": VEProcess,
    "edm": EDMProcess,
    "flow": FlowProcess,
    "rectified_flow": FlowProcess,
}


def get_process(name: str | Process, **kwargs: Any) -> Process:
    """Build a process by name (``vp_discrete``/``ddpm``, ``vp_linear``/``vp``, ``vp_cosine``,
    ``ve``/``smld``, ``edm``, ``flow``/``rectified_flow``)."""
    if isinstance(name, Process):
        return name
    try:
        cls = _PROCESSES[name]
    except KeyError:
        raise ValueError(f"unknown process '{name}'; choose one of {sorted(_PROCESSES)}") from None
    return cls(**kwargs)
