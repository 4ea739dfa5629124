"""Autoregressive building blocks: MADE's masks make it exactly autoregressive (autograd Jacobian), its
likelihood is the sum of Bernoulli terms; the discretized logistic mixture is a distribution over the 256 values."""

import math

import numpy as np
import pytest
import torch

from sdeflow.models.autoregressive import MADE, discretized_logistic_mixture_log_prob, made_masks
from sdeflow.sampling.tokens import sample_codes


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


# --- drawing tokens: temperature, top-k, top-p, guidance on logits ---------------------------------------------


def test_filter_logits_by_hand():
    from sdeflow.sampling.tokens import filter_logits

    inf = float("inf")
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(filter_logits(logits, top_k=2), torch.tensor([[-inf, 3.0, 2.0, -inf]]))
    assert torch.equal(filter_logits(logits, top_k=4), logits)
    # probabilities 0.05, 0.5, 0.3, 0.15 in a shuffled order: the nucleus of mass p is the smallest top set reaching p
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    kept = lambda p: torch.isfinite(filter_logits(probs.log(), top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.8) == [False, True, True, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [False, True, True, True]
    assert kept(0.4) == [False, True, False, False]  # the most likely token always stays
    assert kept(1.0) == [True, True, True, True]
    both = filter_logits(probs.log(), top_k=1, top_p=0.99)
    assert torch.isfinite(both).sum() == 1


def test_guided_logits_and_token_draws_by_hand():
    from sdeflow.sampling.tokens import draw_tokens, guided_logits

    c, u = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 0.5]])
    assert torch.equal(guided_logits(c, u, 1.0), c) and torch.equal(guided_logits(c, u, 0.0), u)
    assert torch.allclose(guided_logits(c, u, 3.0), torch.tensor([[5.0, -4.0]]))  # u + 3 (c − u)
    # temperature 0.5 squares the probabilities: p ∝ (0.1, 0.2, 0.3, 0.4)² = (1, 4, 9, 16) / 30
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(40000, 4)
    tokens = draw_tokens(logits, temperature=0.5, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq, torch.tensor([1.0, 4.0, 9.0, 16.0]) / 30, atol=0.01)
    top2 = draw_tokens(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(top2, minlength=4).float() / len(top2)
    assert torch.allclose(freq, torch.tensor([0.0, 0.0, 3 / 7, 4 / 7]), atol=0.01)  # renormalised over the top 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature must be a number > 0"),
        ({"temperature": -1.0}, "temperature must be a number > 0"),
        ({"temperature": float("nan")}, "temperature must be a number > 0"),
        ({"top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
        ({"top_k": 0}, "top_k must lie in"),
        ({"top_k": 9}, r"top_k must lie in \[1, 8\]"),
    ],
)
def test_vq_transformer_refuses_bad_sampling_settings(kwargs, match):
    from sdeflow.models.vq_transformer import VQTransformer

    net = VQTransformer(8, 4, width=16, depth=1, heads=2)
    with pytest.raises(ValueError, match=match):
        sample_codes(net, 2, **kwargs)


# --- the VQ-Transformer ------------------------------------------------------------------------------------------


def _prior(num_classes=3, vocab=5, seq_len=6):
    from sdeflow.models.vq_transformer import VQTransformer

    torch.manual_seed(0)
    net = VQTransformer(vocab, seq_len, num_classes, width=32, depth=2, heads=4).double().eval()
    with torch.no_grad():  # larger weights than the init's, so that every input visibly moves the logits
        for p in net.parameters():
            p.mul_(8.0) if p.ndim > 1 else None
    return net


def test_vq_transformer_is_causal_and_normalised():
    net = _prior(num_classes=2, vocab=3, seq_len=3)
    codes = torch.tensor([[0, 1, 2]])
    base = net(codes[:, :-1], torch.tensor([1]))
    for j in range(2):  # changing code j moves the logits of codes after j only
        other = codes.clone()
        other[0, j] = (other[0, j] + 1) % 3
        moved = (net(other[:, :-1], torch.tensor([1])) - base).abs().amax(-1)[0]
        assert torch.all(moved[: j + 1] == 0) and torch.all(moved[j + 1 :] > 1e-6), (j, moved)
    assert (net(codes[:, :-1], torch.tensor([0])) - base).abs().amax() > 1e-6  # the class is read
    # exactly normalised: Σ over all 27 sequences of p(s | c) = 1 for each class
    allc = torch.tensor([[a, b, c] for a in range(3) for b in range(3) for c in range(3)])
    for label in (0, 1):
        total = net.log_prob(allc, torch.full((27,), label)).detach().exp().sum()
        assert abs(float(total) - 1) < 1e-12
    # log_prob is the sum of the per-code log-softmax terms
    lp = base.log_softmax(-1)[0]
    assert torch.allclose(net.log_prob(codes, torch.tensor([1])), lp[[0, 1, 2], [0, 1, 2]].sum()[None])


def test_kv_cached_sampling_equals_uncached_token_for_token():
    net = _prior()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    cache = net.step(None, labels, _cache(net, 8))  # the cache's first step equals the full pass's first logits
    assert torch.allclose(cache, net(torch.zeros(8, 0, dtype=torch.long), labels)[:, 0], atol=1e-12)
    for kw in ({}, {"temperature": 0.7, "top_k": 3}, {"top_p": 0.8, "cfg_scale": 2.5}):
        a = sample_codes(net, 8, labels, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
        b = sample_codes(net, 8, labels, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
        assert a.shape == (8, 6) and torch.equal(a, b), kw
        assert a.min() >= 0 and a.max() < 5


def _cache(net, n):
    from sdeflow.models.vq_transformer import KVCache

    return KVCache(len(net.blocks), n, net.heads, net.seq_len, net.width // net.heads, net.head.weight)


def test_cfg_on_logits_at_scale_one_is_the_conditional_model():
    net = _prior()
    labels = torch.tensor([2, 1, 0, 2])
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    guided = sample_codes(net, 4, labels, cfg_scale=1.0, generator=g())
    assert torch.equal(guided, sample_codes(net, 4, labels, cfg_scale=None, generator=g()))
    assert not torch.equal(sample_codes(net, 4, labels, cfg_scale=4.0, generator=g()), guided)
    # the guided draw follows softmax(ℓ_∅ + w (ℓ_c − ℓ_∅)) at the first code: compare with the hand formula
    w, n = 3.0, 30000
    lab = torch.full((n,), 1)
    first = sample_codes(net, n, lab, cfg_scale=w, generator=g(), use_cache=True)[:, 0]
    start = torch.zeros(1, 0, dtype=torch.long)
    lc, lu = net(start, torch.tensor([1]))[0, 0], net(start, torch.tensor([-1]))[0, 0]  # -1: the null label
    want = (lu + w * (lc - lu)).softmax(-1).float()
    freq = torch.bincount(first, minlength=5).float() / n
    assert (freq - want).abs().max() < 0.01
    with pytest.raises(ValueError, match="needs labels"):
        sample_codes(net, 2, None, cfg_scale=2.0)
