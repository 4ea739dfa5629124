"""Preconditioning against hand computations: EDM's coefficients with the default σ_data, the process
coefficients' time scale and dtype, pad_dims, the Denoiser's defaults and dtypes, and its regression target."""

import math

import pytest
import torch
from torch import nn

from sdeflow import EDMProcess, FlowProcess, VEProcess, VPDiscreteProcess, VPLinearProcess
from sdeflow.core.preconditioning import PARAMETERIZATIONS, Denoiser, coefficients, pad_dims

F64 = torch.float64


def test_edm_coefficients_with_the_default_sigma_data():
    """Karras et al. 2022, Table 1, σ_d = 0.5: c_skip = σ_d²/(σ² + σ_d²), c_out = σσ_d/√(σ² + σ_d²)."""
    c = coefficients("edm", torch.tensor([1.0], dtype=F64))
    assert (float(c.c_skip), float(c.c_out)) == pytest.approx((0.25 / 1.25, 0.5 / math.sqrt(1.25)))
    assert float(c.c_in) == pytest.approx(1 / math.sqrt(1.25)) and float(c.c_noise) == 0.0


def test_process_coefficients_time_scale_dtype_and_errors():
    vp = VPLinearProcess()
    sigma = torch.tensor([0.5], dtype=torch.float32)
    t = float(vp.t_of_sigma(torch.tensor(0.5, dtype=F64)))
    c = coefficients("eps", sigma, vp)  # time_scale 1 by default
    assert c.c_noise.dtype == c.c_skip.dtype == torch.float32
    assert float(c.c_noise) == pytest.approx(t, rel=1e-6)
    assert float(coefficients("eps", sigma, vp, time_scale=1000.0).c_noise) == pytest.approx(1000 * t, rel=1e-6)
    with pytest.raises(ValueError, match="^unknown parameterization 'noise'"):
        coefficients("noise", sigma, vp)
    with pytest.raises(ValueError, match=r"^parameterization 'eps' needs a process \(for s\(t\) and t\(σ\)\)$"):
        coefficients("eps", sigma)


def test_pad_dims_expands_scalars_to_the_batch_in_its_dtype():
    like = torch.zeros(3, 4, 5, dtype=torch.float32)
    v = pad_dims(torch.tensor(2.0, dtype=F64), like)
    assert v.shape == (3, 1, 1) and v.dtype == torch.float32 and v.flatten().tolist() == [2.0] * 3
    assert pad_dims(torch.arange(3.0), like).flatten().tolist() == [0.0, 1.0, 2.0]


class Recorder(nn.Module):
    """Returns a fixed F (float32, as a low-precision network might) and records what it was given."""

    def __init__(self, value=0.5):
        super().__init__()
        self.value, self.seen = value, []

    def forward(self, x, c_noise, cond):
        self.seen.append((x, c_noise, cond))
        return torch.full(x.shape, self.value, dtype=torch.float32)


@pytest.mark.parametrize(("process", "scale"), [(VPLinearProcess(), 1000.0), (FlowProcess(), 1000.0),
                                                 (VPDiscreteProcess(), 1.0), (EDMProcess(), 1.0)])  # fmt: skip
def test_default_time_scale(process, scale):
    """Networks see 1000·t on processes with t ∈ [0, 1] (t_max = 1 included), t itself otherwise."""
    assert Denoiser(Recorder(), process, "eps").time_scale == scale
    assert Denoiser(Recorder(), process, "eps", time_scale=5.0).time_scale == 5.0
    assert Denoiser(Recorder(), VEProcess(t_max=1.5), "eps").time_scale == 1.0  # t ∈ [0, 1.5]: not the unit range


def test_denoiser_feeds_the_network_and_keeps_the_data_dtype():
    net, vp = Recorder(), VPLinearProcess()
    den = Denoiser(net, vp, "eps")
    x, cond = torch.ones(2, 3, dtype=F64), torch.tensor([4, 5])
    out = den(x, 0.3, cond)
    _, c_noise, seen_cond = net.seen[-1]
    t = vp.t_of_sigma(torch.tensor(0.3, dtype=F64))
    torch.testing.assert_close(c_noise, (1000 * t).expand(2), rtol=1e-12, atol=0)  # σ taken in float64
    assert seen_cond is cond and out.dtype == F64
    s = float(vp.s(t))
    torch.testing.assert_close(net.seen[-1][0], torch.full((2, 3), s, dtype=F64))  # c_in x̃ = s x̃
    torch.testing.assert_close(out, torch.full((2, 3), 1 - 0.3 * 0.5, dtype=F64))  # eps: D = x̃ − σ F
    half = den(torch.ones(2, 3, dtype=torch.bfloat16), 0.3, cond)
    assert half.dtype == torch.bfloat16 and net.seen[-1][1].dtype == torch.bfloat16
    edm = Denoiser(Recorder(), EDMProcess())  # EDM, σ_d = 0.5 by default
    torch.testing.assert_close(edm(x, 1.0), torch.full((2, 3), 0.2 + 0.5 / math.sqrt(1.25) * 0.5, dtype=F64))
    with pytest.raises(ValueError, match=r"sigma must be a scalar or of shape \(2,\), got \(3,\)"):
        den(x, torch.ones(3))


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_target_is_what_the_denoiser_maps_back_to_x0(param):
    vp = VPLinearProcess()
    x0 = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=F64)
    noise, sigma = torch.tensor([[1.0, 0.3], [-0.2, 1.5]], dtype=F64), torch.tensor([0.4, 2.0], dtype=F64)
    den = Denoiser(Recorder(), vp, param, check_range=False)
    f = den.target(x0, noise, sigma)
    c = den.coefficients(sigma)
    x = x0 + sigma[:, None] * noise
    torch.testing.assert_close(c.c_skip[:, None] * x + c.c_out[:, None] * f, x0, rtol=1e-12, atol=1e-12)
    if param == "eps":
        torch.testing.assert_close(f, noise)
