"""Exponential integrators in λ = −ln σ with data prediction: DPM-Solver++ (2M, 3M, and their SDE forms;
Lu et al. 2022b) and UniPC (Zhao et al. 2023). Multistep: each reuses earlier D evaluations, so NFE = N.
Signature as in :mod:`sdeflow.sampling.samplers`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .steps import denoise, grid, notify, randn_like, sde_noise_std


def _dpmpp(model, x, sigmas, cond, generator, callback, eta: float, s_noise: float, correction) -> Tensor:
    """The multistep loop both DPM-Solver++ variants share: a first-order data-prediction step in λ = −ln σ,

        x̃' = e^{−h(1+η)} x̃ − (e^{−h(1+η)} − 1) D,   h = λ' − λ,

    plus ``correction(D, h, h_η, history)`` from earlier evaluations (newest first), plus fresh noise for η > 0."""
    sig = grid(sigmas)
    history: list[tuple[Tensor, float]] = []  # (D, h) of the earlier steps, newest first
    for i in range(len(sig) - 1):
        s, sn = sig[i], sig[i + 1]
        denoised = denoise(model, x, s, cond)
        notify(callback, i, s, x, denoised)
        if sn == 0:
            return denoised
        h = math.log(s) - math.log(sn)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised + correction(denoised, h, h_eta, history)
        if eta > 0:
            x = x + randn_like(x, generator) * sde_noise_std(sn, h, eta) * s_noise
        history = [(denoised, h), *history[:1]]
    return x


def _midpoint_2m(denoised: Tensor, h: float, h_eta: float, history: list) -> Tensor | float:
    """DPM-Solver++(2M)'s second-order term: −½ (e^{−h_η} − 1)/r · (D_i − D_{i−1}), r = h_{i−1}/h."""
    if not history:
        return 0.0
    old, h_last = history[0]
    return -0.5 * math.expm1(-h_eta) / (h_last / h) * (denoised - old)


def _third_order_3m(denoised: Tensor, h: float, h_eta: float, history: list) -> Tensor | float:
    """DPM-Solver++(3M)'s terms φ₂ d1 − φ₃ d2 from divided differences of the last three D (k-diffusion's form);
    the second-order term alone on the second step."""
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    if len(history) == 1:
        ((d_1, h_1),) = history
        return phi_2 * (denoised - d_1) / (h_1 / h)
    if not history:
        return 0.0
    (d_1, h_1), (d_2, h_2) = history
    r0, r1 = h_1 / h, h_2 / h
    d1_0 = (denoised - d_1) / r0
    d1_1 = (d_1 - d_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2


@torch.no_grad()
def dpmpp_2m_sde(
    model, x, sigmas, cond=None, *, generator=None, callback=None, eta: float = 1.0, s_noise: float = 1.0
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, §5; midpoint form). η = 0 gives DPM-Solver++(2M). NFE = N."""
    return _dpmpp(model, x, sigmas, cond, generator, callback, eta, s_noise, _midpoint_2m)


@torch.no_grad()
def dpmpp_3m_sde(
    model, x, sigmas, cond=None, *, generator=None, callback=None, eta: float = 1.0, s_noise: float = 1.0
) -> Tensor:
    """SDE-DPM-Solver++(3M) (Lu et al. 2022b; k-diffusion's form): third-order multistep in λ, lower order on the
    first two steps. NFE = N."""
    return _dpmpp(model, x, sigmas, cond, generator, callback, eta, s_noise, _third_order_3m)


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
    sig = grid(sigmas)
    n = len(sig) - 1
    ms: list[Tensor] = []
    lams: list[float] = []
    x_last, prev_order = None, 1
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        m = denoise(model, x, s, cond)
        notify(callback, i, s, x, m)
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
