"""Losses against hand computations: each recipe's parts, each σ sampler draw by draw, each weighting λ(σ) in closed
form, and a recipe's batch loss recomputed from the same random draws."""

import math
import re
from pathlib import Path

import pytest
import torch

from sdeflow import EDMProcess, FlowProcess, VEProcess, VPDiscreteProcess, VPLinearProcess
from sdeflow.core.losses import RECIPES, Recipe, denoising_loss, loss_weight, recipe, sample_sigma

F64 = torch.float64
README = Path(__file__).resolve().parents[1] / "README.md"
# recipe → (process class, its σ range or shift, parameterization, σ sampling, weighting)
PARTS = {
    "ddpm": (VPDiscreteProcess, None, "eps", "discrete", "eps"),
    "ncsn": (VEProcess, (0.01, 50.0), "score", "log_uniform", "score"),
    "vp": (VPLinearProcess, None, "eps", "uniform_t", "eps"),
    "ve": (VEProcess, (0.01, 50.0), "score", "uniform_t", "score"),
    "edm": (EDMProcess, (0.002, 80.0), "edm", "lognormal", "edm"),
    "rectified_flow": (FlowProcess, 1.0, "velocity", "uniform_t", "velocity"),
    "sd3": (FlowProcess, 3.0, "velocity", "logit_normal", "velocity"),
}


def readme_recipe_rows() -> dict[str, list[str]]:
    rows = {}
    for line in README.read_text().splitlines():
        m = re.match(r"\| `(\w+)` \((.+?)\) \|(.*)", line)
        if m and m.group(1) in RECIPES and m.group(1) not in rows:  # the recipe table comes first
            rows[m.group(1)] = [m.group(2)] + [c.strip() for c in m.group(3).split("|")[:-1]]
    return rows


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_has_its_papers_parts(name):
    r, (kind, arg, param, sampling, weighting) = recipe(name), PARTS[name]
    assert (r.name, type(r.process), r.parameterization, r.sigma_sampling, r.weighting) == (
        name, kind, param, sampling, weighting)  # fmt: skip
    assert r.sigma_data == 0.5 and r.sampling_kwargs == {}
    if kind is FlowProcess:
        assert r.process.shift == arg
    elif kind is VEProcess:  # σ(t) = σ_min (σ_max/σ_min)^t at t = 0 and 1
        assert r.process.sigma(torch.tensor([0.0, 1.0], dtype=F64)).tolist() == pytest.approx(arg, rel=1e-12)
    elif kind is EDMProcess:  # σ = t
        assert (r.process.t_min, r.process.t_max) == arg
    # the README's table shows the same parts and cites the paper the recipe names
    cite, _, predicts, sampled, weighted = readme_recipe_rows()[name]
    assert r.paper.startswith(cite), (r.paper, cite)
    assert predicts.startswith(f"`{param}`") and sampled.startswith(f"`{sampling}`")
    assert weighted.startswith(f"`{weighting}`")


def test_recipe_overrides_replace_one_part_and_leave_the_table_alone():
    r = recipe("edm", sigma_data=0.25)
    assert r.sigma_data == 0.25 and r.name == "edm" and recipe("edm").sigma_data == 0.5
    with pytest.raises(ValueError, match="unknown recipe 'edn'"):
        recipe("edn")


def draws(n, seed=0):
    """The uniform and normal draws sample_sigma takes from a generator seeded ``seed``, in its order."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)


def test_sigma_samplers_draw_by_draw():
    """Each scheme's σ recomputed from the same uniform u and normal z (float64 draws, σ returned in float32)."""
    n, g = 64, lambda: torch.Generator().manual_seed(0)
    u, z = draws(n)
    ve, edm, flow = VEProcess(0.01, 50.0), EDMProcess(), FlowProcess(shift=3.0)
    expected = {
        ("uniform_t", ve): ve.sigma(ve.t_min + (ve.t_max - ve.t_min) * u),
        ("log_uniform", ve): torch.exp(math.log(ve.sigma_min) + math.log(ve.sigma_max / ve.sigma_min) * u),
        ("lognormal", edm): torch.exp(-1.2 + 1.2 * z),  # EDM §5: ln σ ~ N(−1.2, 1.2²)
        # SD3: t = sigmoid(z) for logit-normal (0, 1), shifted t' = 3t / (1 + 2t), σ = t'/(1 − t')
        ("logit_normal", flow): (lambda t: (3 * t / (1 + 2 * t)) / (1 - 3 * t / (1 + 2 * t)))(torch.sigmoid(z)),
    }
    for (scheme, process), want in expected.items():
        got = sample_sigma(scheme, n, process, g())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0, msg=scheme)
    custom = sample_sigma("lognormal", n, edm, g(), p_mean=0.5, p_std=0.1)
    torch.testing.assert_close(custom, torch.exp(0.5 + 0.1 * z).float(), rtol=1e-6, atol=0)
    shifted = sample_sigma("logit_normal", n, edm, g(), logit_mean=1.0, logit_std=0.5)
    torch.testing.assert_close(shifted, torch.sigmoid(1.0 + 0.5 * z).clamp(edm.t_min).float(), rtol=1e-6, atol=0)


