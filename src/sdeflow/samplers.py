"""Samplers, each a small function written once against the denoiser D(x̃, σ, cond).

All samplers walk a decreasing σ grid (see :mod:`sdeflow.schedules`) in the unscaled σ-space
x̃ = x0 + σ ε of EDM, where the probability-flow ODE reads (Karras et al. 2022, eq. 4 with s = 1)

    dx̃/dσ = (x̃ − D(x̃; σ)) / σ.

Samplers defined by a particular process (DDPM's VP chain, the reverse SDE of a process, flow
Euler) convert to that process's x_t = s(t)·x̃ internally.  Signature of every sampler:

    sampler(model, x, sigmas, cond=None, *, generator=None, callback=None, **options) -> x0

``x`` is the initial state at σ_0 in σ-space (e.g. ``process.sample_prior``), ``sigmas`` the grid
with final 0.  Network evaluations (NFE) of each are stated in its docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .preconditioning import DenoiserFn
from .process import EDMProcess, FlowProcess, Process

__all__ = [
    "SAMPLERS",
    "adaptive_ode",
    "annealed_langevin",
    "ddim",
    "ddpm",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m",
    "dpmpp_3m_sde",
    "edm_stochastic",
    "euler",
    "euler_maruyama",
    "flow_euler",
    "flow_heun",
    "heun",
    "predictor_corrector",
    "unipc",
]

Callback = Callable[[int, float, Tensor, Tensor], None]


def _denoise(model: DenoiserFn, x: Tensor, sigma: float, cond: Tensor | None) -> Tensor:
    return model(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype), cond)


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def _grid(sigmas: Tensor) -> list[float]:
    return [float(s) for s in sigmas]


def _notify(callback: Callback | None, i: int, sigma: float, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(i, sigma, x, denoised)


# ------------------------------------------------------------------------------------------------
# DDPM and DDIM
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def ddpm(model, x, sigmas, cond=None, *, generator=None, callback=None, variance: str = "small") -> Tensor:
    """DDPM ancestral sampling in its own VP form (Ho et al. 2020, Alg. 2). NFE = N.

    With ᾱ = 1/(1+σ²) at each grid point, α = ᾱ_t/ᾱ_{t−1}, β = 1 − α:
        x_{t−1} = (x_t − β/√(1−ᾱ_t) ε̂) / √α + √var z,  var = β̃ = β(1−ᾱ_{t−1})/(1−ᾱ_t) ("small") or β ("large").
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got '{variance}'")
    sig = _grid(sigmas)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        ab, abn = 1 / (1 + s**2), 1 / (1 + sn**2)
        alpha = ab / abn
        beta = 1 - alpha
        denoised = _denoise(model, x, s, cond)
        _notify(callback, i, s, x, denoised)
        eps = (x - denoised) / s
        xt = x * math.sqrt(ab)
        mean = (xt - beta / math.sqrt(1 - ab) * eps) / math.sqrt(alpha)
        if sn > 0:
            var = beta * (1 - abn) / (1 - ab) if variance == "small" else beta
            mean = mean + math.sqrt(var) * _randn(x, generator)
        x = mean / math.sqrt(abn)
    return x


