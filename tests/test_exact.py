"""Formulas against hand computations: schedules, σ samplers' supports, EMA updates, the batch stream's offsets and
label dropout, loaders' value ranges, noise conditioning per process, and every deterministic solver's order."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from sdeflow import EDMProcess, FlowProcess, GaussianMixture, VEProcess, VPDiscreteProcess, VPLinearProcess
from sdeflow.core.losses import sample_sigma
from sdeflow.core.preconditioning import coefficients
from sdeflow.sampling.samplers import dpmpp_2m, dpmpp_3m, euler, heun, unipc
from sdeflow.sampling.schedules import ddpm_discrete, flow_shifted, karras, log_snr_uniform, uniform_t
from sdeflow.training.ema import EMA, power_exponent
from sdeflow.training.stream import BatchStream

F64 = torch.float64


def test_karras_grid_by_hand():
    """σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ with N = 3, ρ = 2: (9, 4, 1) from 1 to 9, then 0."""
    torch.testing.assert_close(karras(3, 1.0, 9.0, rho=2.0), torch.tensor([9.0, 4.0, 1.0, 0.0], dtype=F64))
    torch.testing.assert_close(karras(1, 0.5, 80.0), torch.tensor([80.0, 0.0], dtype=F64))


def test_log_snr_and_uniform_t_grids_by_hand():
    torch.testing.assert_close(log_snr_uniform(3, 1.0, 100.0), torch.tensor([100.0, 10.0, 1.0, 0.0], dtype=F64))
    edm = EDMProcess(0.5, 10.5)  # σ = t: uniform in t is uniform in σ
    torch.testing.assert_close(uniform_t(3, edm), torch.tensor([10.5, 5.5, 0.5, 0.0], dtype=F64))


def test_discrete_spacings_by_hand():
    """diffusers' spacings for T = 1000, n = 4: leading t = (750, 500, 250, 0) + offset, trailing (999, 749, 499,
    249), linspace round(linspace(0, 999, 4)) reversed = (999, 666, 333, 0)."""
    p = VPDiscreteProcess()

    def steps(spacing, **kw):
        return ddpm_discrete(4, p, spacing, **kw)[:-1]

    for spacing, t in (
        ("leading", [750, 500, 250, 0]),
        ("trailing", [999, 749, 499, 249]),
        ("linspace", [999, 666, 333, 0]),
    ):
        torch.testing.assert_close(steps(spacing), p.sigmas[torch.tensor(t)], msg=spacing)
    torch.testing.assert_close(steps("leading", steps_offset=1), p.sigmas[torch.tensor([751, 501, 251, 1])])
    with pytest.raises(ValueError, match="unknown spacing"):
        ddpm_discrete(4, p, "even")


def test_flow_shifted_grid_by_hand():
    """u = (1, ½) for n = 2, shifted t = 3u/(1 + 2u) = (1 → t_max, 0.75); σ = t/(1 − t)."""
    f = FlowProcess(shift=3.0)
    expected = torch.tensor([f.t_max / (1 - f.t_max), 3.0, 0.0], dtype=F64)
    torch.testing.assert_close(flow_shifted(2, f), expected)


@pytest.mark.parametrize(
    ("scheme", "process"),
    [("uniform_t", VEProcess(0.01, 50.0)), ("log_uniform", VEProcess(0.01, 50.0)), ("discrete", VPDiscreteProcess())],
)
def test_sigma_samplers_cover_their_whole_support(scheme, process):
    """Both ends of the support are reached (within 1 % of the range in log σ) and nothing falls outside it."""
    s = sample_sigma(scheme, 50_000, process, torch.Generator().manual_seed(0)).double().log()
    lo, hi = math.log(process.sigma_min), math.log(process.sigma_max)
    assert float(s.min()) >= lo - 1e-6 and float(s.max()) <= hi + 1e-6
    assert float(s.min()) < lo + 0.01 * (hi - lo) and float(s.max()) > hi - 0.01 * (hi - lo)
    if scheme == "log_uniform":  # ln σ uniform: mean at the middle, variance (hi − lo)²/12
        assert abs(float(s.mean()) - (lo + hi) / 2) < 0.02 * (hi - lo)
        assert abs(float(s.var()) / ((hi - lo) ** 2 / 12) - 1) < 0.02
    if scheme == "uniform_t":  # t uniform on [t_min, t_max]: VE's ln σ is affine in t
        t = (s - math.log(0.01)) / math.log(5000)
        assert abs(float(t.mean()) - (process.t_min + process.t_max) / 2) < 0.01


def test_fixed_ema_by_hand():
    """θ̄ ← β θ̄ + (1 − β) θ on a two-number model; before start_step the average is the weights themselves."""
    net = nn.Linear(1, 1, bias=True)
    with torch.no_grad():
        net.weight.fill_(2.0)
        net.bias.fill_(-1.0)
    ema = EMA(net, "fixed", decay=0.9, start_step=1)
    with torch.no_grad():
        net.weight.fill_(4.0)
        net.bias.fill_(3.0)
    ema.update(net, 1)  # step ≤ start_step: copy
    assert float(ema.model.weight) == 4.0 and float(ema.model.bias) == 3.0
    with torch.no_grad():
        net.weight.fill_(14.0)
        net.bias.fill_(13.0)
    ema.update(net, 2)
    assert float(ema.model.weight) == pytest.approx(0.9 * 4 + 0.1 * 14) and float(ema.model.bias) == pytest.approx(4.0)


def test_power_ema_by_hand():
    """EDM2 (Karras et al. 2024, eq. 2-3): β_t = (1 − 1/t)^{γ+1}; γ from σ_rel = √((γ+1)/((γ+2)²(γ+3))). The
    average weights θ_t by the profile τ^γ integrated over step t, ∝ t^{γ+1} − (t − 1)^{γ+1}: with γ = 1 and
    θ_t = t for t = 1..3, weights (1, 3, 5)/9 and the average (1 + 6 + 15)/9 = 22/9."""
    gamma = power_exponent(math.sqrt(2 / (9 * 4)))  # σ_rel of γ = 1
    assert gamma == pytest.approx(1.0, abs=1e-9)
    net = nn.Linear(1, 1, bias=False)
    ema = EMA(net, "power", std=math.sqrt(2 / 36))
    for t in (1, 2, 3):
        with torch.no_grad():
            net.weight.fill_(float(t))
        ema.update(net, t)
    assert ema.beta(3) == pytest.approx((1 - 1 / 3) ** 2)
    assert float(ema.model.weight) == pytest.approx(22 / 9)


class _Indexed(torch.utils.data.Dataset):
    """Item i is the number i, so a batch shows which samples it holds."""

    def __init__(self, n):
        self.x, self.y = torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n) % 3
        self.num_classes = 3

    def __len__(self):
        return len(self.x)


def test_stream_offsets_under_accumulation_by_hand():
    """Micro-batch m of step s holds samples (s·A + m)·M … (s·A + m + 1)·M − 1 of the stream of epochs, each epoch a
    permutation drawn from (seed, epoch); rank r of W takes rows r·M/W … (r + 1)·M/W − 1."""
    ds = _Indexed(10)
    perm0 = torch.randperm(10, generator=torch.Generator().manual_seed(5 * 1_000_033 + 0))
    perm1 = torch.randperm(10, generator=torch.Generator().manual_seed(5 * 1_000_033 + 1))
    stream = torch.cat([perm0, perm1]).float()
    one = BatchStream(ds, seed=5, micro=4, grad_accum=2, device=torch.device("cpu"))
    # step 1, micro 0: samples 8..11 of the stream (crossing into epoch 1)
    torch.testing.assert_close(one.batch(1, 0).x[:, 0], stream[8:12])
    torch.testing.assert_close(one.batch(0, 1).x[:, 0], stream[4:8])
    rank1 = BatchStream(ds, seed=5, micro=4, grad_accum=2, device=torch.device("cpu"), rank=1, world=2)
    torch.testing.assert_close(rank1.batch(1, 0).x[:, 0], stream[10:12])
    a, b = one.batch(1, 0), rank1.batch(1, 0)
    torch.testing.assert_close(b.randn(3), a.randn(3)[2:])  # the same numbers, whichever rank draws them
    torch.testing.assert_close(b.rand(2), a.rand(2)[2:])


def test_label_dropout_replaces_labels_with_the_null_label_at_its_rate():
    ds = _Indexed(4000)
    s = BatchStream(ds, seed=0, micro=4000, grad_accum=1, device=torch.device("cpu"), num_classes=3, label_dropout=0.25)
    labels = s.batch(0, 0).labels
    dropped = labels == -1
    assert abs(float(dropped.float().mean()) - 0.25) < 0.02
    kept = s.batch(0, 0).x[~dropped, 0].long() % 3
    assert torch.equal(labels[~dropped], kept)
    assert (BatchStream(ds, 0, 4000, 1, torch.device("cpu"), num_classes=3).batch(0, 0).labels >= 0).all()


def test_loaders_map_the_value_range_exactly(tmp_path):
    """Digits hold 0..16 and map to v/8 − 1; 8-bit npz images map 0 → −1, 255 → 1, 51 → −0.6."""
    from sklearn.datasets import load_digits as sk_digits

    from sdeflow.data import load_digits, load_npz

    ds = load_digits()
    raw = torch.as_tensor(sk_digits().images, dtype=torch.float32)
    torch.testing.assert_close(ds.x[:, 0], raw / 8 - 1)
    assert float(ds.x.min()) == -1.0 and float(ds.x.max()) == 1.0 and ds.x.dtype == torch.float32
    np.savez(tmp_path / "a.npz", x=np.array([[[0, 51], [255, 128]]], dtype=np.uint8), y=np.array([1]))
    x = load_npz(tmp_path / "a.npz").x
    torch.testing.assert_close(x[0, 0], torch.tensor([[-1.0, -0.6], [1.0, 128 / 127.5 - 1]]))


@pytest.mark.parametrize(
    ("param", "process", "sigma", "c_noise"),
    [
        ("eps", VPDiscreteProcess(), float(VPDiscreteProcess().sigmas[500]), 500.0),  # DDPM's integer step
        ("eps", VPLinearProcess(), float(VPLinearProcess().sigma(0.5)), 500.0),  # score SDE: 1000·t
        ("velocity", FlowProcess(), 1.0, 500.0),  # flow: σ = 1 at t = ½, 1000·t
        ("score", VEProcess(0.01, 50.0), 0.01 * 5000**0.25, 250.0),  # VE: t = ¼
        ("edm", EDMProcess(), 2.0, math.log(2.0) / 4),  # EDM: ¼ ln σ
    ],
)
def test_noise_conditioning_per_process(param, process, sigma, c_noise):
    c = coefficients(param, torch.tensor([sigma], dtype=F64), process, time_scale=1000.0 if process.t_max <= 1 else 1)
    assert float(c.c_noise) == pytest.approx(c_noise, rel=1e-6)


ORDER_GM = GaussianMixture.grid_2d(3, 1.0, 0.3)
ORDER_X = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 20.0
ORDER_REF = heun(ORDER_GM, ORDER_X, log_snr_uniform(4096, 0.002, 20.0))
ORDER_STEPS = (16, 32, 64, 128)


def _errors(sampler):
    return [
        float((sampler(ORDER_GM, ORDER_X, log_snr_uniform(n, 0.002, 20.0)) - ORDER_REF).norm(dim=1).mean())
        for n in ORDER_STEPS
    ]


@pytest.mark.parametrize(
    ("name", "sampler", "low", "high"),
    [
        ("euler", euler, 1.8, 2.3),  # order 1: error halves
        ("dpmpp_2m", dpmpp_2m, 3.6, 4.6),  # order 2
        ("unipc", unipc, 7.0, 9.0),  # UniP-2 with the UniC corrector: order 3
    ],
)
def test_order_of_convergence(name, sampler, low, high):
    """Error ratios per halving of the step on a uniform log-SNR grid against a 4096-step Heun solution: 2^p for
    order p, bounds set between neighbouring orders."""
    errs = _errors(sampler)
    ratios = [a / b for a, b in itertools.pairwise(errs)]
    print(name, errs, ratios)
    assert all(low < r < high for r in ratios[1:]), (name, errs, ratios)


def test_dpmpp_3m_beats_2m_and_keeps_its_third_order_terms():
    """DPM-Solver++(3M) starts with a first- and a second-order step, so its global order is 2 (ratio → 4); its
    third-order terms make it at least 2.5× more accurate than 2M from 32 steps on (measured 2.8–3.3×)."""
    e3, e2 = _errors(dpmpp_3m), _errors(dpmpp_2m)
    print(e3, e2)
    assert all(a < b / 2.5 for a, b in zip(e3[1:], e2[1:])), (e3, e2)
