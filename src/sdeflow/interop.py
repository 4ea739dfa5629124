"""Interoperability with diffusers: drive any diffusers scheduler with any sdeflow denoiser.

diffusers' VP schedulers (DDPM, DDIM, Euler, Heun, DPM-Solver, UniPC, …) expect an ε-predicting model
of the VP input x_t = x̃/√(1+σ²); FlowMatchEuler expects a velocity model of x_t = (1 − t) x0 + t ε; the EDM
schedulers (EDMEuler, EDMDPMSolverMultistep) expect EDM's raw network output F with D = c_skip x̃ + c_out F.
These adapters turn D(x̃, σ) into those, so a diffusers scheduler and an sdeflow sampler can be run on
the very same model and compared.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .core.preconditioning import DenoiserFn

__all__ = ["run_diffusers_scheduler"]


def _scheduler_sigma(sch: Any, t: Tensor) -> float:
    """The VP σ̃ = √((1−ᾱ)/ᾱ) the scheduler is at for timestep t."""
    idx = getattr(sch, "step_index", None)
    if getattr(sch, "sigmas", None) is not None and idx is not None:
        return float(sch.sigmas[idx])
    ac = float(sch.alphas_cumprod[int(t)])
    return ((1 - ac) / ac) ** 0.5


@torch.no_grad()
def run_diffusers_scheduler(
    scheduler: Any,
    model: DenoiserFn,
    noise: Tensor,
    cond: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Run a diffusers scheduler (``set_timesteps`` already called) from unit ``noise`` with the denoiser
    ``model``; returns (samples, NFE). Flow-matching schedulers get a velocity, EDM schedulers EDM's F, all
    others an ε-prediction."""
    flow = type(scheduler).__name__.startswith("FlowMatch")
    edm = type(scheduler).__name__.startswith("EDM")
    x = noise * (1.0 if flow else float(scheduler.init_noise_sigma))
    nfe = 0
    kw = {"generator": generator} if generator is not None else {}
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if not flow else x
        if edm:  # σ-space input; F = (D − c_skip x̃)/c_out (Karras et al. 2022, Table 1)
            sigma, sd = float(scheduler.sigmas[scheduler.step_index]), scheduler.config.sigma_data
            d = model(x, torch.full((len(x),), sigma, dtype=x.dtype, device=x.device), cond)
            out = (d - sd**2 / (sigma**2 + sd**2) * x) / (sigma * sd / (sigma**2 + sd**2) ** 0.5)
        elif flow:
            tk = float(scheduler.sigmas[scheduler.step_index if scheduler.step_index is not None else 0])
            sigma = tk / (1 - tk) if tk < 1 else 1e8
            x_tilde = x_in / max(1 - tk, 1e-8)
            d = model(x_tilde, torch.full((len(x),), sigma, dtype=x.dtype, device=x.device), cond)
            out = (x_in - d) / tk  # v = ε̂ − x̂0 = (x_t − x̂0)/t
        else:
            sigma = _scheduler_sigma(scheduler, t)
            x_tilde = x_in * (1 + sigma**2) ** 0.5
            d = model(x_tilde, torch.full((len(x),), sigma, dtype=x.dtype, device=x.device), cond)
            out = (x_tilde - d) / sigma
        nfe += 1
        x = scheduler.step(out.to(x.dtype), t, x, **kw).prev_sample
    return x, nfe
