"""Probability-flow ODE solvers: Euler, EDM's Heun and stochastic sampler, flow-time Euler and Heun, and an
adaptive Runge–Kutta solve. Signature of every sampler (see :mod:`sdeflow.sampling.samplers`):

    sampler(model, x, sigmas, cond=None, *, generator=None, callback=None, **options) -> x0
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.process import FlowProcess, Process
from .steps import denoise, flow_times, grid, notify, randn_like, to_d, velocity


@torch.no_grad()
def euler(model, x, sigmas, cond=None, *, generator=None, callback=None) -> Tensor:
    """Euler on the PF-ODE dx̃/dσ = (x̃ − D)/σ (Karras et al. 2022, eq. 4). NFE = N."""
    sig = grid(sigmas)
    for i in range(len(sig) - 1):
        denoised = denoise(model, x, sig[i], cond)
        notify(callback, i, sig[i], x, denoised)
        x = x + (sig[i + 1] - sig[i]) * to_d(x, sig[i], denoised)
    return x


@torch.no_grad()
def edm_stochastic(
    model,
    x,
    sigmas,
    cond=None,
    *,
    generator=None,
    callback=None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2). NFE = 2N − 1.

    Each step first raises the noise to σ̂ = σ(1 + γ), γ = min(S_churn/N, √2 − 1) for σ ∈ [S_tmin, S_tmax],
    by adding fresh noise of std √(σ̂² − σ²)·S_noise, then takes a Heun step from σ̂ to σ_{i+1}.
    """
    sig = grid(sigmas)
    n = len(sig) - 1
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * randn_like(x, generator)  # Alg. 2, line 6
        denoised = denoise(model, x, s_hat, cond)
        notify(callback, i, s_hat, x, denoised)
        d = to_d(x, s_hat, denoised)  # line 7
        x_next = x + (sn - s_hat) * d  # line 8
        if sn > 0:  # 2nd-order correction, lines 9-11
            d_next = to_d(x_next, sn, denoise(model, x_next, sn, cond))
            x_next = x + (sn - s_hat) * (d + d_next) / 2
        x = x_next
    return x


@torch.no_grad()
def heun(model, x, sigmas, cond=None, *, generator=None, callback=None) -> Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Alg. 1): :func:`edm_stochastic` with
    S_churn = 0. NFE = 2N − 1 (Euler into σ = 0). On a flow process :func:`~sdeflow.sample` runs
    :func:`flow_heun` instead: the trapezoid in σ-space is ill-conditioned on a flow's grid (see there)."""
    return edm_stochastic(model, x, sigmas, cond, generator=generator, callback=callback)


@torch.no_grad()
def flow_euler(model, x, sigmas, cond=None, *, generator=None, callback=None, process: Process | None = None) -> Tensor:
    """Euler in the process's own time on x_t (rectified flow: x_{t'} = x_t + (t' − t)·v̂). NFE = N.

    v̂ = dx_t/dt is the velocity implied by D (:func:`~sdeflow.sampling.steps.velocity`); with the linear flow
    path this is the sampler of Liu et al. 2022 / SD3 / diffusers' FlowMatchEuler.
    """
    process = process if process is not None else FlowProcess()
    sig, t = grid(sigmas), flow_times(sigmas, process)
    xt = x * float(process.s(t[0]))
    for i in range(len(sig) - 1):
        xt = xt + (t[i + 1] - t[i]) * velocity(model, xt, sig[i], t[i], cond, process, callback, i)
    return xt / float(process.s(t[-1]))


@torch.no_grad()
def flow_heun(model, x, sigmas, cond=None, *, generator=None, callback=None, process: Process | None = None) -> Tensor:
    """Heun's method in the process's own time on x_t (the 2nd-order sibling of :func:`flow_euler`, as
    diffusers' FlowMatchHeunDiscreteScheduler). NFE = 2N − 1 (Euler into σ = 0).

        x̄ = x_t + (t' − t) v̂(x_t, t),   x_{t'} = x_t + (t' − t)·(v̂(x_t, t) + v̂(x̄, t'))/2.

    Why not the trapezoid in σ (:func:`heun`): a flow's σ = t/(1 − t) starts near 10⁴, and the change of D between
    the first two grid points enters multiplied by (σ_0 − σ_1)/(2σ_1) ~ 10³; in t the factor is below 1.
    """
    process = process if process is not None else FlowProcess()
    sig, t = grid(sigmas), flow_times(sigmas, process)
    xt = x * float(process.s(t[0]))
    for i in range(len(sig) - 1):
        dt = t[i + 1] - t[i]
        v = velocity(model, xt, sig[i], t[i], cond, process, callback, i)
        x_pred = xt + dt * v
        if sig[i + 1] > 0:
            x_pred = xt + dt * (v + velocity(model, x_pred, sig[i + 1], t[i + 1], cond, process)) / 2
        xt = x_pred
    return xt / float(process.s(t[-1]))


@torch.no_grad()
def adaptive_ode(
    model,
    x,
    sigmas,
    cond=None,
    *,
    generator=None,
    callback=None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
) -> Tensor:
    """Adaptive-step PF-ODE solve (torchdiffeq; default Dormand–Prince RK45), then one final denoising.

    Integrates dx̃/du = x̃ − D(x̃; e^u) in u = ln σ from σ_0 to the smallest positive σ of the grid, then
    returns D at that σ (the noise-removal step of Song et al. 2021). NFE: as the solver needs, + 1. Only the
    grid's first and last positive σ matter, so the grid needs two of them (:func:`~sdeflow.sample` gives
    this sampler at least two steps).
    """
    from torchdiffeq import odeint

    sig = grid(sigmas)
    s_end = min(s for s in sig if s > 0)
    if s_end == sig[0]:
        raise ValueError(
            f"the adaptive sampler needs a grid with two positive σ (its start and end), e.g. steps >= 2; got {sig}"
        )

    def f(u: Tensor, y: Tensor) -> Tensor:
        return y - denoise(model, y, float(torch.exp(u)), cond)

    u = torch.tensor([math.log(sig[0]), math.log(s_end)], dtype=torch.promote_types(x.dtype, torch.float32))
    y = odeint(f, x, u.to(x.device), rtol=rtol, atol=atol, method=method)[-1]
    denoised = denoise(model, y, s_end, cond)
    notify(callback, len(sig) - 2, s_end, y, denoised)
    return denoised
