"""Processes and preconditioning against closed forms: β tables, the discrete σ table's interpolation at its ends,
each process's defaults, the two cosine schedules against each other, and dtypes kept through every formula."""

import math

import pytest
import torch

from sdeflow import EDMProcess, FlowProcess, VEProcess, VPDiscreteProcess, VPLinearProcess
from sdeflow.core.preconditioning import convert
from sdeflow.core.process import SubVPProcess, VPCosineProcess
from sdeflow.core.process.vp import cosine_betas, linear_betas

F64 = torch.float64


def test_linear_betas_by_hand():
    torch.testing.assert_close(linear_betas(3, 0.1, 0.3), torch.tensor([0.1, 0.2, 0.3], dtype=F64), rtol=0, atol=1e-16)
    b = linear_betas()
    assert (len(b), b.dtype, float(b[0]), float(b[-1])) == (1000, F64, 1e-4, 0.02)  # DDPM §4


def test_cosine_betas_by_hand():
    """β_i = 1 − f(i+1)/f(i), f(i) = cos²((i/T + s)/(1 + s) · π/2), s = 0.008, capped at 0.999 (Nichol & Dhariwal)."""

    def f(i, T=1000, s=0.008):
        return math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2

    b = cosine_betas()
    assert (len(b), b.dtype) == (1000, F64)
    for i in (0, 1, 500, 998):
        assert float(b[i]) == pytest.approx(1 - f(i + 1) / f(i), rel=1e-12)
    assert float(b[999]) == 0.999  # f(1000) = cos²(π/2) ≈ 0: capped
    assert float(cosine_betas(4, offset=0.1, max_beta=0.5)[1]) == pytest.approx(
        1 - f(2, 4, 0.1) / f(1, 4, 0.1), rel=1e-12)  # fmt: skip
    assert float(cosine_betas(4, max_beta=0.5)[-1]) == 0.5


def test_discrete_process_tables_and_checks():
    cos = VPDiscreteProcess(schedule="cosine")
    torch.testing.assert_close(cos.betas, cosine_betas(1000), rtol=0, atol=0)
    assert VPDiscreteProcess(schedule="cosine", num_steps=10).num_steps == 10
    assert VPDiscreteProcess(num_steps=10).t_max == 9.0
    mine = VPDiscreteProcess(torch.tensor([0.5, 0.5], dtype=torch.float32))
    assert mine.betas.dtype == F64 and mine.betas.tolist() == [0.5, 0.5]
    torch.testing.assert_close(mine.sigmas, torch.tensor([1.0, math.sqrt(3.0)], dtype=F64))  # ᾱ = ½, ¼
    for bad in ([0.0, 0.5], [0.5, 1.0], [0.5, 1.5], [[0.5, 0.5]]):
        with pytest.raises(ValueError, match=r"^betas must be a 1-D sequence with 0 < β < 1$"):
            VPDiscreteProcess(torch.tensor(bad))
    with pytest.raises(ValueError, match="unknown beta schedule 'sqrt'"):
        VPDiscreteProcess(schedule="sqrt")


def test_discrete_sigma_at_and_beyond_the_ends_of_the_table():
    p = VPDiscreteProcess()
    t = torch.tensor([-3.0, 0.0, 998.5, 999.0, 1500.0], dtype=F64)
    ls = p.log_sigmas
    want = torch.exp(torch.stack([ls[0], ls[0], (ls[998] + ls[999]) / 2, ls[999], ls[999]]))
    torch.testing.assert_close(p.sigma(t), want, rtol=1e-12, atol=0)
    back = p.t_of_sigma(torch.stack([p.sigmas[0], want[2], p.sigmas[999], p.sigmas[999] * 2]))
    torch.testing.assert_close(back, torch.tensor([0.0, 998.5, 999.0, 999.0], dtype=F64), rtol=0, atol=1e-9)
    # between integer steps σ is log-linear, so dσ/dt = σ (ln σ_{i+1} − ln σ_i)
    torch.testing.assert_close(p.dsigma_dt(torch.tensor([998.5], dtype=F64)), want[2:3] * (ls[999] - ls[998]))


@pytest.mark.parametrize("process", [VPDiscreteProcess(), VPLinearProcess(), SubVPProcess(), VPCosineProcess(),
                                     VEProcess(), EDMProcess(), FlowProcess()])  # fmt: skip
def test_float32_in_float32_out(process):
    t = torch.tensor([0.5 * (process.t_min + process.t_max)], dtype=torch.float32)
    for out in (process.sigma(t), process.dsigma_dt(t), process.s(t), process.t_of_sigma(process.sigma(t))):
        assert out.dtype == torch.float32
    x0 = torch.ones(1, 2, dtype=torch.float32)
    assert process.add_noise(x0, t.double(), torch.ones(1, 2, dtype=torch.float32)).dtype == torch.float32


def test_linear_vp_and_sub_vp_defaults_in_closed_form():
    """Song et al. 2021: β ∈ [0.1, 20], ∫₀¹β = 0.1 + ½·19.9; VP σ(1) = √(e^B − 1), sub-VP σ(1) = 2 sinh(B/2)."""
    B = 0.1 + 0.5 * 19.9
    vp, sub = VPLinearProcess(), SubVPProcess()
    assert (vp.t_min, vp.t_max, sub.t_min, sub.t_max) == (1e-5, 1.0, 1e-3, 1.0)
    assert float(vp.sigma(1.0)) == pytest.approx(math.sqrt(math.expm1(B)), rel=1e-12)
    assert float(sub.sigma(1.0)) == pytest.approx(2 * math.sinh(B / 2), rel=1e-12)
    assert SubVPProcess(t_max=0.5).t_max == 0.5 and SubVPProcess(beta_max=10.0).beta_d == pytest.approx(9.9)