def test_discrete_sigma_draws_integer_steps_and_needs_a_discrete_process():
    p = VPDiscreteProcess()
    g = torch.Generator().manual_seed(3)
    torch.rand(16, generator=g, dtype=F64)
    t = torch.randint(0, 1000, (16,), generator=g)
    torch.testing.assert_close(sample_sigma("discrete", 16, p, torch.Generator().manual_seed(3)), p.sigmas[t].float())
    with pytest.raises(ValueError, match="^sigma sampling 'discrete' needs a discrete process"):
        sample_sigma("discrete", 4, VPLinearProcess())
    with pytest.raises(ValueError, match="unknown sigma sampling scheme 'gaussian'"):
        sample_sigma("gaussian", 4, p)


def test_logit_normal_is_clamped_to_the_process_time_range():
    """A logit far out on either side lands on t_min or t_max, never outside the process's σ range."""
    edm = EDMProcess()
    lo = sample_sigma("logit_normal", 4, edm, logit_mean=-40.0)
    flow = FlowProcess()
    hi = sample_sigma("logit_normal", 4, flow, logit_mean=40.0)
    torch.testing.assert_close(lo, torch.full((4,), edm.t_min))
    torch.testing.assert_close(hi, flow.sigma(torch.tensor(flow.t_max, dtype=F64)).float().expand(4))


SIGMA = torch.tensor([0.1, 1.0, 3.0], dtype=F64)


def test_each_weighting_in_closed_form():
    s = SIGMA
    flow_t = s / (1 + s)  # flow: σ = t/(1 − t)
    vp = VPLinearProcess()
    cases = {
        ("eps", None): s**-2,
        ("score", None): s**-2,
        ("x0", None): torch.ones(3, dtype=F64),
        ("v", None): (1 + s**2) / s**2,
        ("v", vp): (1 + s**2) / s**2,  # 1/c_out² of v on a VP process, s = 1/√(1 + σ²)
        ("v", EDMProcess()): (1 + s**2) ** 2 / s**2,  # s = 1: c_out = −σ/(1 + σ²)
        ("edm", None): (s**2 + 0.25) / (s * 0.5) ** 2,
        ("min_snr", None): torch.clamp(s**-2, max=5.0),
        ("velocity", FlowProcess()): flow_t**-2,  # (s σ̇/σ)² = 1/t² on the flow
        ("target", EDMProcess()): (s**2 + 0.25) / (s * 0.5) ** 2,  # 1/c_out² of the default (edm) parameterization
    }
    for (weighting, process), want in cases.items():
        torch.testing.assert_close(loss_weight(weighting, s, process), want, msg=weighting)
    torch.testing.assert_close(loss_weight("edm", s, sigma_data=0.25), (s**2 + 0.0625) / (s * 0.25) ** 2)
    torch.testing.assert_close(loss_weight("min_snr", s, gamma=2.0), torch.clamp(s**-2, max=2.0))
    target = loss_weight("target", s, EDMProcess(), parameterization="edm", sigma_data=0.25)
    torch.testing.assert_close(target, (s**2 + 0.0625) / (s * 0.25) ** 2)
    velocity = loss_weight("target", s, FlowProcess(), parameterization="velocity")
    torch.testing.assert_close(velocity, flow_t**-2)
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        loss_weight("snr", s)


def test_recipe_passes_its_parts_on():
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    r = Recipe("mine", EDMProcess(), "edm", "lognormal", "target", sigma_data=0.25,
               sampling_kwargs={"p_mean": 0.5, "p_std": 0.1})  # fmt: skip
    torch.testing.assert_close(r.sample_sigma(8, g()), sample_sigma("lognormal", 8, EDMProcess(), g(), "cpu", 0.5, 0.1))
    torch.testing.assert_close(r.weight(SIGMA), (SIGMA**2 + 0.0625) / (SIGMA * 0.25) ** 2)


def test_recipe_loss_recomputed_from_the_same_draws():
    """mean_i λ(σ_i) · mean ‖D(x0 + σ_i ε_i; σ_i, c_i) − x0‖², σ drawn first, then ε, from one generator."""
    x0 = torch.randn(6, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    cond = torch.arange(6, dtype=F64)
    seen = []

    def denoiser(x, sigma, c):
        seen.append(sigma.dtype)
        return 0.5 * x + c.reshape(-1, 1, 1) / 10

    r = recipe("edm")
    g = torch.Generator().manual_seed(2)
    sigma = sample_sigma("lognormal", 6, EDMProcess(), g).double()
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    per = ((denoiser(x0 + sigma.reshape(-1, 1, 1) * eps, sigma, cond) - x0) ** 2).reshape(6, -1).mean(1)
    want = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2 * per).mean()
    got = r.loss(denoiser, x0, cond, torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert seen[-1] == F64  # σ reaches the denoiser in the data's dtype
    torch.testing.assert_close(denoising_loss(denoiser, x0, sigma, None, eps, cond), per, rtol=1e-12, atol=0)
