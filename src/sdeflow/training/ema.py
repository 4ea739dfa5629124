"""Exponential moving averages of network weights.

- ``fixed``: θ̄ ← β θ̄ + (1 − β) θ with a constant β.
- ``power``: EDM2's power-function profile (Karras et al. 2024, eq. 2-3): β_t = (1 − 1/t)^{γ+1}, which
  averages the whole training history with weights ∝ τ^γ; γ is set from the profile's relative std
  σ_rel = √((γ+1) / ((γ+2)² (γ+3))) (EDM2's ``std_to_exp``).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

__all__ = ["EMA", "power_exponent"]


def power_exponent(std: float) -> float:
    """γ such that the power-function EMA has relative standard deviation ``std`` (EDM2, Alg. 2)."""
    t = std**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


class EMA(nn.Module):
    """An averaged copy of a module's parameters (buffers are copied as they are)."""

    def __init__(
        self, model: nn.Module, kind: str = "fixed", decay: float = 0.999, std: float = 0.05, start_step: int = 0
    ):
        super().__init__()
        if kind not in ("fixed", "power"):
            raise ValueError(f"unknown EMA kind '{kind}'; choose 'fixed' or 'power'")
        if kind == "fixed" and not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.kind, self.decay, self.start_step = kind, decay, start_step
        self.gamma = power_exponent(std) if kind == "power" else 0.0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.refresh()

    def refresh(self) -> None:
        """Gather the parameter lists again (after sharding replaced the parameters); they are gathered once
        because walking the module tree at every step would cost host time in the loop."""
        self._ema = (list(self.model.parameters()), list(self.model.buffers()))
        self._src: tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]] | None = None

    def _apply(self, fn, *args, **kwargs):  # nn.Module's hook under .to(), .cuda(), .double()
        """``.to(device)`` replaces buffer tensors (parameters keep their objects): gather the lists again."""
        out = super()._apply(fn, *args, **kwargs)
        self.refresh()
        return out

    def beta(self, step: int | torch.Tensor) -> float | torch.Tensor:
        """The averaging coefficient after optimizer step ``step`` (1-based); a tensor step (a CUDA-graphed
        training step counts on the device) gives a tensor, computed with tensor operations only."""
        if isinstance(step, torch.Tensor):
            t = step.double() - self.start_step
            if self.kind == "fixed":
                return torch.where(t > 0, torch.full_like(t, self.decay), 0.0)  # a fill: no host copy
            return torch.where(t > 1, (1 - 1 / t.clamp_min(1)) ** (self.gamma + 1), 0.0)
        if step <= self.start_step:
            return 0.0
        if self.kind == "fixed":
            return self.decay
        t = step - self.start_step
        return (1 - 1 / t) ** (self.gamma + 1) if t > 1 else 0.0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | torch.Tensor) -> None:
        beta = self.beta(step)
        if self._src is None or self._src[0] is not model:
            # the Parameter objects themselves (not detached views): they stay valid if .to() re-homes their data
            self._src = (model, list(model.parameters()), list(model.buffers()))
        (ema_p, ema_b), (_, src_p, src_b) = self._ema, self._src
        # β = 0 copies: lerp with weight 1 returns its end point exactly (and, unlike copy, has a sharding rule for
        # the DTensors of an FSDP run)
        if isinstance(beta, torch.Tensor):  # one weight tensor for all: read on the device when a graph replays
            weight = (1 - beta).to(ema_p[0].dtype)
            torch._foreach_lerp_(ema_p, src_p, [weight] * len(ema_p))
        else:
            torch._foreach_lerp_(ema_p, src_p, 1 - beta)
        for b_ema, b in zip(ema_b, src_b):
            b_ema.copy_(b)
