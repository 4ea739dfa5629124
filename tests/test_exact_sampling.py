"""Sampling pieces against hand computations: every discrete spacing for every step count against diffusers'
numpy formulas, grid dtypes, the ancestral and SDE noise levels, flow times, and one stochastic step of each
SDE sampler recomputed from the same noise."""

import math

import pytest
import torch

from sdeflow import EDMProcess, FlowProcess, VEProcess, VPDiscreteProcess
from sdeflow.sampling.schedules import ddpm_discrete, log_snr_uniform, uniform_t
from sdeflow.sampling.steps import ancestral_step, flow_times, sde_noise_std, velocity
from sdeflow.sampling.stochastic import euler_maruyama, predictor_corrector

F64 = torch.float64


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_every_step_count_matches_diffusers_spacing(spacing):
    """diffusers' DDIMScheduler picks the same integer timesteps for every n = 1..1000 (torch's float arange and
    linspace round a few halves the other way: trailing n = 48, linspace n = 27 once differed)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    p = VPDiscreteProcess()
    for n in range(1, 1001):
        sched.set_timesteps(n)
        got = ddpm_discrete(n, p, spacing)
        assert torch.equal(got[:-1], p.sigmas[sched.timesteps]) and got[-1] == 0, n


def test_discrete_schedule_defaults_and_limits():
    p, small = VPDiscreteProcess(), VPDiscreteProcess(num_steps=10)
    assert torch.equal(ddpm_discrete(4, p), ddpm_discrete(4, p, "leading"))
    assert torch.equal(ddpm_discrete(10, small, "trailing")[:-1], small.sigmas.flip(0))  # n = T: every step
    with pytest.raises(ValueError, match=r"steps \(11\) exceed the process's 10 discrete timesteps"):
        ddpm_discrete(11, small)
    with pytest.raises(ValueError, match="^the 'ddpm_discrete' schedule needs a discrete process"):
        ddpm_discrete(4, EDMProcess())


def test_continuous_grids_are_float64():
    assert log_snr_uniform(5, 0.002, 80.0).dtype == F64 and uniform_t(5, EDMProcess()).dtype == F64
    grid = log_snr_uniform(3, 0.1, 10.0)[:-1].float().log()
    torch.testing.assert_close(grid, torch.tensor([2.302585, 0.0, -2.302585]))


def test_ancestral_and_sde_noise_levels_by_hand():
    """σ_up = η σ'√(1 − σ'²/σ²), σ_down = √(σ'² − σ_up²); SDE-DPM-Solver++: σ'√(1 − e^{−2ηh})."""
    down, up = ancestral_step(2.0, 1.0)  # default η = 1
    assert up == pytest.approx(math.sqrt(0.75)) and down == pytest.approx(0.5)
    assert ancestral_step(2.0, 1.0, eta=0.5)[1] == pytest.approx(0.5 * math.sqrt(0.75))
    assert ancestral_step(2.0, 0.0) == (0.0, 0.0)
    assert sde_noise_std(0.5, 0.3, 2.0) == pytest.approx(0.5 * math.sqrt(1 - math.exp(-1.2)))


def test_flow_times_put_zero_at_sigma_zero():
    ve = VEProcess()
    assert flow_times(torch.tensor([50.0, 1.0, 0.0], dtype=F64), ve) == pytest.approx(
        [1.0, float(ve.t_of_sigma(1.0)), 0.0])  # fmt: skip


def test_velocity_reports_to_the_callback_only_with_a_step_index():
    """dx_t/dt = (ṡ + b) x̃ − b D with b = s σ̇/σ; on the flow at t = ½: s = ½, σ = 1, σ̇ = 4, ṡ = −1 → b = 2."""
    seen = []
    model = lambda x, s, c: 0.25 * x + c  # noqa: E731
    xt, cond = torch.tensor([[1.0]], dtype=F64), torch.tensor([[0.5]], dtype=F64)
    v = velocity(model, xt, 1.0, 0.5, cond, FlowProcess(), lambda *a: seen.append(a), 3)
    xs, d = 2.0, 0.25 * 2.0 + 0.5  # x̃ = x_t/s
    assert float(v) == pytest.approx((-1 + 2) * xs - 2 * d)
    (i, sigma, x_seen, d_seen), = seen  # fmt: skip
    assert (i, sigma, float(x_seen), float(d_seen)) == (3, 1.0, xs, d)
    velocity(model, xt, 1.0, 0.5, cond, FlowProcess(), lambda *a: seen.append(a))
    assert len(seen) == 1


def linear_model(x, sigma, cond):
    return 0.5 * x + cond


def test_one_euler_maruyama_step_by_hand():
    """EDM (s = 1, σ = t): x' = x + 2(D − x)/σ·(σ − σ') + √(2σ(σ − σ')) z; the last step returns D."""
    x, cond = torch.tensor([[1.0, -2.0]], dtype=F64), torch.tensor([[0.3, 0.1]], dtype=F64)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(x.shape, generator=g, dtype=F64)
    d = linear_model(x, None, cond)
    x1 = x + 2 * (d - x) / 2.0 * 1.0 + math.sqrt(2 * 2.0 * 1.0) * z
    want = linear_model(x1, None, cond)
    got = euler_maruyama(linear_model, x, torch.tensor([2.0, 1.0, 0.0], dtype=F64), cond,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_one_langevin_correction_then_predictor_by_hand():
    """Song et al. 2021, Alg. 5: score = (D − x)/σ², ε = 2 (r ‖z‖/‖score‖)², x ← x + ε score + √(2ε) z."""
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64)
    cond = torch.tensor([[0.3, 0.1], [0.0, -0.2]], dtype=F64)
    g = torch.Generator().manual_seed(4)
    sigma, r = 2.0, 0.16
    score = (linear_model(x, None, cond) - x) / sigma**2
    z = torch.randn(x.shape, generator=g, dtype=F64)
    eps = 2 * (r * z.norm(dim=1).mean() / score.norm(dim=1).mean()) ** 2
    x = x + eps * score + torch.sqrt(2 * eps) * z
    z2 = torch.randn(x.shape, generator=g, dtype=F64)
    d = linear_model(x, None, cond)
    x = x + 2 * (d - x) / sigma * 1.0 + math.sqrt(2 * sigma * 1.0) * z2  # predictor σ = 2 → 1
    start, grid = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64), torch.tensor([2.0, 1.0], dtype=F64)
    got = predictor_corrector(linear_model, start, grid, cond, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, x, rtol=1e-12, atol=0)


def test_one_sde_dpmpp_2m_step_by_hand():
    """x' = e^{−h(1+η)} x − (e^{−h(1+η)} − 1) D + s_noise σ'√(1 − e^{−2ηh}) z, h = ln(σ/σ'); the last step returns D."""
    from sdeflow.sampling.multistep import dpmpp_2m_sde

    x, cond = torch.tensor([[1.0, -2.0]], dtype=F64), torch.tensor([[0.3, 0.1]], dtype=F64)
    h, eta, s_noise = math.log(2.0), 1.0, 2.0
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    d = linear_model(x, None, cond)
    x1 = math.exp(-2 * h) * x - math.expm1(-2 * h) * d + s_noise * sde_noise_std(1.0, h, eta) * z
    got = dpmpp_2m_sde(linear_model, x, torch.tensor([2.0, 1.0, 0.0], dtype=F64), cond,
                       generator=torch.Generator().manual_seed(6), s_noise=s_noise)  # fmt: skip
    torch.testing.assert_close(got, linear_model(x1, None, cond), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc", "dpmpp_2m_sde"])
def test_multistep_samplers_report_each_step_and_stop_at_a_positive_end(name):
    from sdeflow.sampling.samplers import SAMPLERS

    seen = []
    x, grid = torch.ones(1, 2, dtype=F64), torch.tensor([4.0, 2.0, 1.0], dtype=F64)
    out = SAMPLERS[name](linear_model, x, grid, torch.zeros(1, 2, dtype=F64), generator=torch.Generator(),
                         callback=lambda i, s, xi, d: seen.append((i, s, xi.clone(), d.clone())))  # fmt: skip
    assert [(i, s) for i, s, _, _ in seen] == [(0, 4.0), (1, 2.0)] and out.shape == x.shape
    torch.testing.assert_close(seen[0][2], x)
    torch.testing.assert_close(seen[0][3], 0.5 * x)  # D of the linear model at the first point
    assert SAMPLERS[name].__name__ == name and SAMPLERS[name].__doc__


def test_dequantisation_and_bits_per_dim_by_hand():
    """x = 2k/(L − 1) − 1 → 2(k + u)/(L − 1) − 1 with u ~ U[0, 1) from the generator; bpd = −log p/(D ln 2) +
    log₂((L − 1)/2), L = 256 by default."""
    from sdeflow.sampling.likelihood import bits_per_dim, dequantize

    k = torch.tensor([[0.0, 5.0, 255.0]], dtype=F64)
    u = torch.rand(k.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    got = dequantize(2 * k / 255 - 1, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, 2 * (k + u) / 255 - 1, rtol=1e-12, atol=1e-12)
    k4 = torch.tensor([[0.0, 3.0]], dtype=F64)
    u4 = torch.rand(k4.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(dequantize(2 * k4 / 3 - 1, levels=4, generator=torch.Generator().manual_seed(2)),
                               2 * (k4 + u4) / 3 - 1)  # fmt: skip
    logp = torch.tensor([-100.0], dtype=F64)
    assert float(bits_per_dim(logp, 10)) == pytest.approx(100 / (10 * math.log(2)) + math.log2(127.5), rel=1e-12)
    assert float(bits_per_dim(logp, 10, levels=4)) == pytest.approx(100 / (10 * math.log(2)) + math.log2(1.5))


def test_get_schedule_dispatches_every_name():
    from sdeflow.sampling.schedules import SCHEDULES, consistency_grid, flow_shifted, get_schedule, karras

    edm, ve, vp, flow = EDMProcess(), VEProcess(), VPDiscreteProcess(), FlowProcess(shift=3.0)
    expected = {
        ("karras", edm): karras(6, edm.sigma_min, edm.sigma_max, 7.0),
        ("edm", edm): karras(6, edm.sigma_min, edm.sigma_max, 7.0),
        ("log_snr", edm): log_snr_uniform(6, edm.sigma_min, edm.sigma_max),
        ("geometric", ve): log_snr_uniform(6, ve.sigma_min, ve.sigma_max),
        ("uniform_t", ve): uniform_t(6, ve),
        ("leading", vp): ddpm_discrete(6, vp, "leading"),
        ("trailing", vp): ddpm_discrete(6, vp, "trailing"),
        ("linspace", vp): ddpm_discrete(6, vp, "linspace"),
        ("flow", flow): flow_shifted(6, flow),
        ("consistency", edm): consistency_grid(6, edm.sigma_min, edm.sigma_max, 7.0),
    }
    assert {name for name, _ in expected} | {"optimized"} == set(SCHEDULES)
    with pytest.raises(ValueError, match="belongs to a model"):  # stored with a checkpoint, not computed here
        get_schedule("optimized", 6, edm)
    for (name, process), want in expected.items():
        assert torch.equal(get_schedule(name, 6, process), want), name
    assert torch.equal(get_schedule("karras", 4, edm, 0.1, 10.0, rho=3.0), karras(4, 0.1, 10.0, 3.0))
    assert torch.equal(get_schedule("log_snr", 4, edm, sigma_min=0.1), log_snr_uniform(4, 0.1, edm.sigma_max))
    assert torch.equal(get_schedule("log_snr", 4, edm, sigma_max=10.0), log_snr_uniform(4, edm.sigma_min, 10.0))
    with pytest.raises(ValueError, match="σ outside the range of process 'edm'"):
        get_schedule("karras", 4, edm, sigma_max=200.0)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        get_schedule("cosine", 4, edm)


def test_grids_are_computed_in_float64():
    torch.testing.assert_close(log_snr_uniform(3, 0.1, 10.0), torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=F64),
                               rtol=1e-15, atol=0)  # fmt: skip
    odd = EDMProcess(0.1, 10.3)
    torch.testing.assert_close(uniform_t(3, odd), torch.tensor([10.3, 5.2, 0.1, 0.0], dtype=F64), rtol=1e-15, atol=0)


def test_flow_shifted_clamps_at_t_min_and_takes_a_shift_override():
    from sdeflow.core.process import FlowProcess as Flow
    from sdeflow.sampling.schedules import flow_shifted

    f = Flow(shift=1.0, t_min=0.2)
    assert float(flow_shifted(10, f)[-2]) == pytest.approx(float(f.sigma(0.2)))  # u = 0.1 → t_min
    assert flow_shifted(2, Flow(shift=3.0), shift=1.0)[1:].tolist() == pytest.approx([1.0, 0.0])  # t = ½
    with pytest.raises(ValueError, match="^the 'flow_shifted' schedule needs a flow process$"):
        flow_shifted(2, EDMProcess())


def test_check_schedule_tolerance_dtype_and_shape():
    from sdeflow.sampling.schedules import check_schedule

    edm = EDMProcess()
    assert check_schedule(torch.tensor([80.0 * (1 + 5e-5), 1.0, 0.0]), edm).dtype == F64  # within rtol 1e-4
    with pytest.raises(ValueError, match="σ outside the range"):
        check_schedule(torch.tensor([80.0 * (1 + 1e-3), 1.0, 0.0]), edm)
    for bad in (torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([0.0])):
        with pytest.raises(ValueError, match=r"^a schedule must be a 1-D grid of at least two σ values"):
            check_schedule(bad)


def test_check_schedule_names_each_fault():
    from sdeflow.sampling.schedules import check_schedule

    edm = EDMProcess()
    faults = [
        (torch.tensor([2.0, float("nan"), 0.0]), "^the schedule contains non-finite σ$"),
        (torch.tensor([2.0, 1.0, 0.5]), r"^the schedule must end at σ = 0, got 0.5$"),
        (torch.tensor([2.0, 1.0, 1.0, 0.0]), "^the schedule must be strictly decreasing$"),
    ]
    for grid, message in faults:
        with pytest.raises(ValueError, match=message):
            check_schedule(grid)
    with pytest.raises(ValueError, match="σ outside the range"):  # every σ but the final 0 is checked
        check_schedule(torch.tensor([2.0, 1.0, 0.001, 0.0]), edm)
    lo = edm.sigma_min * (1 - 1e-4)
    edm.check_sigma(torch.tensor([lo, 80.0 * (1 + 1e-4)], dtype=F64))  # the tolerance's ends are inside


def test_karras_default_rho_in_float64():
    """ρ = 7 by default (Karras et al. 2022, eq. 5)."""
    from sdeflow.sampling.schedules import karras

    ramp = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0], dtype=F64)
    want = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(karras(4, 0.002, 80.0)[:-1], want, rtol=1e-15, atol=0)
