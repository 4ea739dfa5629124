"""Samplers against the exact oracle: convergence, determinism, order, and errors."""

import itertools
import math

import pytest
import torch

from sdeflow import EDMProcess, FlowProcess, GaussianMixture, VPDiscreteProcess, VPLinearProcess
from sdeflow.evaluation.metrics import sliced_wasserstein
from sdeflow.sampling import sample
from sdeflow.sampling.samplers import SAMPLERS, ddim, ddpm, heun, steps_for_nfe
from sdeflow.sampling.schedules import ddpm_discrete, karras

N = 4000
GM = GaussianMixture.grid_2d(3, 1.0, 0.1)
REF = GM.sample(N, torch.Generator().manual_seed(9))[0]
NOISE_FLOOR = sliced_wasserstein(REF, GM.sample(N, torch.Generator().manual_seed(10))[0])  # ≈ 0.045

# (steps at low budget, steps at high budget, asserted sliced-W2 bound at the high budget, options).
# The bounds are measured values (EDM process, Karras schedule, seed 0) rounded up by ~20 %.
CONVERGENCE = {
    "ddpm": (5, 200, 0.07, {}),
    "ddim": (5, 100, 0.06, {}),
    "euler": (5, 100, 0.06, {}),
    "heun": (5, 25, 0.06, {}),
    "edm_stochastic": (5, 25, 0.07, {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    "flow_euler": (5, 100, 0.06, {}),
    "flow_heun": (5, 25, 0.06, {}),
    "euler_maruyama": (10, 100, 0.06, {}),
    "pc": (10, 50, 0.06, {}),
    "annealed_langevin": (5, 20, 0.09, {"steps_per_level": 20, "snr": 0.3}),
    "dpmpp_2m": (5, 25, 0.06, {}),
    "dpmpp_2m_sde": (5, 50, 0.06, {}),
    "dpmpp_3m": (5, 25, 0.06, {}),
    "dpmpp_3m_sde": (10, 50, 0.06, {}),
    "unipc": (5, 25, 0.06, {}),
}


def _err(sampler, steps, process=None, seed=0, **opts):
    r = sample(GM, (N, 2), process or EDMProcess(), sampler, steps=steps, seed=seed, dtype=torch.float64, **opts)
    return sliced_wasserstein(r.samples, REF), r


def test_every_sampler_is_covered():
    # consistency sampling needs a consistency model, not a denoiser: held to a hand computation in
    # test_exact_fewstep.py and to a distilled model's samples in test_fewstep.py
    assert set(CONVERGENCE) | {"adaptive", "consistency"} == set(SAMPLERS)


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_sampler_converges_to_the_true_mixture(name):
    lo, hi, bound, opts = CONVERGENCE[name]
    err_lo, _ = _err(name, lo, **opts)
    err_hi, r = _err(name, hi, **opts)
    print(
        f"{name}: SW2 {err_lo:.4f} at {lo} steps -> {err_hi:.4f} at {hi} steps (NFE {r.nfe}); floor {NOISE_FLOOR:.4f}"
    )
    assert err_hi < bound, f"{name}: sliced W2 {err_hi:.4f} above bound {bound}"
    assert err_hi < err_lo, f"{name}: no improvement with more steps ({err_lo:.4f} -> {err_hi:.4f})"
    assert torch.isfinite(r.samples).all()


@pytest.mark.parametrize("process", [VPLinearProcess(), FlowProcess()], ids=["vp", "flow"])
@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "unipc", "euler_maruyama", "ddim"])
def test_samplers_work_on_other_processes(name, process):
    err, _ = _err(name, 50, process=process)
    assert err < 0.07


def test_adaptive_solver_agrees_with_2000_step_heun():
    x0 = EDMProcess().sample_prior((500, 2), torch.Generator().manual_seed(3), dtype=torch.float64)
    sig = karras(2000, 0.002, 80.0)
    ref = heun(GM, x0, sig)
    r = sample(GM, (500, 2), EDMProcess(), "adaptive", sigmas=sig, x_init=x0, rtol=1e-7, atol=1e-7, dtype=torch.float64)
    assert (r.samples - ref).abs().max() < 1e-4
    assert 20 < r.nfe < 2000  # adaptive: far fewer evaluations than Heun's 3999
    loose = sample(
        GM, (500, 2), EDMProcess(), "adaptive", sigmas=sig, x_init=x0, rtol=1e-3, atol=1e-3, dtype=torch.float64
    )
    assert loose.nfe < r.nfe


