"""Consistency distillation and consistency training (Song et al. 2023; improved: Song & Dhariwal 2023), as an
objective on the one denoiser: the consistency model f(x̃, σ) is a denoiser whose boundary condition
f(x̃, σ_min) = x̃ holds by construction (``diffusion.consistency``, see :class:`~sdeflow.core.Denoiser`).

On Karras's grid σ_min = σ_1 < … < σ_N = σ_max (ρ = 7) with n drawn from 1 … N − 1 and z ~ N(0, I):

    L = λ(σ_n) d( f_θ(x + σ_{n+1} z, σ_{n+1}),  f_θ⁻(x̂_n, σ_n) )                          (Song et al., eq. 7 / 10)

with x̂_n one step of the teacher's PF-ODE from σ_{n+1} to σ_n (distillation; Heun as Alg. 2 uses) or x + σ_n z
(training, no teacher). θ⁻ ← μ θ⁻ + (1 − μ) θ (μ = 0: a stop-gradient copy, as Song & Dhariwal). The improved
recipe: λ = 1/(σ_{n+1} − σ_n), n drawn with probabilities ∝ erf((ln σ_{n+1} − P_mean)/(√2 P_std)) −
erf((ln σ_n − P_mean)/(√2 P_std)), N doubling from s0 + 1 to s1 + 1 over training, pseudo-Huber d (§3.2–3.5).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import Tensor

from ..builders import build_denoiser
from ..core.preconditioning import DenoiserFn, pad_dims
from ..sampling.schedules import karras
from .diffusion import DiffusionObjective
from .distances import build_distance
from .ema import EMA
from .stream import Batch

__all__ = ["ConsistencyObjective", "discretization", "interval_probabilities"]


def discretization(step: int, total: int, s0: int, s1: int, curriculum: bool = True) -> int:
    """N(k) = min(s0 · 2^⌊k/K'⌋, s1) + 1 with K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ (Song & Dhariwal 2023, eq. 9); s0 + 1
    without the curriculum."""
    if not curriculum:
        return s0 + 1
    k_prime = max(total // (int(math.log2(s1 // s0)) + 1), 1)
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def interval_probabilities(sigmas: Tensor, p_mean: float, p_std: float) -> Tensor:
    """p(n) ∝ erf((ln σ_{n+1} − P_mean)/(√2 P_std)) − erf((ln σ_n − P_mean)/(√2 P_std)) over the N − 1 intervals
    of an increasing grid (Song & Dhariwal 2023, §3.5)."""
    e = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    p = e[1:] - e[:-1]
    return p / p.sum()


class ConsistencyObjective(DiffusionObjective):
    """A consistency model distilled from ``finetune.base`` (or trained alone, ``fewstep.mode: train``)."""

    name = "consistency"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher: DenoiserFn | None = None  # distillation's frozen teacher (training: None)

    @classmethod
    def from_config(cls, cfg, data_shape, autoencoder=None, cached=False, captions=None, teacher=None):
        obj = super().from_config(cfg, data_shape, autoencoder, cached, captions)
        return obj.setup(teacher)

    def start_from_base(self, data_shape: tuple[int, ...]) -> None:
        super().start_from_base(data_shape)
        if self.cfg.fewstep.mode == "distill":  # the frozen teacher: the base as it was, without the boundary
            teacher = copy.deepcopy(self.net).eval().requires_grad_(False)
            diffusion = dataclasses.replace(self.cfg.diffusion, consistency=False)
            self.teacher = build_denoiser(teacher, self.recipe, diffusion, check_range=False)

    def setup(self, teacher: DenoiserFn | None = None) -> ConsistencyObjective:
        """The distance, the target network and (for a teacher that is not a checkpoint, e.g. an exact mixture,
        which makes the run a distillation) the teacher; called once the student's weights are in place."""
        f = self.cfg.fewstep
        if teacher is not None:
            self.teacher = teacher
        if f.mode == "distill" and self.teacher is None:
            raise ValueError("consistency distillation needs a teacher (finetune.base)")
        self.distance = build_distance(f.distance, f.perceptual_resolution)
        self.target = EMA(self.net, "fixed", decay=f.target_decay) if f.target_decay > 0 else None
        if self.target is not None:  # a plain attribute: the target's weights are saved once, in extra_state
            object.__setattr__(
                self,
                "target_denoiser",
                build_denoiser(self.target.model, self.recipe, self.cfg.diffusion, check_range=False),
            )
        self._grids: dict[tuple[int, torch.device], Tensor] = {}
        return self

    def extra_state(self) -> dict:
        return {"target": self.target.model.state_dict()} if self.target is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.target is not None:
            self.target.model.load_state_dict(state["target"])

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if self.target is not None:
            self.target.update(self.net, step)

    def grid(self, step: int, device: torch.device) -> Tensor:
        """Karras's increasing grid σ_1 … σ_N of this step's N."""
        f, p = self.cfg.fewstep, self.recipe.process
        n = discretization(step, self.cfg.train.steps, f.s0, f.s1, f.curriculum)
        if (n, device) not in self._grids:  # built once per N: no host-to-device copy per step
            self._grids[n, device] = karras(n, p.sigma_min, p.sigma_max, f.rho)[:-1].flip(0).to(device)
        return self._grids[n, device]

    def draw_intervals(self, batch: Batch, sigmas: Tensor) -> Tensor:
        """n ∈ {0 … N − 2} (0-based) per sample, from the batch's generator by inverse CDF."""
        f = self.cfg.fewstep
        u = batch.rand().to(sigmas.device).double()
        if f.n_sampling == "uniform":
            return (u * (len(sigmas) - 1)).long().clamp_max(len(sigmas) - 2)
        cdf = interval_probabilities(sigmas, f.p_mean, f.p_std).cumsum(0)
        return torch.searchsorted(cdf, u).clamp_max(len(sigmas) - 2)

    @torch.no_grad()
    def teacher_step(self, x: Tensor, s_from: Tensor, s_to: Tensor, cond) -> Tensor:
        """One step of the teacher's PF-ODE dx̃/dσ = (x̃ − D(x̃; σ))/σ from σ_{n+1} to σ_n: Euler, or Heun (EDM
        Alg. 1's trapezoid)."""
        a, b = pad_dims(s_from, x), pad_dims(s_to, x)
        d = (x - self.teacher(x, s_from, cond).to(x.dtype)) / a
        x_euler = x + (b - a) * d
        if self.cfg.fewstep.teacher_solver == "euler":
            return x_euler
        d2 = (x_euler - self.teacher(x_euler, s_to, cond).to(x.dtype)) / b
        return x + (b - a) * (d + d2) / 2

    def loss(self, batch: Batch, phase: str) -> Tensor:
        x0 = self.clean_data(batch)
        cond = self.condition(batch.labels, len(x0))
        sigmas = self.grid(batch.step, x0.device)
        n = self.draw_intervals(batch, sigmas)
        s_lo, s_hi = sigmas[n].to(x0.dtype), sigmas[n + 1].to(x0.dtype)
        z = batch.randn(*x0.shape[1:]).to(x0.dtype)
        x_hi = x0 + pad_dims(s_hi, x0) * z
        with torch.no_grad():
            if self.teacher is not None:  # distillation
                x_lo = self.teacher_step(x_hi, s_hi, s_lo, cond)
            else:
                x_lo = x0 + pad_dims(s_lo, x0) * z
            target_net = self.target_denoiser if self.target is not None else self.denoiser
            target = target_net(x_lo, s_lo, cond)
        weight = 1 / (s_hi - s_lo) if self.cfg.fewstep.weighting == "inverse_gap" else torch.ones_like(s_hi)
        return (weight * self.distance(self.denoiser(x_hi, s_hi, cond), target)).mean()
