"""Processes: marginals, derivatives, inverses, and DDPM's discrete ᾱ against diffusers' numbers."""

import math

import pytest
import torch

from sdeflow import get_process
from sdeflow.core.process import (
    EDMProcess,
    FlowProcess,
    SubVPProcess,
    VEProcess,
    VPCosineProcess,
    VPDiscreteProcess,
    VPLinearProcess,
    cosine_betas,
    shift_time,
)

ALL = [
    VPDiscreteProcess(),
    VPDiscreteProcess(schedule="cosine"),
    VPLinearProcess(),
    SubVPProcess(),
    VPCosineProcess(),
    VEProcess(0.01, 50.0),
    EDMProcess(),
    FlowProcess(),
    FlowProcess(shift=3.0),
]
IDS = [f"{type(p).__name__}{i}" for i, p in enumerate(ALL)]


def _times(p, n=7):
    return torch.linspace(p.t_min, p.t_max, n + 2, dtype=torch.float64)[1:-1]


@pytest.mark.parametrize("proc", ALL, ids=IDS)
def test_marginal_moments_match_formulas(proc, gen):
    """x0 ~ N(m, v) ⇒ x_t = s(x0 + σε) has mean s·m and variance s²(v + σ²)."""
    n, m, v = 200_000, 0.7, 0.3**2
    for t in _times(proc, 4):
        x0 = m + math.sqrt(v) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
        eps = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        xt = proc.add_noise(x0, t.expand(n), eps)
        s, sig = float(proc.s(t)), float(proc.sigma(t))
        var = s**2 * (v + sig**2)
        assert abs(float(xt.mean()) - s * m) < 5 * math.sqrt(var / n)
        assert abs(float(xt.var()) / var - 1) < 0.02
        assert float(proc.noise_std(t)) == pytest.approx(s * sig, rel=1e-9)


@pytest.mark.parametrize("proc", ALL, ids=IDS)
def test_derivatives_inverse_and_log_snr(proc):
    t = _times(proc)
    if isinstance(proc, VPDiscreteProcess):
        t = t.floor() + 0.37  # stay inside one interpolation segment for finite differences
    h = 1e-6 * max(1.0, proc.t_max)
    fd_sig = (proc.sigma(t + h) - proc.sigma(t - h)) / (2 * h)
    fd_s = (proc.s(t + h) - proc.s(t - h)) / (2 * h)
    torch.testing.assert_close(proc.dsigma_dt(t), fd_sig, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(proc.ds_dt(t), fd_s, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(proc.t_of_sigma(proc.sigma(t)), t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(proc.log_snr(t), torch.log(proc.s(t) ** 2 / proc.noise_std(t) ** 2))
    assert proc.sigma_min < proc.sigma_max


@pytest.mark.parametrize(
    "proc", [p for p in ALL if isinstance(p, (VPDiscreteProcess, VPLinearProcess, VPCosineProcess))]
)
def test_vp_is_variance_preserving(proc):
    t = _times(proc)
    torch.testing.assert_close(proc.s(t) ** 2 * (1 + proc.sigma(t) ** 2), torch.ones_like(t))
    assert proc.prior_std() == pytest.approx(math.sqrt(1 + proc.sigma_max**2))
    assert proc.prior_std(2.0) == pytest.approx(math.sqrt(5.0))  # a sampler started below σ_max


def test_closed_forms():
    vp = VPLinearProcess(0.1, 20.0)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    abar = torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2))  # Song et al. 2021, eq. 33
    torch.testing.assert_close(vp.s(t) ** 2, abar)
    ve = VEProcess(0.01, 50.0)
    torch.testing.assert_close(ve.sigma(t), 0.01 * (5000.0) ** t)
    fl = FlowProcess()
    x0, eps, tt = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([0.25])
    assert float(fl.add_noise(x0, tt, eps)) == pytest.approx(0.75 * 2.0 + 0.25 * -1.0)
    assert float(shift_time(0.5, 3.0)) == pytest.approx(0.75)
    assert float(shift_time(0.3, 1.0)) == pytest.approx(0.3)
    edm = EDMProcess()
    assert edm.sigma_max == 80.0 and edm.prior_std() == 80.0 and edm.prior_std(3.0) == 3.0


# alphas_cumprod of diffusers 0.42.1 DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4,
# beta_end=0.02, beta_schedule="linear"), computed by diffusers in float32 and printed with repr():
#   from diffusers import DDPMScheduler; DDPMScheduler(...).alphas_cumprod[i]
DIFFUSERS_LINEAR_ALPHAS_CUMPROD = {
    0: 0.9998999834060669,
    1: 0.9997800588607788,
    9: 0.9981051683425903,
    99: 0.8970179557800293,
    499: 0.07858723402023315,
    999: 4.035830352222547e-05,
}


def test_ddpm_alphas_cumprod_match_diffusers():
    proc = VPDiscreteProcess()
    for i, ref in DIFFUSERS_LINEAR_ALPHAS_CUMPROD.items():
        # diffusers accumulates the product in float32: agreement to float32 rounding of 1000 factors
        assert float(proc.alphas_cumprod[i]) == pytest.approx(ref, rel=2e-5), i
        # and σ at integer steps is √(1/ᾱ − 1)
        assert float(proc.sigma(float(i))) == pytest.approx(math.sqrt(1 / float(proc.alphas_cumprod[i]) - 1))


def test_cosine_betas_formula():
    b = cosine_betas(1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert float(b[0]) == pytest.approx(1 - f(1) / f(0))
    assert float(b[-1]) == pytest.approx(0.999)  # clipped, Nichol & Dhariwal 2021 §3.2


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown process 'vpp'"):
        get_process("vpp")
    with pytest.raises(ValueError, match="beta schedule"):
        VPDiscreteProcess(schedule="quadratic")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VEProcess(1.0, 0.5)
    with pytest.raises(ValueError, match="σ outside the range"):
        VPDiscreteProcess().check_sigma(torch.tensor([1e-5]))
    assert isinstance(get_process("ddpm"), VPDiscreteProcess)


def test_sub_vp_is_the_score_sde_papers_process():
    """Song et al. 2021, eq. 29: mean e^{−B/2} x0, noise std 1 − e^{−B}, drift −½β x, diffusion² β(1 − e^{−2B}),
    with B(t) = β_min t + ½(β_max − β_min) t²; and its noise variance stays below VP's."""
    p, vp = SubVPProcess(), VPLinearProcess()
    assert p.t_min == 1e-3 and get_process("sub_vp").name == "sub_vp"
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    b = 0.1 * t + 0.5 * 19.9 * t**2
    torch.testing.assert_close(p.s(t), torch.exp(-b / 2), rtol=1e-12, atol=0)
    torch.testing.assert_close(p.noise_std(t), 1 - torch.exp(-b), rtol=1e-12, atol=0)
    # reverse-SDE coefficients as the samplers compute them: f = ṡ/s, g² = 2 s² σ σ̇
    beta = 0.1 + 19.9 * t
    torch.testing.assert_close(p.ds_dt(t) / p.s(t), -beta / 2, rtol=1e-12, atol=0)
    g2 = 2 * p.s(t) ** 2 * p.sigma(t) * p.dsigma_dt(t)
    torch.testing.assert_close(g2, beta * (1 - torch.exp(-2 * b)), rtol=1e-12, atol=0)
    assert bool((p.noise_std(t) ** 2 < vp.noise_std(t) ** 2).all())
    assert p.prior_std() == pytest.approx(math.sqrt(1 + p.sigma_max**2))  # N(0, I) on x_t, as VP
