"""Processes with unit scale s = 1: variance exploding (Song & Ermon 2019; Song et al. 2021) and EDM's σ(t) = t."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Process, _t

__all__ = ["EDMProcess", "VEProcess"]


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
