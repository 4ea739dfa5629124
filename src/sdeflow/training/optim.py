"""Optimizers and learning-rate schedules from the config: one optimizer per objective phase."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig, optimizer_class

__all__ = ["build_optimizer", "lr_factor"]


def build_optimizer(
    params: list[nn.Parameter], t: TrainConfig, device: torch.device, **overrides: Any
) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``params`` with the config's lr, weight decay and betas (``overrides`` win); on a
    GPU the fused implementation where one exists (the whole update in one kernel)."""
    cls = optimizer_class(t.optimizer)
    accepts = cls.__init__.__code__.co_varnames
    kw: dict[str, Any] = {"lr": t.lr, "weight_decay": t.weight_decay}
    if "betas" in accepts:
        kw["betas"] = tuple(t.betas)
    if t.fused_optimizer and device.type == "cuda" and "fused" in accepts:
        kw["fused"] = True
    return cls(params, **{**kw, **overrides})


def lr_factor(step: int, t: TrainConfig) -> float:
    """Linear warm-up over ``train.warmup_steps``, then constant, cosine or linear decay to 0 at ``train.steps``."""
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
    frac = min(1.0, step / max(1, t.steps))
    decay = {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * frac)), "linear": 1 - frac}[t.lr_schedule]
    return warm * decay