def test_continuous_cosine_in_closed_form_and_against_the_discrete_table():
    """ᾱ(t) = cos²φ(t)/cos²φ(0), φ(t) = (t + s)/(1 + s)·π/2; the discrete cosine table's ᾱ_i is ᾱ((i + 1)/T)."""
    p = VPCosineProcess()
    assert (p.offset, p.t_min, p.t_max) == (0.008, 1e-4, 0.999)
    phi = lambda t: (t + 0.008) / 1.008 * math.pi / 2  # noqa: E731
    for t in (0.1, 0.5, 0.9):
        assert float(p.sigma(t)) == pytest.approx(math.sqrt(math.cos(phi(0)) ** 2 / math.cos(phi(t)) ** 2 - 1))
    i = torch.arange(0, 990, 7)
    table = VPDiscreteProcess(schedule="cosine").alphas_cumprod[i]
    torch.testing.assert_close(1 / (1 + p.sigma((i + 1).double() / 1000) ** 2), table, rtol=1e-10, atol=0)
    q = VPCosineProcess(offset=0.1)
    assert float(q.sigma(0.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(q.t_of_sigma(q.sigma(0.3))) == pytest.approx(0.3)


def test_ve_defaults_and_checks():
    """σ(t) = σ_min (σ_max/σ_min)^t with σ ∈ [0.01, 50] (Song et al. 2021, eq. 31)."""
    ve = VEProcess()
    torch.testing.assert_close(ve.sigma(torch.tensor([0.0, 0.5, 1.0], dtype=F64)),
                               torch.tensor([0.01, math.sqrt(0.5), 50.0], dtype=F64))  # fmt: skip
    assert (ve.t_min, ve.t_max) == (1e-5, 1.0)
    for lo, hi in ((0.0, 1.0), (1.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError, match="need 0 < sigma_min < sigma_max"):
            VEProcess(lo, hi)


def test_prior_std_of_each_kind():
    """VP: x̃ = x_t/s has std √(1 + σ²); VE, EDM, flow: σ; at σ_max unless a σ is given."""
    flow, vp, edm = FlowProcess(), VPLinearProcess(), EDMProcess()
    assert flow.prior_std() == flow.sigma_max and flow.prior_std(2.0) == 2.0
    assert vp.prior_std(2.0) == pytest.approx(math.sqrt(5.0)) and edm.prior_std(3.0) == pytest.approx(3.0)
    assert edm.prior_std() == pytest.approx(80.0)


def test_convert_uses_the_given_sigma_data():
    """EDM's F → x0 with σ_d = 0.25: D = σ_d²/(σ² + σ_d²) x + σσ_d/√(σ² + σ_d²) F; and back."""
    x, f, s = torch.tensor([[2.0]], dtype=F64), torch.tensor([[3.0]], dtype=F64), torch.tensor([1.0], dtype=F64)
    d = convert(f, x, s, "edm", "x0", EDMProcess(), sigma_data=0.25)
    want = 0.0625 / 1.0625 * 2.0 + 0.25 / math.sqrt(1.0625) * 3.0
    assert float(d) == pytest.approx(want, rel=1e-12)
    assert float(convert(d, x, s, "x0", "edm", EDMProcess(), sigma_data=0.25)) == pytest.approx(3.0, rel=1e-12)


def test_flow_and_edm_checks_at_their_boundaries():
    assert FlowProcess(t_min=0.0).t_min == 0.0  # t = 0 is allowed (σ = 0), t = 1 is not (σ = ∞)
    for kwargs in ({"shift": 0.0}, {"shift": -1.0}):
        with pytest.raises(ValueError, match=r"^shift must be positive, got"):
            FlowProcess(**kwargs)
    for t_min, t_max in ((0.5, 0.5), (0.1, 1.0), (-0.1, 0.5), (0.1, 1.5)):
        with pytest.raises(ValueError, match=r"^need 0 <= t_min < t_max < 1, got"):
            FlowProcess(t_min=t_min, t_max=t_max)
    for lo, hi in ((0.0, 80.0), (1.0, 1.0)):
        with pytest.raises(ValueError, match=r"^need 0 < sigma_min < sigma_max, got"):
            EDMProcess(lo, hi)


def test_prior_samples_are_drawn_from_the_generator_at_the_prior_std():
    edm = EDMProcess()
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(edm.sample_prior((4, 2), torch.Generator().manual_seed(3)), z * 80.0)
    torch.testing.assert_close(edm.sample_prior((4, 2), torch.Generator().manual_seed(3), sigma=2.0), z * 2.0)


def test_denoising_loss_names_bad_shapes():
    from sdeflow.core.losses import denoising_loss

    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^sigma must have shape \(2,\), got \(3,\)$"):
        denoising_loss(lambda x, s, c: x, x0, torch.ones(3))
    with pytest.raises(ValueError, match=r"^noise shape \(2, 4\) does not match data \(2, 3\)$"):
        denoising_loss(lambda x, s, c: x, x0, torch.ones(2), noise=torch.zeros(2, 4))
    weight = torch.tensor([1.0, 2.0], dtype=F64)  # a float64 weight on a float32 loss: the loss keeps its dtype
    assert denoising_loss(lambda x, s, c: x, x0, torch.ones(2), weight).dtype == torch.float32


def test_repr_names_the_time_and_sigma_ranges():
    assert repr(EDMProcess()) == "EDMProcess(t∈[0.002, 80], σ∈[0.002, 80])"
