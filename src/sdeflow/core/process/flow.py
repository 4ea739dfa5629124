"""The linear flow path of rectified flow and flow matching, in the EDM view."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Process, _t

__all__ = ["FlowProcess"]


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
