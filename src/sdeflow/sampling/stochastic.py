"""Samplers that inject noise: DDPM's ancestral chain, DDIM with η, Euler–Maruyama on the reverse SDE,
predictor–corrector and annealed Langevin dynamics. Signature as in :mod:`sdeflow.sampling.samplers`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.process import EDMProcess, Process
from .steps import ancestral_step, denoise, grid, notify, randn_like, to_d


@torch.no_grad()
def ddpm(model, x, sigmas, cond=None, *, generator=None, callback=None, variance: str = "small") -> Tensor:
    """DDPM ancestral sampling in its own VP form (Ho et al. 2020, Alg. 2). NFE = N.

    With ᾱ = 1/(1+σ²) at each grid point, α = ᾱ_t/ᾱ_{t−1}, β = 1 − α:
        x_{t−1} = (x_t − β/√(1−ᾱ_t) ε̂) / √α + √var z,  var = β̃ = β(1−ᾱ_{t−1})/(1−ᾱ_t) ("small") or β ("large").
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got '{variance}'")
    sig = grid(sigmas)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        ab, abn = 1 / (1 + s**2), 1 / (1 + sn**2)
        alpha = ab / abn
        beta = 1 - alpha
        denoised = denoise(model, x, s, cond)
        notify(callback, i, s, x, denoised)
        mean = (x * math.sqrt(ab) - beta / math.sqrt(1 - ab) * to_d(x, s, denoised)) / math.sqrt(alpha)
        if sn > 0:
            var = beta * (1 - abn) / (1 - ab) if variance == "small" else beta
            mean = mean + math.sqrt(var) * randn_like(x, generator)
        x = mean / math.sqrt(abn)
    return x


