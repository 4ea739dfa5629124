"""The contract every forward process fulfils in the EDM view (Karras et al. 2022, eq. 10):

    x_t = s(t) · (x0 + σ(t) · ε),      ε ~ N(0, I)

A process is the pair of schedules s(t), σ(t) on [t_min, t_max] with their derivatives and the inverse t(σ);
everything else (log-SNR, prior, noising) follows here once. The unscaled x̃ = x_t / s(t) = x0 + σ ε is EDM's
σ-space, where one denoiser D(x̃, σ) serves every process. The processes themselves live in ``vp``, ``ve`` and
``flow``; :func:`sdeflow.get_process` builds one by name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

__all__ = ["Process", "shift_time"]


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
