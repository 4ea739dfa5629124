"""Autoregressive building blocks: MADE's masks make it exactly autoregressive (autograd Jacobian), its
likelihood is the sum of Bernoulli terms; the discretized logistic mixture is a distribution over the 256 values."""

import math

import numpy as np
import pytest
import torch

from sdeflow.models.autoregressive import MADE, discretized_logistic_mixture_log_prob, made_masks


@pytest.mark.parametrize("num_orders", [1, 3])
def test_made_is_exactly_autoregressive(num_orders):
    torch.manual_seed(0)
    net = MADE(10, hidden=(32, 32), num_orders=num_orders, seed=1)
    for _ in range(num_orders):
        order = net.order
        x = torch.rand(1, 10)
        jac = torch.autograd.functional.jacobian(lambda v: net(v)[0], x)[:, 0, :]  # (out d, in j)
        for d in range(10):
            later = [j for j in range(10) if order[j] >= order[d]]  # inputs at or after d's position
            assert torch.all(jac[d, later] == 0), (d, order)
        assert (jac != 0).sum() > 10  # and it does use the earlier inputs
        first = int(np.argmin(order))
        assert torch.all(jac[first] == 0)  # the first output is a constant
        net.next_order()
    if num_orders > 1:
        assert len({tuple(o) for o in net.orders}) == num_orders


def test_made_masks_by_hand():
    rng = np.random.default_rng(0)
    masks = made_masks(np.array([1, 2, 3]), [4], rng)
    assert masks[0].shape == (4, 3) and masks[1].shape == (3, 4)
    # hidden degrees lie in [1, 2]; output 1 (degree 1) sees no hidden unit
    assert masks[1][0].sum() == 0
    deg = masks[0].sum(1)  # a unit of degree m sees inputs 1..m
    assert torch.all((deg >= 1) & (deg <= 2))
    assert torch.equal(masks[1][2], torch.ones(4))  # output 3 sees every unit of degree ≤ 2


def test_made_log_prob_and_sampling():
    torch.manual_seed(0)
    net = MADE(6, hidden=(16,))
    with torch.no_grad():  # probabilities far from ½, so that a sampler drawing 1 − p would show
        net.layers[-1].bias.copy_(torch.tensor([2.0, -2.0, 1.5, -1.5, 1.0, -1.0]))
    x = (torch.rand(5, 6) < 0.5).float()
    p = torch.sigmoid(net(x))
    want = (x * p.log() + (1 - x) * (1 - p).log()).sum(1)
    assert torch.allclose(net.log_prob(x), want, atol=1e-6)
    # exact normalisation over all 2^6 binary vectors
    allx = torch.tensor([[(i >> j) & 1 for j in range(6)] for i in range(64)], dtype=torch.float32)
    assert math.isclose(float(net.log_prob(allx).detach().exp().sum()), 1.0, rel_tol=1e-5)
    s = net.sample(4000, torch.Generator().manual_seed(0))
    assert set(s.unique().tolist()) <= {0.0, 1.0} and s.shape == (4000, 6)
    freq = torch.stack([(s == v).all(1).float().mean() for v in allx])  # sampling follows p(x)
    assert (freq - net.log_prob(allx).exp()).abs().max() < 0.03
    with pytest.raises(ValueError, match="dim >= 2"):
        MADE(1)


def test_discretized_logistic_mixture_sums_to_one_and_by_hand():
    g = torch.Generator().manual_seed(0)
    values = torch.linspace(-1, 1, 256)
    k = 5
    logit_pi, mean = torch.randn(3, k, generator=g), torch.rand(3, k, generator=g) * 2 - 1
    log_scale = torch.tensor([[-1.0] * k, [-4.0] * k, [-8.0] * k])  # wide, narrow and very narrow logistics
    lp = discretized_logistic_mixture_log_prob(values[:, None].expand(256, 3), logit_pi, mean, log_scale)
    assert torch.allclose(lp.exp().sum(0), torch.ones(3), atol=2e-3)
    assert torch.allclose(lp[:, 0].exp().sum(), torch.tensor(1.0), atol=1e-5)  # wide bins: exact differences
    # one component by hand at an interior value and at both edges
    sig = torch.sigmoid
    m, s, d = 0.1, 0.3, 1 / 255
    one = lambda v: discretized_logistic_mixture_log_prob(  # noqa: E731
        torch.tensor([v]), torch.zeros(1, 1), torch.tensor([[m]]), torch.tensor([[math.log(s)]])
    )
    v = float(values[140])
    assert torch.allclose(one(v).exp(), sig(torch.tensor((v + d - m) / s)) - sig(torch.tensor((v - d - m) / s)))
    assert torch.allclose(one(-1.0).exp(), sig(torch.tensor((-1 + d - m) / s)))
    assert torch.allclose(one(1.0).exp(), 1 - sig(torch.tensor((1 - d - m) / s)))


def test_pixelcnn_is_exactly_autoregressive_without_a_blind_spot():
    from sdeflow.models.autoregressive import PixelCNN

    torch.manual_seed(0)
    net = PixelCNN(channels=8, blocks=2, mixtures=3)
    x = torch.rand(1, 1, 6, 6) * 2 - 1
    jac = torch.autograd.functional.jacobian(lambda v: net(v)[1], x)[0, :, :, :, 0, 0].abs().sum(0)  # (6,6, 6,6)
    for a in range(6):
        for b in range(6):
            seen = jac[a, b] != 0
            later = torch.tensor([[(c, d) >= (a, b) for d in range(6)] for c in range(6)])
            assert not (seen & later).any(), (a, b)  # nothing at or after the pixel in raster order
            assert seen.sum() == a * 6 + b  # and every pixel before it (PixelCNN's blind spot is gone)
    with pytest.raises(ValueError, match="single-channel"):
        net(torch.zeros(1, 3, 4, 4))


def test_pixelcnn_likelihood_is_the_sum_of_its_pixel_mixtures_and_sampling_follows_it():
    from sdeflow.models.autoregressive import PixelCNN

    torch.manual_seed(1)
    net = PixelCNN(channels=8, blocks=1, mixtures=2)
    x = torch.randint(0, 256, (3, 1, 4, 4)).float() / 127.5 - 1
    logit_pi, mean, log_scale = net(x)
    per_pixel = discretized_logistic_mixture_log_prob(
        x[:, 0], logit_pi.movedim(1, -1), mean.movedim(1, -1), log_scale.movedim(1, -1)
    )
    assert torch.allclose(net.log_prob(x), per_pixel.flatten(1).sum(1), atol=1e-4)
    # a 1×1 image: one pixel with a fixed, narrow mixture centred on levels 100 and 180 (s below a bin's width, so
    # that which level a draw is assigned to matters); samples land on the 256 levels with its probabilities
    levels = torch.linspace(-1, 1, 256)
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.copy_(torch.tensor([0.3, -0.3, *torch.atanh(levels[[100, 180]]).tolist(), -6.0, -5.0]))
        probs = net.log_prob(levels.view(256, 1, 1, 1)).exp()
        s = net.sample(20000, 1, torch.Generator().manual_seed(0)).flatten()
    idx = ((s + 1) * 127.5).round().long()
    assert torch.allclose(s, idx.float() / 127.5 - 1)
    freq = torch.bincount(idx, minlength=256).float() / len(s)
    assert 0.5 * (freq - probs).abs().sum() < 0.05  # total variation