@torch.no_grad()
def ddim(model, x, sigmas, cond=None, *, generator=None, callback=None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in σ-space. NFE = N.

        x̃_{i+1} = D + σ_down ε̂ + σ_up z,   σ_up = η σ_{i+1} √(1 − σ_{i+1}²/σ_i²),  σ_down = √(σ_{i+1}² − σ_up²).
    η = 0 is deterministic (and equals Euler on the PF-ODE); η = 1 is DDPM's ancestral chain.
    """
    sig = grid(sigmas)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = denoise(model, x, s, cond)
        notify(callback, i, s, x, denoised)
        s_down, s_up = ancestral_step(s, sn, eta)
        x = denoised + s_down * to_d(x, s, denoised)
        if s_up > 0:
            x = x + s_up * randn_like(x, generator)
    return x


def _sde_step(model, x, s, sn, cond, process: Process, generator) -> tuple[Tensor, Tensor]:
    """One Euler–Maruyama step of the reverse SDE of ``process`` (Karras et al. 2022, eq. 6 with s(t)):
    dx = [f x − g² ∇log p_t(x)] dt + g dw̄,  f = ṡ/s,  g² = 2 s² σ σ̇,  ∇log p_t(x) = (s D − x)/(sσ)²."""
    denoised = denoise(model, x, s, cond)
    if sn == 0:
        return denoised, denoised  # final noise-free denoising step (Song et al. 2021, App. G)
    t, tn = float(process.t_of_sigma(s)), float(process.t_of_sigma(sn))
    sc, scn = float(process.s(t)), float(process.s(tn))
    f = float(process.ds_dt(t)) / sc
    g2 = 2 * sc**2 * s * float(process.dsigma_dt(t))
    xt = sc * x
    score = (sc * denoised - xt) / (sc * s) ** 2
    dt = tn - t
    xt = xt + (f * xt - g2 * score) * dt + math.sqrt(g2 * abs(dt)) * randn_like(x, generator)
    return xt / scn, denoised


@torch.no_grad()
def euler_maruyama(
    model, x, sigmas, cond=None, *, generator=None, callback=None, process: Process | None = None
) -> Tensor:
    """Euler–Maruyama on the reverse-time SDE of ``process`` (Song et al. 2021, eq. 6). NFE = N.

    The last step (into σ = 0) returns the denoised mean D. Default process: EDM's (s = 1, σ = t).
    """
    process = process if process is not None else EDMProcess(1e-12, 1e12)
    sig = grid(sigmas)
    for i in range(len(sig) - 1):
        x, denoised = _sde_step(model, x, sig[i], sig[i + 1], cond, process, generator)
        notify(callback, i, sig[i], x, denoised)
    return x


def _langevin(model, x, s, cond, generator, snr: float, steps: int) -> Tensor:
    """Langevin corrector at fixed σ with step ε = 2 (r‖z‖/‖∇log p‖)² (Song et al. 2021, Alg. 5). The norms are
    batch means, as in the paper's code: a per-sample ratio explodes where the score vanishes (mode centres)."""
    for _ in range(steps):
        score = -to_d(x, s, denoise(model, x, s, cond)) / s
        z = randn_like(x, generator)
        z_norm = z.reshape(len(z), -1).norm(dim=1).mean()
        g_norm = score.reshape(len(z), -1).norm(dim=1).mean()
        eps = 2 * (snr * z_norm / g_norm) ** 2
        x = x + eps * score + torch.sqrt(2 * eps) * z
    return x


@torch.no_grad()
def predictor_corrector(
    model,
    x,
    sigmas,
    cond=None,
    *,
    generator=None,
    callback=None,
    process: Process | None = None,
    snr: float = 0.16,
    corrector_steps: int = 1,
) -> Tensor:
    """Predictor–corrector (Song et al. 2021, Alg. 2-3): Langevin corrector steps at a target SNR, then an
    Euler–Maruyama reverse-SDE predictor step. NFE = N·(1 + corrector_steps)."""
    process = process if process is not None else EDMProcess(1e-12, 1e12)
    sig = grid(sigmas)
    for i in range(len(sig) - 1):
        x = _langevin(model, x, sig[i], cond, generator, snr, corrector_steps)
        x, denoised = _sde_step(model, x, sig[i], sig[i + 1], cond, process, generator)
        notify(callback, i, sig[i], x, denoised)
    return x


@torch.no_grad()
def annealed_langevin(
    model,
    x,
    sigmas,
    cond=None,
    *,
    generator=None,
    callback=None,
    steps_per_level: int = 5,
    snr: float = 0.16,
    final_denoise: bool = True,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the positive σ levels of the grid.

    At level σ_i: T steps x ← x + (α_i/2)∇log p + √α_i z with α_i = 2 (r σ_i)², i.e. NCSN's
    α_i = ε σ_i²/σ_L² with a step set by the SNR r. Optionally a final denoising step (Jolicoeur-Martineau
    et al. 2021). NFE = T·N (+1).
    """
    sig = [s for s in grid(sigmas) if s > 0]
    for i, s in enumerate(sig):
        alpha = 2 * (snr * s) ** 2
        for _ in range(steps_per_level):
            denoised = denoise(model, x, s, cond)
            x = x + alpha / 2 * (denoised - x) / s**2 + math.sqrt(alpha) * randn_like(x, generator)
        notify(callback, i, s, x, denoised)
    return denoise(model, x, sig[-1], cond) if final_denoise else x


@torch.no_grad()
def consistency(model, x, sigmas, cond=None, *, generator=None, callback=None, process: Process | None = None):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1). NFE = N; N = 1 is the one-step map.

        x0 = f(x̃, τ_0);  for τ_n = τ_1 … τ_{N−1}:  x̃ = x0 + √(τ_n² − σ_min²) z,  x0 = f(x̃, τ_n)

    with f the consistency model (a denoiser with D(x̃, σ_min) = x̃) and σ_min the process's lower end.
    """
    smin = process.sigma_min if process is not None else 0.0
    sig = grid(sigmas)
    x0 = x
    for i, s in enumerate(sig[:-1]):
        if i > 0:
            x = x0 + math.sqrt(max(s**2 - smin**2, 0.0)) * randn_like(x0, generator)
        x0 = denoise(model, x, s, cond)
        notify(callback, i, s, x, x0)
    return x0
