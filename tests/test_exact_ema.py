"""EMA against hand computations: its defaults, its checks, and the power profile counted from start_step."""

import math

import pytest
import torch
from torch import nn

from sdeflow.training.ema import EMA, power_exponent


def one_weight(value: float) -> nn.Linear:
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(value)
    return net


def test_defaults_are_a_fixed_decay_of_0_999():
    net = one_weight(1.0)
    ema = EMA(net)
    assert (ema.kind, ema.decay, ema.start_step) == ("fixed", 0.999, 0)
    with torch.no_grad():
        net.weight.fill_(2.0)
    ema.update(net, 1)
    assert float(ema.model.weight) == pytest.approx(0.999 * 1 + 0.001 * 2, rel=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())  # the average is never trained


def test_power_default_std_is_edm2s_0_05():
    assert EMA(one_weight(0.0), "power").gamma == pytest.approx(power_exponent(0.05), rel=1e-12)
    g = power_exponent(0.05)  # σ_rel² = (γ+1)/((γ+2)²(γ+3))
    assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(0.05, rel=1e-9)


def test_power_profile_counts_steps_from_start_step():
    """With start_step = 2, step 2 + t is the profile's step t: β = 0 up to step 3 (t ≤ 1), then (1 − 1/t)^{γ+1}."""
    ema = EMA(one_weight(0.0), "power", std=math.sqrt(2 / 36), start_step=2)  # γ = 1
    assert [ema.beta(k) for k in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert ema.beta(4) == pytest.approx(0.25) and ema.beta(5) == pytest.approx((2 / 3) ** 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "karras"}, "unknown EMA kind 'karras'; choose 'fixed' or 'power'"),
        ({"decay": 1.0}, r"EMA decay must lie in \[0, 1\), got 1.0"),
        ({"decay": -0.1}, r"EMA decay must lie in \[0, 1\), got -0.1"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        EMA(one_weight(0.0), **kwargs)


def test_edge_decays_are_accepted():
    assert EMA(one_weight(0.0), decay=0.0).beta(1) == 0.0
    assert EMA(one_weight(0.0), "power", decay=1.5).kind == "power"  # decay belongs to the fixed kind only


def test_buffers_follow_the_model_after_the_ema_is_moved():
    """``.to()`` replaces buffer tensors: the EMA's copies of the model's buffers must land in the moved ones (a
    stale list would update the old tensors, and a CUDA-graph capture would copy across devices)."""
    net = torch.nn.BatchNorm1d(3)
    ema = EMA(net, "fixed", decay=0.5)
    net.double()
    ema.double()
    net.running_mean.fill_(2.0)
    ema.update(net, 1)
    assert torch.equal(ema.model.running_mean, net.running_mean)
    assert ema.model.running_mean.dtype == torch.float64