def test_heun_is_second_order():
    """Global error of Heun on the PF-ODE falls ~4x when the steps double (exact denoiser)."""
    gm = GaussianMixture.random(4, 3, std=0.3, seed=2)
    x0 = 20.0 * torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = heun(gm, x0, karras(4096, 0.002, 20.0))
    errs = [float((heun(gm, x0, karras(n, 0.002, 20.0)) - reference).norm()) for n in (16, 32, 64, 128)]
    ratios = [a / b for a, b in itertools.pairwise(errs)]
    print("Heun errors", errs, "ratios", ratios)
    assert all(3.0 < r < 5.5 for r in ratios[1:]), ratios
    # Euler for comparison is first order
    from sdeflow.sampling.samplers import euler

    e = [float((euler(gm, x0, karras(n, 0.002, 20.0)) - reference).norm()) for n in (64, 128)]
    assert 1.6 < e[0] / e[1] < 2.6


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "ddim", "unipc", "dpmpp_3m"])
def test_deterministic_samplers_are_reproducible(name):
    a = sample(GM, (64, 2), EDMProcess(), name, steps=8, seed=7).samples
    b = sample(GM, (64, 2), EDMProcess(), name, steps=8, seed=7).samples
    c = sample(GM, (64, 2), EDMProcess(), name, steps=8, seed=8).samples
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["ddpm", "euler_maruyama", "pc", "dpmpp_2m_sde", "edm_stochastic"])
def test_stochastic_samplers_are_reproducible_under_a_seed(name):
    opts = {"s_churn": 5.0} if name == "edm_stochastic" else {}
    a = sample(GM, (64, 2), EDMProcess(), name, steps=8, seed=7, **opts).samples
    b = sample(GM, (64, 2), EDMProcess(), name, steps=8, seed=7, **opts).samples
    assert torch.equal(a, b)


