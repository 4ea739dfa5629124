"""Optimizers and learning-rate schedules from the config: one optimizer, LR schedule and gradient scaler per
objective phase."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig, optimizer_class
from .objective import Objective

__all__ = ["Phase", "build_optimizer", "build_phases", "lr_factor"]


@dataclass
class Phase:
    """One optimizer phase of an objective: the parameters it steps, and its optimizer, LR schedule and scaler."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


def build_phases(objective: Objective, t: TrainConfig, device: torch.device) -> dict[str, Phase]:
    """A :class:`Phase` for each of ``objective.phases``, from the config and the objective's overrides."""
    phases = {}
    for name in objective.phases:
        params = objective.parameters_for(name)
        opt = build_optimizer(params, t, device, **objective.optimizer_options(name))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, t))
        scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
        phases[name] = Phase(params, opt, sched, scaler)
    return phases


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
