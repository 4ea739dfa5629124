"""The one table of sampler facts: every fact it states is what the sampler does, and the README says the same."""

import re
from pathlib import Path

import pytest
import torch

from sdeflow import EDMProcess, FlowProcess, GaussianMixture, VPDiscreteProcess, sample
from sdeflow.sampling.samplers import SPECS, default_schedule, nfe_per_steps, steps_for_nfe
from sdeflow.sampling.steps import ancestral_step, sde_noise_std, to_d

GM = GaussianMixture.grid_2d(2, 1.0, 0.2)
ROOT = Path(__file__).resolve().parents[1]


def _process(spec):
    return FlowProcess() if spec.name.startswith("flow_") else EDMProcess()


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.nfe is not None])
@pytest.mark.parametrize("steps", [2, 5])
def test_counted_nfe_is_the_tables(name, steps):
    spec = SPECS[name]
    r = sample(GM, (8, 2), _process(spec), name, steps=steps, seed=0)
    assert r.nfe == spec.nfe(steps, {}) == nfe_per_steps(name, steps)


def test_nfe_with_options_and_steps_for_nfe():
    r = sample(GM, (8, 2), EDMProcess(), "pc", steps=4, seed=0, corrector_steps=2)
    assert r.nfe == nfe_per_steps("pc", 4, corrector_steps=2) == 12
    r = sample(GM, (8, 2), EDMProcess(), "annealed_langevin", steps=3, seed=0, steps_per_level=2, final_denoise=False)
    assert r.nfe == nfe_per_steps("annealed_langevin", 3, steps_per_level=2, final_denoise=False) == 6
    assert [steps_for_nfe("heun", n) for n in (1, 2, 3, 4, 5, 19)] == [1, 1, 2, 2, 3, 10]
    with pytest.raises(ValueError, match="tolerances"):
        nfe_per_steps("adaptive", 5)


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.nfe is not None])
def test_stochastic_flag_is_whether_the_generator_matters(name):
    spec = SPECS[name]
    proc = _process(spec)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * proc.sigma_max
    a, b = (sample(GM, None, proc, name, steps=4, x_init=x, seed=s).samples for s in (1, 2))
    assert (not torch.equal(a, b)) == spec.stochastic


def test_default_schedules_and_flow_resolution():
    assert default_schedule("ddim", VPDiscreteProcess()) == "leading"
    assert default_schedule("ddpm", VPDiscreteProcess()) == "leading"
    assert default_schedule("euler", VPDiscreteProcess()) == "karras"
    assert default_schedule("heun", FlowProcess()) == "flow"
    assert default_schedule("dpmpp_2m", EDMProcess()) == "karras"
    assert SPECS["heun"].resolve(FlowProcess()) is SPECS["flow_heun"]
    assert SPECS["heun"].resolve(EDMProcess()) is SPECS["heun"]


def test_readme_sampler_table_is_the_specs():
    text = (ROOT / "README.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| `\w+`", line) and line.count("|") == 6]
    seen = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        name = re.match(r"`(\w+)`", cells[0]).group(1)
        if name in SPECS:
            seen[name] = cells[1:]
    assert set(seen) == set(SPECS)
    for name, (nfe, noise, process, paper) in seen.items():
        s = SPECS[name]
        assert (nfe, noise, process, paper) == (
            s.nfe_formula,
            "yes" if s.stochastic else "no",
            "yes" if s.needs_process else "no",
            s.paper,
        ), name


def test_shared_step_helpers_by_hand():
    x, d = torch.tensor([3.0]), torch.tensor([1.0])
    assert float(to_d(x, 2.0, d)) == 1.0  # (3 − 1)/2
    down, up = ancestral_step(2.0, 1.0, eta=1.0)
    assert up == pytest.approx(1.0 * (1 - 1 / 4) ** 0.5) and down == pytest.approx((1 - up**2) ** 0.5)
    assert ancestral_step(2.0, 1.0, eta=0.0) == (1.0, 0.0)
    assert ancestral_step(2.0, 0.0) == (0.0, 0.0)
    assert sde_noise_std(0.5, 0.7, 1.0) == pytest.approx(0.5 * (1 - torch.exp(torch.tensor(-1.4)).item()) ** 0.5)