@torch.no_grad()
def ddim(model, x, sigmas, cond=None, *, generator=None, callback=None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in σ-space. NFE = N.

        x̃_{i+1} = D + √(σ_{i+1}² − σ_up²) ε̂ + σ_up z,   σ_up = η σ_{i+1} √(1 − σ_{i+1}²/σ_i²).
    η = 0 is deterministic (and equals Euler on the PF-ODE); η = 1 is DDPM's ancestral chain.
    """
    sig = _grid(sigmas)
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s, cond)
        _notify(callback, i, s, x, denoised)
        eps = (x - denoised) / s
        s_up = eta * sn * math.sqrt(max(0.0, 1 - sn**2 / s**2))
        x = denoised + math.sqrt(max(0.0, sn**2 - s_up**2)) * eps
        if s_up > 0:
            x = x + s_up * _randn(x, generator)
    return x


# ------------------------------------------------------------------------------------------------
# Probability-flow ODE: Euler, Heun, EDM's stochastic sampler, flow Euler, adaptive
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def euler(model, x, sigmas, cond=None, *, generator=None, callback=None) -> Tensor:
    """Euler on the PF-ODE dx̃/dσ = (x̃ − D)/σ (Karras et al. 2022, eq. 4). NFE = N."""
    sig = _grid(sigmas)
    for i in range(len(sig) - 1):
        denoised = _denoise(model, x, sig[i], cond)
        _notify(callback, i, sig[i], x, denoised)
        x = x + (sig[i + 1] - sig[i]) * (x - denoised) / sig[i]
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
    sig = _grid(sigmas)
    n = len(sig) - 1
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * _randn(x, generator)  # Alg. 2, line 6
        denoised = _denoise(model, x, s_hat, cond)
        _notify(callback, i, s_hat, x, denoised)
        d = (x - denoised) / s_hat  # line 7
        x_next = x + (sn - s_hat) * d  # line 8
        if sn > 0:  # 2nd-order correction, lines 9-11
            d_next = (x_next - _denoise(model, x_next, sn, cond)) / sn
            x_next = x + (sn - s_hat) * (d + d_next) / 2
        x = x_next
    return x


@torch.no_grad()
def flow_euler(model, x, sigmas, cond=None, *, generator=None, callback=None, process: Process | None = None) -> Tensor:
    """Euler in the process's own time on x_t (rectified flow: x_{t'} = x_t + (t' − t)·v̂). NFE = N.

    v̂ = dx_t/dt is the velocity implied by D (see :func:`_velocity`); with the
    linear flow path this is the sampler of Liu et al. 2022 / SD3 / diffusers' FlowMatchEuler.
    """
    process = process if process is not None else FlowProcess()
    sig = _grid(sigmas)
    t = [float(process.t_of_sigma(s)) if s > 0 else 0.0 for s in sig]
    xt = x * float(process.s(t[0]))
    for i in range(len(sig) - 1):
        v = _velocity(model, xt, sig[i], t[i], cond, process, callback, i)
        xt = xt + (t[i + 1] - t[i]) * v
    return xt / float(process.s(t[-1]))


def _velocity(model, xt, sigma, t, cond, process, callback=None, i=None) -> Tensor:
    """v̂ = dx_t/dt at (x_t, t) from D at x̃ = x_t / s(t):

        dx_t/dt = ṡ x̃ + s σ̇ (x̃ − D)/σ = (ṡ + b) x̃ − b D,   b = s σ̇ / σ,

    with the scalar coefficients in float64. (For a flow near t = 1, ṡ + b = (1 − t)/t is a difference of
    numbers near 1: in float32, computing it there lost the sample's noise part.)
    """
    s, ds, dsig = (float(f(t)) for f in (process.s, process.ds_dt, process.dsigma_dt))
    xs = xt / s
    denoised = _denoise(model, xs, sigma, cond)
    if i is not None:
        _notify(callback, i, sigma, xs, denoised)
    b = s * dsig / sigma
    return (ds + b) * xs - b * denoised


@torch.no_grad()
def flow_heun(model, x, sigmas, cond=None, *, generator=None, callback=None, process: Process | None = None) -> Tensor:
    """Heun's method in the process's own time on x_t (the 2nd-order sibling of :func:`flow_euler`, as
    diffusers' FlowMatchHeunDiscreteScheduler). NFE = 2N − 1 (Euler into σ = 0).

        x̄ = x_t + (t' − t) v̂(x_t, t),   x_{t'} = x_t + (t' − t)·(v̂(x_t, t) + v̂(x̄, t'))/2.

    For a flow, taking the trapezoid in σ-space (:func:`heun`) is ill-conditioned at few steps: σ = t/(1 − t)
    starts near 10⁴, and the change of D between the first two grid points enters multiplied by
    (σ_0 − σ_1)/(2σ_1) ~ 10³; in t it enters multiplied by (t_0 − t_1)/(2 t_1) < 1.
    """
    process = process if process is not None else FlowProcess()
    sig = _grid(sigmas)
    t = [float(process.t_of_sigma(s)) if s > 0 else 0.0 for s in sig]
    xt = x * float(process.s(t[0]))
    for i in range(len(sig) - 1):
        dt = t[i + 1] - t[i]
        v = _velocity(model, xt, sig[i], t[i], cond, process, callback, i)
        x_pred = xt + dt * v
        if sig[i + 1] > 0:
            x_pred = xt + dt * (v + _velocity(model, x_pred, sig[i + 1], t[i + 1], cond, process)) / 2
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
    returns D at that σ (the standard noise-removal step of Song et al. 2021). NFE: as the solver needs, + 1.
    """
    from torchdiffeq import odeint

    sig = _grid(sigmas)
    s_end = min(s for s in sig if s > 0)

    def f(u: Tensor, y: Tensor) -> Tensor:
        return y - _denoise(model, y, float(torch.exp(u)), cond)

    u = torch.tensor([math.log(sig[0]), math.log(s_end)], dtype=torch.promote_types(x.dtype, torch.float32))
    u = u.to(x.device)
    y = odeint(f, x, u, rtol=rtol, atol=atol, method=method)[-1]
    denoised = _denoise(model, y, s_end, cond)
    _notify(callback, len(sig) - 2, s_end, y, denoised)
    return denoised


# ------------------------------------------------------------------------------------------------
# Reverse SDE, predictor-corrector, annealed Langevin
# ------------------------------------------------------------------------------------------------
def _sde_step(model, x, s, sn, cond, process: Process, generator) -> tuple[Tensor, Tensor]:
    """One Euler–Maruyama step of the reverse SDE of ``process`` (Karras et al. 2022, eq. 6 with s(t)):
    dx = [f x − g² ∇log p_t(x)] dt + g dw̄,  f = ṡ/s,  g² = 2 s² σ σ̇,  ∇log p_t(x) = (s D − x)/(sσ)²."""
    denoised = _denoise(model, x, s, cond)
    if sn == 0:
        return denoised, denoised  # final noise-free denoising step (Song et al. 2021, App. G)
    t, tn = float(process.t_of_sigma(s)), float(process.t_of_sigma(sn))
    sc, scn = float(process.s(t)), float(process.s(tn))
    f = float(process.ds_dt(t)) / sc
    g2 = 2 * sc**2 * s * float(process.dsigma_dt(t))
    xt = sc * x
    score = (sc * denoised - xt) / (sc * s) ** 2
    dt = tn - t
    xt = xt + (f * xt - g2 * score) * dt + math.sqrt(g2 * abs(dt)) * _randn(x, generator)
    return xt / scn, denoised


@torch.no_grad()
def euler_maruyama(
    model, x, sigmas, cond=None, *, generator=None, callback=None, process: Process | None = None
) -> Tensor:
    """Euler–Maruyama on the reverse-time SDE of ``process`` (Song et al. 2021, eq. 6). NFE = N.

    The last step (into σ = 0) returns the denoised mean D. Default process: EDM's (s = 1, σ = t).
    """
    process = process if process is not None else EDMProcess(1e-12, 1e12)
    sig = _grid(sigmas)
    for i in range(len(sig) - 1):
        x, denoised = _sde_step(model, x, sig[i], sig[i + 1], cond, process, generator)
        _notify(callback, i, sig[i], x, denoised)
    return x


def _langevin(model, x, s, cond, generator, snr: float, steps: int) -> Tensor:
    """Langevin corrector at fixed σ with step ε = 2 (r‖z‖/‖∇log p‖)² (Song et al. 2021, Alg. 5), norms batch-mean."""
    for _ in range(steps):
        score = (_denoise(model, x, s, cond) - x) / s**2
        z = _randn(x, generator)
        # norms averaged over the batch, as in Song et al.'s reference code: a per-sample ratio explodes where
        # the score vanishes (mode centres, saddles between modes)
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
    sig = _grid(sigmas)
    for i in range(len(sig) - 1):
        x = _langevin(model, x, sig[i], cond, generator, snr, corrector_steps)
        x, denoised = _sde_step(model, x, sig[i], sig[i + 1], cond, process, generator)
        _notify(callback, i, sig[i], x, denoised)
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
    sig = [s for s in _grid(sigmas) if s > 0]
    for i, s in enumerate(sig):
        alpha = 2 * (snr * s) ** 2
        for _ in range(steps_per_level):
            denoised = _denoise(model, x, s, cond)
            x = x + alpha / 2 * (denoised - x) / s**2 + math.sqrt(alpha) * _randn(x, generator)
        _notify(callback, i, s, x, denoised)
    return _denoise(model, x, sig[-1], cond) if final_denoise else x


# ------------------------------------------------------------------------------------------------
# DPM-Solver++ and UniPC (exponential integrators in λ = −ln σ, data prediction)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def dpmpp_2m_sde(
    model, x, sigmas, cond=None, *, generator=None, callback=None, eta: float = 1.0, s_noise: float = 1.0
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, §5; midpoint form). η = 0 gives DPM-Solver++(2M). NFE = N."""
    sig = _grid(sigmas)
    old, h_last = None, None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s, cond)
        _notify(callback, i, s, x, denoised)
        if sn == 0:
            x = denoised
        else:
            h = math.log(s) - math.log(sn)
            eta_h = eta * h
            x = (sn / s) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old is not None:
                r = h_last / h
                x = x - 0.5 * math.expm1(-h - eta_h) / r * (denoised - old)
            if eta > 0:
                x = x + _randn(x, generator) * sn * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old = denoised
    return x


@torch.no_grad()
def dpmpp_3m_sde(
    model, x, sigmas, cond=None, *, generator=None, callback=None, eta: float = 1.0, s_noise: float = 1.0
) -> Tensor:
    """SDE-DPM-Solver++(3M) (Lu et al. 2022b; k-diffusion's form). NFE = N.

    Third-order multistep in λ: finite differences d1, d2 of the last three data predictions, with
    φ₂ = (e^{−h_η} − 1)/h_η + 1 ... applied as x += φ₂ d1 − φ₃ d2; lower order on the first two steps.
    """
    sig = _grid(sigmas)
    d_1 = d_2 = None
    h_1 = h_2 = None
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = _denoise(model, x, s, cond)
        _notify(callback, i, s, x, denoised)
        if sn == 0:
            x = denoised
        else:
            h = math.log(s) - math.log(sn)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - d_1) / (h_1 / h)
            if eta > 0:
                x = x + _randn(x, generator) * sn * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
            h_1, h_2 = h, h_1
        d_1, d_2 = denoised, d_1
    return x


def _unipc_update(x, ms, lams, lam_t, s0, s_t, order, m_t=None):
    """UniP (m_t None) or UniC (m_t given) update with B(h) = e^h − 1 ('bh2'), data prediction
    (Zhao et al. 2023, Alg. 1-2). ms/lams: model outputs and λ of previous points, last = s0."""
    m0, lam0 = ms[-1], lams[-1]
    h = lam_t - lam0
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lams[-(k + 1)] - lam0) / h
        rks.append(rk)
        d1s.append((ms[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    r_mat, b = [], []
    h_phi_k, fact = h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        r_mat.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    r_t, b_t = torch.tensor(r_mat, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x_t = (s_t / s0) * x - h_phi_1 * m0
    if m_t is None:  # predictor UniP-p
        if d1s:
            rhos = [0.5] if order == 2 else torch.linalg.solve(r_t[:-1, :-1], b_t[:-1]).tolist()
            x_t = x_t - b_h * sum(r * d for r, d in zip(rhos, d1s))
        return x_t
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(r_t, b_t).tolist()  # corrector UniC-p
    corr = sum(r * d for r, d in zip(rhos_c[:-1], d1s)) if d1s else 0.0
    return x_t - b_h * (corr + rhos_c[-1] * (m_t - m0))


@torch.no_grad()
def unipc(
    model,
    x,
    sigmas,
    cond=None,
    *,
    generator=None,
    callback=None,
    order: int = 2,
    lower_order_final: bool = True,
    corrector: bool = True,
) -> Tensor:
    """UniPC with B(h) = e^h − 1 (Zhao et al. 2023; 'bh2'): UniP-p predictor and UniC corrector, multistep
    data prediction in λ = −ln σ. The corrector reuses the next step's evaluation, so NFE = N."""
    if order < 1:
        raise ValueError("UniPC order must be >= 1")
    sig = _grid(sigmas)
    n = len(sig) - 1
    ms: list[Tensor] = []
    lams: list[float] = []
    x_last, prev_order = None, 1
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        m = _denoise(model, x, s, cond)
        _notify(callback, i, s, x, m)
        lam = -math.log(s)
        if corrector and x_last is not None:
            x = _unipc_update(x_last, ms, lams, lam, sig[i - 1], s, prev_order, m_t=m)
        ms, lams = [*ms, m][-order:], [*lams, lam][-order:]
        cur = min(order, n - i) if lower_order_final else order
        cur = min(cur, len(ms))
        x_last = x
        if sn == 0:
            x, cur = m, 1
        else:
            x = _unipc_update(x, ms, lams, -math.log(sn), s, sn, cur)
        prev_order = cur
    return x


def _preset(base: Callable[..., Tensor], name: str, doc: str, **fixed: Any) -> Callable[..., Tensor]:
    """A named sampler that is ``base`` with some options fixed."""

    @torch.no_grad()
    def sampler(model, x, sigmas, cond=None, *, generator=None, callback=None) -> Tensor:
        return base(model, x, sigmas, cond, generator=generator, callback=callback, **fixed)

    sampler.__name__ = sampler.__qualname__ = name
    sampler.__doc__ = doc
    return sampler


@torch.no_grad()
def heun(model, x, sigmas, cond=None, *, generator=None, callback=None, process: Process | None = None) -> Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Alg. 1): :func:`edm_stochastic` with
    S_churn = 0. NFE = 2N − 1 (Euler into σ = 0).

    Given a :class:`~sdeflow.FlowProcess` it runs :func:`flow_heun`, the trapezoid in the flow's own time:
    in σ-space it is ill-conditioned on a flow's grid (see there).
    """
    if isinstance(process, FlowProcess):
        return flow_heun(model, x, sigmas, cond, generator=generator, callback=callback, process=process)
    return edm_stochastic(model, x, sigmas, cond, generator=generator, callback=callback)


dpmpp_2m = _preset(
    dpmpp_2m_sde,
    "dpmpp_2m",
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), first order at the first and
last step: dpmpp_2m_sde with η = 0. NFE = N.

With h = λ_{i+1} − λ_i and r = h_{i−1}/h:  x̃_{i+1} = (σ_{i+1}/σ_i) x̃ − (e^{−h} − 1) D̂,
D̂ = (1 + 1/(2r)) D_i − 1/(2r) D_{i−1}.""",
    eta=0.0,
)
dpmpp_3m = _preset(
    dpmpp_3m_sde,
    "dpmpp_3m",
    "DPM-Solver++(3M): the deterministic (η = 0) third-order multistep solver. NFE = N.",
    eta=0.0,
)

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "edm_stochastic": edm_stochastic,
    "flow_euler": flow_euler,
    "flow_heun": flow_heun,
    "euler_maruyama": euler_maruyama,
    "pc": predictor_corrector,
    "annealed_langevin": annealed_langevin,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m": dpmpp_3m,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "unipc": unipc,
    "adaptive": adaptive_ode,
}

# samplers whose math is defined by a forward process (they take a ``process=`` option)
PROCESS_SAMPLERS = ("heun", "flow_euler", "flow_heun", "euler_maruyama", "pc")


def nfe_per_steps(name: str, steps: int, **options: Any) -> int:
    """Network evaluations a sampler spends on ``steps`` steps (None-adaptive samplers excluded)."""
    if name in ("heun", "flow_heun", "edm_stochastic"):
        return 2 * steps - 1
    if name == "pc":
        return steps * (1 + options.get("corrector_steps", 1))
    if name == "annealed_langevin":
        return steps * options.get("steps_per_level", 5) + int(options.get("final_denoise", True))
    if name == "adaptive":
        raise ValueError("the adaptive sampler's NFE is set by its tolerances, not by steps")
    return steps


def steps_for_nfe(name: str, nfe: int, **options: Any) -> int:
    """The most steps whose NFE does not exceed ``nfe`` (at least 1)."""
    steps = 1
    while nfe_per_steps(name, steps + 1, **options) <= nfe:
        steps += 1
    return steps
