"""Small helpers that the samplers share, so each sampler reads like its paper (k-diffusion's ``to_d`` and
``get_ancestral_step`` are the model).

Every sampler walks a decreasing σ grid in EDM's σ-space x̃ = x0 + σ ε, where the probability-flow ODE reads
dx̃/dσ = (x̃ − D(x̃; σ))/σ (Karras et al. 2022, eq. 4 with s = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..core.preconditioning import DenoiserFn
from ..core.process import Process

Callback = Callable[[int, float, Tensor, Tensor], None]


def denoise(model: DenoiserFn, x: Tensor, sigma: float, cond: Tensor | None) -> Tensor:
    """D(x̃; σ) with σ broadcast to the batch in the sample's dtype."""
    return model(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype), cond)


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (so results do not depend on x's)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The PF-ODE slope dx̃/dσ = (x̃ − D)/σ, which is also the predicted noise ε̂ (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) of an ancestral step σ → σ' (Song et al. 2021, DDIM eq. 16 in σ-space):
    σ_up = η σ' √(1 − σ'²/σ²), σ_down = √(σ'² − σ_up²); η = 1 is DDPM's posterior, η = 0 deterministic."""
    if sigma_next == 0:
        return 0.0, 0.0
    up = eta * sigma_next * math.sqrt(max(0.0, 1 - sigma_next**2 / sigma**2))
    return math.sqrt(max(0.0, sigma_next**2 - up**2)), up


def sde_noise_std(sigma_next: float, h: float, eta: float) -> float:
    """Std of the fresh noise in an SDE-DPM-Solver++ step of log-step h: σ' √(1 − e^{−2ηh}) (Lu et al. 2022b)."""
    return sigma_next * math.sqrt(-math.expm1(-2 * eta * h))


def grid(sigmas: Tensor) -> list[float]:
    """The σ grid as Python floats: every scalar coefficient is then computed in float64."""
    return [float(s) for s in sigmas]


def notify(callback: Callback | None, i: int, sigma: float, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(i, sigma, x, denoised)


def flow_times(sigmas: Tensor, process: Process) -> list[float]:
    """The process's own time t(σ) at each grid point, with t = 0 at σ = 0 (flow-time samplers walk it)."""
    return [float(process.t_of_sigma(s)) if s > 0 else 0.0 for s in grid(sigmas)]


def velocity(model: DenoiserFn, xt: Tensor, sigma: float, t: float, cond, process: Process, callback=None, i=None):
    """v̂ = dx_t/dt at (x_t, t) from D at x̃ = x_t / s(t):

        dx_t/dt = ṡ x̃ + s σ̇ (x̃ − D)/σ = (ṡ + b) x̃ − b D,   b = s σ̇ / σ,

    with the scalar coefficients in float64: near a flow's t = 1, ṡ + b = (1 − t)/t is a difference of numbers
    close to 1, which float32 would round away.
    """
    s, ds, dsig = (float(f(t)) for f in (process.s, process.ds_dt, process.dsigma_dt))
    xs = xt / s
    denoised = denoise(model, xs, sigma, cond)
    if i is not None:
        notify(callback, i, sigma, xs, denoised)
    b = s * dsig / sigma
    return (ds + b) * xs - b * denoised