def test_ddim_eta1_equals_ddpm_ancestral():
    proc = VPDiscreteProcess()
    sig = ddpm_discrete(50, proc, "leading")
    x = proc.sample_prior((N, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    a = ddpm(GM, x, sig, generator=torch.Generator().manual_seed(1))
    b = ddim(GM, x, sig, eta=1.0, generator=torch.Generator().manual_seed(1))
    # same noise: the two update rules are algebraically the same Gaussian step
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # independent noise: the same distribution (difference at the two-sample noise floor)
    c = ddim(GM, x, sig, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert sliced_wasserstein(a, c) < 1.5 * NOISE_FLOOR
    # DDIM with η = 0 is deterministic Euler on the PF-ODE
    torch.testing.assert_close(ddim(GM, x, sig), SAMPLERS["euler"](GM, x, sig))


def test_nfe_accounting():
    for name, steps in (("heun", 10), ("pc", 10), ("dpmpp_2m", 10), ("unipc", 10)):
        r = sample(GM, (8, 2), EDMProcess(), name, steps=steps, seed=0)
        from sdeflow.sampling.samplers import nfe_per_steps

        assert r.nfe == nfe_per_steps(name, steps)
    assert steps_for_nfe("heun", 10) == 5 and steps_for_nfe("euler", 10) == 10 and steps_for_nfe("pc", 10) == 5


def test_sampling_dtype_and_batch_independence():
    r32 = sample(GM, (16, 2), EDMProcess(), "dpmpp_2m", steps=10, seed=1, dtype=torch.float32)
    assert r32.samples.dtype == torch.float32
    x = EDMProcess().sample_prior((16, 2), torch.Generator().manual_seed(4)).float()
    full = sample(GM, (16, 2), EDMProcess(), "heun", steps=10, x_init=x).samples
    half = sample(GM, (8, 2), EDMProcess(), "heun", steps=10, x_init=x[:8]).samples
    torch.testing.assert_close(full[:8], half)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown sampler 'eulr'"):
        sample(GM, (4, 2), EDMProcess(), "eulr")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sample(GM, (4, 2), EDMProcess(), "euler", steps=0)
    with pytest.raises(ValueError, match="σ outside the range"):
        sample(GM, (4, 2), EDMProcess(), "euler", sigmas=torch.tensor([200.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(GM, (4, 2), EDMProcess(), "euler", sigmas=torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="end at σ = 0"):
        sample(GM, (4, 2), EDMProcess(), "euler", sigmas=torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="has no option"):
        sample(GM, (4, 2), EDMProcess(), "euler", eta=1.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        sample(GM, (4, 2), EDMProcess(), "euler", schedule="cosine")
    with pytest.raises(ValueError, match="needs a discrete process"):
        sample(GM, (4, 2), EDMProcess(), "ddim", schedule="leading")
    assert math.isfinite(NOISE_FLOOR)


def test_initial_noise_matches_the_prior_at_the_first_grid_point():
    """Started below σ_max, a VP sampler's x̃ has std √(1 + σ₀²) (x_t ~ N(0, I)); an EDM one std σ₀."""
    from sdeflow import VPLinearProcess

    for proc, sigma0, expected in ((VPLinearProcess(), 2.0, math.sqrt(5.0)), (EDMProcess(), 3.0, 3.0)):
        seen = {}
        sigmas = torch.tensor([sigma0, 1.0, 0.0], dtype=torch.float64)
        sample(
            GM,
            (20000, 2),
            proc,
            "euler",
            sigmas=sigmas,
            seed=0,
            callback=lambda i, s, x, d, seen=seen: seen.setdefault(i, x.std().item()),
        )
        assert seen[0] == pytest.approx(expected, rel=0.02)


def test_accelerated_denoiser_on_cpu():
    """bf16 autocast changes D only by bf16 rounding; compile keeps it exactly; bad options are refused."""
    from sdeflow import Denoiser, accelerate_denoiser
    from sdeflow.models import UNet

    torch.manual_seed(0)
    net = UNet.preset("small", img_resolution=8, in_channels=1, model_channels=16).eval()
    for p in net.parameters():  # the zero-initialised output layer would make D trivially exact
        torch.nn.init.normal_(p, std=0.05)
    den = Denoiser(net, EDMProcess())
    x, s = torch.randn(4, 1, 8, 8), torch.full((4,), 2.0)
    ref = den(x, s)
    fast = accelerate_denoiser(den, "bf16")
    out = fast(x, s)
    assert out.dtype == torch.float32 and 0 < (out - ref).abs().max() < 0.05 * ref.abs().max()
    r = sample(fast, (4, 1, 8, 8), EDMProcess(), "dpmpp_2m", steps=3, seed=0)
    assert torch.isfinite(r.samples).all() and r.nfe == 3
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        accelerate_denoiser(den, "int8")
    nhwc = accelerate_denoiser(den, channels_last=True)  # converts the network's weights in place
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = nhwc(x, s)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            accelerate_denoiser(den, cuda_graphs=True)


@pytest.mark.parametrize(
    "kind, kwargs, shape",
    [
        ("unet", {"preset": "small_attn", "img_resolution": 8, "in_channels": 1, "model_channels": 16}, (1, 8, 8)),
        ("dit", {"preset": "DiT-S/4", "input_size": 8, "in_channels": 1, "num_classes": 3}, (1, 8, 8)),
        ("mlp", {"dim": 2, "num_classes": 3}, (2,)),
    ],
)
def test_bf16_weights_under_autocast_match_fp32_to_bf16_rounding(kind, kwargs, shape):
    """cast_weights stores the network's parameters in bf16 (buffers such as the noise-embedding frequencies
    stay fp32); under autocast every backbone runs and D stays within bf16 rounding of the fp32 D."""
    from sdeflow import Denoiser, accelerate_denoiser
    from sdeflow.models import build_model

    torch.manual_seed(0)
    net = build_model(kind, **kwargs).eval()
    for p in net.parameters():  # the zero-initialised output layers would make D trivially exact
        torch.nn.init.normal_(p, std=0.05)
    den = Denoiser(net, EDMProcess())
    x, s = torch.randn(4, *shape), torch.tensor([0.01, 0.5, 2.0, 80.0])
    y = torch.arange(4) % 3 if kind != "unet" else None
    with torch.no_grad():
        ref = den(x, s, y)
    fast = accelerate_denoiser(den, "bf16", cast_weights=True)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert all(b.dtype == torch.float32 for b in net.buffers())
    with torch.no_grad():
        out = fast(x, s, y)
    assert out.dtype == torch.float32
    # compare the networks' outputs F = (D − c_skip·x) / c_out: at small σ, D ≈ x would hide them
    c = den.coefficients(s)
    shape_c = (-1,) + (1,) * len(shape)
    f_ref, f_out = ((d - c.c_skip.view(shape_c) * x) / c.c_out.view(shape_c) for d in (ref, out))
    err = float((f_out - f_ref).abs().max() / f_ref.abs().max())
    print(kind, err)
    assert 0 < err < 0.03
    with pytest.raises(ValueError, match="needs a reduced precision"):
        accelerate_denoiser(den, "fp32", cast_weights=True)
    with pytest.raises(ValueError, match="pass it as network="):
        accelerate_denoiser(lambda x, s, y=None: den(x, s, y), "bf16", cast_weights=True)


def test_heun_on_a_flow_runs_in_flow_time_and_is_second_order():
    """σ-space Heun is ill-conditioned on a flow's grid (σ_0 ≈ 10⁴): measured SW2 2.07 at 5 steps and 0.53 at
    10, against Euler's 0.15 / 0.09. sample() therefore runs 'heun' on flows as flow_heun (the trapezoid in t)."""
    from sdeflow.sampling.samplers import edm_stochastic
    from sdeflow.sampling.schedules import get_schedule

    flow = FlowProcess()
    err_heun, r = _err("heun", 5, process=flow)
    err_euler, _ = _err("euler", 5, process=flow)
    assert r.nfe == 9 and err_heun < 0.12 and err_heun < err_euler
    sig = get_schedule("flow", 5, flow)
    x0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(sig[0])
    sigma_space = edm_stochastic(GM, x0, sig)  # what 'heun' computed on flows before
    assert sliced_wasserstein(sigma_space, REF) > 1.0
    # second order in t: errors against a 2000-step solution fall 4× when the steps double
    gm = GaussianMixture.grid_2d(3, 1.0, 0.3)
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(n):
        s = get_schedule("flow", n, flow)
        return sample(gm, (500, 2), flow, "flow_heun", sigmas=s, x_init=x * float(s[0]), dtype=torch.float64).samples

    ref = run(2000)
    errs = [float((run(n) - ref).norm(dim=1).mean()) for n in (20, 40, 80)]
    assert all(3.5 < errs[i] / errs[i + 1] < 4.5 for i in range(2)), errs


@pytest.mark.parametrize("name", ["euler", "heun", "ddim", "dpmpp_2m", "unipc", "flow_euler", "flow_heun"])
def test_float32_sampling_on_a_flow_matches_float64(name):
    """A flow's grid starts at σ ≈ 10⁴ (t = 1 − 10⁻⁴), where float32 cancellation once cost flow_euler a mean
    error of 0.12 (max 0.46) on these samples; every deterministic sampler must now agree with float64."""
    from sdeflow.sampling.schedules import get_schedule

    flow = FlowProcess()
    sig = get_schedule("flow", 5, flow)
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)) * float(sig[0])
    lo = sample(GM, (2000, 2), flow, name, sigmas=sig, x_init=x0).samples
    hi = sample(GM, (2000, 2), flow, name, sigmas=sig, x_init=x0.double(), dtype=torch.float64).samples
    assert lo.dtype == torch.float32 and float((lo.double() - hi).abs().max()) < 1e-3


def test_sample_follows_a_float64_model_and_takes_x_init_alone():
    net = torch.nn.Linear(2, 2).double()

    def model(x, sigma, cond=None):
        return net(x) * 0 + x / (1 + sigma[:, None] ** 2)  # the denoiser of N(0, I) data, through float64 weights

    model.parameters = net.parameters  # a callable that owns float64 parameters
    r = sample(model, (4, 2), EDMProcess(), "heun", steps=3, seed=0)
    assert r.samples.dtype == torch.float64
    x = EDMProcess().sample_prior((4, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    r2 = sample(GM, process=EDMProcess(), sampler="euler", steps=3, x_init=x)
    assert r2.samples.shape == (4, 2) and r2.samples.dtype == torch.float64
    with pytest.raises(TypeError, match="batch shape"):
        sample(GM, process=EDMProcess())
    with pytest.raises(TypeError, match="process"):
        sample(GM, (4, 2))


def test_adaptive_with_one_step_and_a_plain_function_get_clear_answers():
    r = sample(GM, (64, 2), EDMProcess(), "adaptive", steps=1, seed=0)
    assert torch.isfinite(r.samples).all() and len(r.sigmas) == 3  # σ_max, σ_min, 0
    from sdeflow.sampling.ode import adaptive_ode

    with pytest.raises(ValueError, match="two positive σ"):
        adaptive_ode(GM, torch.zeros(2, 2), torch.tensor([80.0, 0.0]))

    def two_args(x, sigma):
        return x

    with pytest.raises(TypeError, match=r"cannot be called as D\(x, sigma, cond\)"):
        sample(two_args, (4, 2), EDMProcess(), "euler", steps=2, seed=0)


def test_cuda_graph_sampler_refuses_what_it_cannot_capture():
    from sdeflow import CUDAGraphSampler, EDMProcess, GaussianMixture

    gm = GaussianMixture.grid_2d(2, 1.0, 0.1)
    with pytest.raises(ValueError, match="sampler 'adaptive' chooses its steps on the host"):
        CUDAGraphSampler(gm, EDMProcess(), "adaptive")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        CUDAGraphSampler(gm, EDMProcess(), "heun", steps=4)((8, 2), device="cpu")
