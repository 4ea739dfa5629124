"""Our samplers and diffusers' schedulers, driven by the same exact oracle, same timesteps, same noise.

Skipped with the reason printed when diffusers is not installed; CI installs it (the ``dev`` extra).
"""

import pytest
import torch

from sdeflow import FlowProcess, GaussianMixture, VPDiscreteProcess
from sdeflow.interop import run_diffusers_scheduler
from sdeflow.sampling.samplers import ddim, dpmpp_2m, euler, flow_euler, heun

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[dev]'")

GM = GaussianMixture.random(6, 8, std=0.2, seed=11)
B = 256
BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _noise():
    return torch.randn(B, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_ddim_matches_diffusers():
    sch = diffusers.DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    sch.set_timesteps(20)
    ac = sch.alphas_cumprod.double()
    sig_of_t = lambda k, t: float(((1 - ac[t]) / ac[t]) ** 0.5)  # noqa: E731
    noise = _noise()
    ref, _ = run_diffusers_scheduler(sch, GM, noise)
    proc = VPDiscreteProcess()
    sigmas = torch.tensor([sig_of_t(0, t) for t in sch.timesteps] + [0.0], dtype=torch.float64)
    # our grid for 'leading' spacing is diffusers' grid (diffusers holds ᾱ in float32: at t = 0, 1 − ᾱ ≈ 1e-4
    # keeps only ~4 digits, so σ there differs by ~8e-5 relative)
    torch.testing.assert_close(sigmas, proc_grid := _our_leading(proc, 20), rtol=1e-4, atol=0)
    ours = ddim(GM, noise * (1 + sigmas[0] ** 2) ** 0.5, proc_grid)
    print(f"ddim: relative difference {_rel(ours, ref):.2e}")
    assert _rel(ours, ref) < 1e-4


def _our_leading(proc, n):
    from sdeflow.sampling.schedules import ddpm_discrete

    return ddpm_discrete(n, proc, "leading")


@pytest.mark.parametrize(
    "name, cls, ours, first",
    [
        ("euler", "EulerDiscreteScheduler", euler, "sigma_max"),
        ("heun", "HeunDiscreteScheduler", heun, "sigma_max"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", dpmpp_2m, "vp"),
    ],
)
def test_sigma_space_schedulers_match_diffusers(name, cls, ours, first):
    sch = getattr(diffusers, cls)(**BETAS)
    sch.set_timesteps(10)
    sig = sch.sigmas.double()
    noise = _noise()
    ref, nfe = run_diffusers_scheduler(sch, GM, noise)
    assert nfe == (19 if name == "heun" else 10)
    grid = torch.unique_consecutive(sig)  # Heun repeats interior σ; the grid is the distinct values
    if first == "vp":  # DPM-Solver works on x_t = x̃/√(1+σ²): start from the same x_T
        x_init = noise * (1 + grid[0] ** 2) ** 0.5
    else:
        x_init = noise * sch.init_noise_sigma
    out = ours(GM, x_init.double(), grid)
    print(f"{name}: relative difference {_rel(out, ref):.2e}")
    assert _rel(out, ref) < 1e-4, f"{name}: relative difference {_rel(out, ref):.2e}"


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_flow_match_euler(shift):
    proc = FlowProcess(shift=shift)
    from sdeflow.sampling.schedules import flow_shifted

    sigmas = flow_shifted(12, proc)
    t = proc.t_of_sigma(sigmas[:-1])
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sch.set_timesteps(sigmas=t.tolist())
    noise = _noise()
    x, _ = run_diffusers_scheduler(sch, GM, noise)
    ours = flow_euler(GM, noise / (1 - float(t[0])), sigmas, process=proc)
    print(f"flow_euler shift {shift}: relative difference {_rel(ours, x):.2e}")
    assert _rel(ours, x) < 1e-4


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_heun_matches_flow_match_heun(shift):
    """flow_heun (what sample() runs for 'heun' on a flow) is diffusers' FlowMatchHeunDiscreteScheduler."""
    from sdeflow.sampling.samplers import flow_heun

    sch = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sch.set_timesteps(8)
    t = torch.unique_consecutive(sch.sigmas.double())  # flow times, first 1, last 0; Heun repeats interior ones
    t[0] = 1 - 1e-7  # diffusers starts at t = 1 (σ = ∞); our grid needs a finite σ
    sigmas = torch.cat([t[:-1] / (1 - t[:-1]), torch.zeros(1, dtype=torch.float64)])
    noise = _noise()
    x, nfe = run_diffusers_scheduler(sch, GM, noise)
    ours = flow_heun(GM, noise / (1 - float(t[0])), sigmas, process=FlowProcess(t_max=1 - 1e-7))
    print(f"flow_heun shift {shift}: relative difference {_rel(ours, x):.2e}")
    assert nfe == 15 and _rel(ours, x) < 1e-5


@pytest.mark.parametrize(
    ("name", "cls", "options", "ours"),
    [
        ("unipc", "UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}, "unipc"),
        ("unipc order 3", "UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}, "unipc3"),
        # third order to the last step; 'heun' is the second-order form DPM-Solver++(3M) uses on its second step
        (
            "dpmpp_3m",
            "DPMSolverMultistepScheduler",
            {"solver_order": 3, "solver_type": "heun", "lower_order_final": False},
            "dpmpp_3m",
        ),
        ("dpmpp_2m, Karras σ", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m"),
        ("euler, Karras σ", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler"),
    ],
)
def test_more_schedulers_match_diffusers(name, cls, options, ours):
    """Options both libraries have: UniPC, DPM-Solver++(3M) and Karras σ grids, on the same oracle and noise."""
    from functools import partial

    from sdeflow.sampling.multistep import unipc
    from sdeflow.sampling.samplers import SAMPLERS

    sch = getattr(diffusers, cls)(**BETAS, **options)
    sch.set_timesteps(10)
    grid = torch.unique_consecutive(sch.sigmas.double())
    noise = _noise()
    ref, _ = run_diffusers_scheduler(sch, GM, noise)
    start = sch.init_noise_sigma if cls.startswith("Euler") else (1 + grid[0] ** 2) ** 0.5  # σ-space vs VP x_T
    sampler = partial(unipc, order=3) if ours == "unipc3" else SAMPLERS[ours]
    out = sampler(GM, noise * start, grid)
    print(f"{name}: relative difference {_rel(out, ref):.2e}")
    assert _rel(out, ref) < 1e-5, name


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_discrete_spacings_are_diffusers_timesteps(spacing):
    from sdeflow.sampling.schedules import ddpm_discrete

    proc = VPDiscreteProcess()
    for n in (10, 17, 50):
        sch = diffusers.DDIMScheduler(**BETAS, timestep_spacing=spacing)
        sch.set_timesteps(n)
        ours = proc.t_of_sigma(ddpm_discrete(n, proc, spacing)[:-1]).round().long()
        assert ours.tolist() == sch.timesteps.tolist(), (spacing, n)


@pytest.mark.parametrize("name, ours", [("EDMDPMSolverMultistepScheduler", dpmpp_2m), ("EDMEulerScheduler", euler)])
def test_edm_schedulers_match_ours(name, ours):
    """diffusers' EDM schedulers read EDM's raw F; run_diffusers_scheduler hands it over from D, and the samples
    equal our sampler's on diffusers' σ grid from the same start (σ-space, x_T = noise · init_noise_sigma)."""
    sch = getattr(diffusers, name)()
    sch.set_timesteps(10)
    noise = _noise()
    ref, nfe = run_diffusers_scheduler(sch, GM, noise)
    sigmas = sch.sigmas.double()
    assert nfe == 10 and float(sigmas[-1]) == 0.0 and float(sigmas[0]) == pytest.approx(80.0, rel=1e-6)
    x = ours(GM, noise * float(sch.init_noise_sigma), sigmas)
    assert _rel(x, ref) < 1e-5
