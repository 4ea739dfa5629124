"""Parameterizations: exact conversions, the denoiser wrapper, and errors."""

import itertools

import pytest
import torch
from torch import nn

from sdeflow import PARAMETERIZATIONS, Denoiser, GaussianMixture, coefficients, convert
from sdeflow.core.process import EDMProcess, FlowProcess, VEProcess, VPDiscreteProcess, VPLinearProcess

PROCS = [VPDiscreteProcess(), VPLinearProcess(), VEProcess(), EDMProcess(), FlowProcess()]


@pytest.mark.parametrize("proc", PROCS, ids=lambda p: p.name)
def test_all_conversions_round_trip_in_float64(proc, gen):
    sigma = torch.exp(torch.linspace(-2, 2.5, 6, dtype=torch.float64)).clamp(
        proc.sigma_min * 1.01, proc.sigma_max * 0.99
    )
    x = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64) * 3
    for a, b in itertools.permutations(PARAMETERIZATIONS, 2):
        pred = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
        back = convert(convert(pred, x, sigma, a, b, proc), x, sigma, b, a, proc)
        torch.testing.assert_close(back, pred, rtol=1e-10, atol=1e-10, msg=f"{a}->{b}")


@pytest.mark.parametrize("proc", PROCS, ids=lambda p: p.name)
def test_conversions_give_true_targets(proc, gen):
    """With the true x0 and ε, each target has its textbook value."""
    sigma = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64).clamp(proc.sigma_min * 1.01, proc.sigma_max * 0.99)
    x0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    x = x0 + sigma[:, None] * eps
    t = proc.t_of_sigma(sigma)[:, None]
    s, ds, dsig = proc.s(t), proc.ds_dt(t), proc.dsigma_dt(t)
    alpha, sig_t = s, s * sigma[:, None]
    expected = {
        "eps": eps,
        "x0": x0,
        "v": alpha * eps - sig_t * x0,  # Salimans & Ho 2022
        "velocity": ds * x0 + (ds * sigma[:, None] + s * dsig) * eps,  # d/dt of s(x0 + σ ε)
        "score": -eps / sigma[:, None],  # ∇ log N(x; x0, σ²)
    }
    for name, target in expected.items():
        torch.testing.assert_close(convert(x0, x, sigma, "x0", name, proc), target, rtol=1e-10, atol=1e-10)
    if isinstance(proc, FlowProcess):
        torch.testing.assert_close(expected["velocity"], eps - x0)  # rectified flow's u = ε − x0


def test_edm_coefficients_match_paper():
    sigma, sd = torch.tensor([0.5, 2.0], dtype=torch.float64), 0.5
    c = coefficients("edm", sigma, sigma_data=sd)
    torch.testing.assert_close(c.c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c.c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c.c_in, 1 / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c.c_noise, sigma.log() / 4)


class OracleNet(nn.Module):
    """A 'network' that outputs the exact target of a parameterization, computed from an oracle."""

    def __init__(self, gm, proc, param):
        super().__init__()
        self.gm, self.proc, self.param = gm, proc, param

    def forward(self, x_in, c_noise, cond=None):
        if self.param == "edm":
            sigma = torch.exp(4 * c_noise)
            x = x_in * torch.sqrt(sigma**2 + 0.25)[:, None]
        else:
            t = c_noise
            sigma = self.proc.sigma(t)
            x = x_in / self.proc.s(t)[:, None]
        d = self.gm.denoise(x, sigma)
        return convert(d, x, sigma, "x0", self.param, self.proc)


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
@pytest.mark.parametrize("proc", [VPLinearProcess(), FlowProcess(), VEProcess()], ids=lambda p: p.name)
def test_denoiser_wrapper_reconstructs_the_oracle(param, proc, gen):
    gm = GaussianMixture.random(4, 3, std=0.2, seed=1)
    den = Denoiser(OracleNet(gm, proc, param), proc, param, sigma_data=0.5, time_scale=1.0)
    sigma = torch.tensor([0.05, 0.5, 3.0, 20.0], dtype=torch.float64).clamp(max=proc.sigma_max * 0.99)
    x = gm.sample(4, gen)[0] + sigma[:, None] * torch.randn(4, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(den(x, sigma), gm.denoise(x, sigma), rtol=1e-9, atol=1e-9)


def test_denoiser_errors():
    net = nn.Identity()
    with pytest.raises(ValueError, match="unknown parameterization 'epsilon'"):
        Denoiser(net, VPLinearProcess(), "epsilon")

    class Net(nn.Module):
        def forward(self, x, c, cond=None):
            return x

    den = Denoiser(Net(), VPDiscreteProcess(), "eps")
    with pytest.raises(ValueError, match="σ outside the range"):
        den(torch.zeros(2, 3), torch.tensor([1e-6, 1.0]))
    with pytest.raises(ValueError, match="sigma must be a scalar or of shape"):
        den(torch.zeros(2, 3), torch.ones(3))

    class Bad(nn.Module):
        def forward(self, x, c, cond=None):
            return x[:, :2]

    with pytest.raises(ValueError, match="does not match input"):
        Denoiser(Bad(), EDMProcess(), "edm")(torch.zeros(2, 3), 1.0)


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
@pytest.mark.parametrize(
    "proc", [FlowProcess(), FlowProcess(shift=3.0), VPDiscreteProcess(), VPLinearProcess(), VEProcess(), EDMProcess()]
)
def test_float32_denoiser_matches_float64_over_the_whole_sigma_range(param, proc):
    """The coefficients are taken in float64 whatever the sample's dtype: for a flow at σ_max ≈ 10⁴ the float32
    velocity coefficients once cancelled catastrophically (D off by 3.6 for a network output of 0.3)."""

    class Const(nn.Module):
        def forward(self, x, c_noise, cond=None):
            return torch.full_like(x, 0.3) + 0 * c_noise.view(-1, 1)

    den = Denoiser(Const(), proc, param)
    for sig in (proc.sigma_max, (proc.sigma_max * proc.sigma_min) ** 0.5, proc.sigma_min * 2):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sig
        hi = den(x, torch.full((8,), sig, dtype=torch.float64))
        lo = den(x.float(), torch.full((8,), sig, dtype=torch.float32))
        assert lo.dtype == torch.float32
        # float32 rounding of x itself (relative 6e-8 of |x| ~ σ) is the floor
        assert float((lo.double() - hi).abs().max()) < 1e-6 * (1 + sig + float(hi.abs().max())), (sig, param)
