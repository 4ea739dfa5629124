"""The Gaussian-mixture oracle against closed forms on two 1-D components: density, posterior (with and without a
class), denoiser, posterior variance and score at a noise level, and the 2-D grid's layout."""

import math

import pytest
import torch

from sdeflow import GaussianMixture

F64 = torch.float64
MU, S, W = (-1.0, 2.0), (0.5, 1.0), (0.25, 0.75)


def normal(x, m, v):
    return math.exp(-((x - m) ** 2) / (2 * v)) / math.sqrt(2 * math.pi * v)


def hand(x, sigma, ks=(0, 1)):
    """Each component's marginal is N(μ_k, s_k² + σ²); its posterior mean μ_k + s_k²/(s_k² + σ²)(x − μ_k) and
    variance s_k² σ²/(s_k² + σ²)."""
    p = [W[k] * normal(x, MU[k], S[k] ** 2 + sigma**2) if k in ks else 0.0 for k in (0, 1)]
    r = [q / sum(p) for q in p]
    m = [MU[k] + S[k] ** 2 / (S[k] ** 2 + sigma**2) * (x - MU[k]) for k in (0, 1)]
    v = [S[k] ** 2 * sigma**2 / (S[k] ** 2 + sigma**2) for k in (0, 1)]
    d = sum(r[k] * m[k] for k in (0, 1))
    var = sum(r[k] * (v[k] + m[k] ** 2) for k in (0, 1)) - d**2
    return math.log(sum(p) / sum(W[k] for k in ks)), r, d, var


GM = GaussianMixture(torch.tensor([[MU[0]], [MU[1]]]), torch.tensor(S), torch.tensor([1.0, 3.0]), torch.tensor([0, 1]))


@pytest.mark.parametrize("sigma", [0.3, 1.5])
def test_mixture_quantities_in_closed_form(sigma):
    x = torch.tensor([[0.4], [-2.0]], dtype=F64)
    for i, xi in enumerate((0.4, -2.0)):
        logp, r, d, var = hand(xi, sigma)
        assert float(GM.log_prob(x, sigma)[i]) == pytest.approx(logp, rel=1e-12)
        assert GM.posterior(x, sigma)[i].tolist() == pytest.approx(r, rel=1e-10)
        assert float(GM.denoise(x, sigma)[i, 0]) == pytest.approx(d, rel=1e-12)
        assert float(GM.posterior_variance(x, sigma)[i]) == pytest.approx(var, rel=1e-10)
        assert float(GM.score(x.float(), sigma)[i, 0]) == pytest.approx((d - xi) / sigma**2, rel=1e-6)
        logp1, r1, d1, var1 = hand(xi, sigma, ks=(1,))  # given class 1: component 1 alone
        cond = torch.tensor([1, 1])
        assert float(GM.log_prob(x, sigma, cond)[i]) == pytest.approx(logp1, rel=1e-12)
        assert GM.posterior(x, sigma, cond)[i].tolist() == pytest.approx(r1, abs=1e-12)
        assert float(GM.posterior_variance(x, sigma, cond)[i]) == pytest.approx(var1, rel=1e-10)
        assert float(GM.denoise(x, sigma, cond)[i, 0]) == pytest.approx(d1, rel=1e-12)
        assert GM.class_log_prob(x, sigma)[i].exp().tolist() == pytest.approx(r, rel=1e-10)
    assert GM.score(x.float(), sigma).dtype == F64


def test_log_prob_defaults_to_the_clean_density():
    logp, *_ = hand(0.4, 0.0)
    assert float(GM.log_prob(torch.tensor([[0.4]], dtype=F64))) == pytest.approx(logp, rel=1e-12)


def test_grid_2d_layout():
    g = GaussianMixture.grid_2d()
    assert g.means.tolist() == [[a, b] for a in (-1.0, 0.0, 1.0) for b in (-1.0, 0.0, 1.0)]
    assert torch.allclose(g.vars, torch.full((9, 2), 0.01, dtype=F64))
    wide = GaussianMixture.grid_2d(n=4, spacing=2.0, std=0.5)
    assert sorted({v for m in wide.means.tolist() for v in m}) == [-3.0, -1.0, 1.0, 3.0]
    assert float(wide.vars[0, 0]) == 0.25


def test_moving_keeps_every_parameter():
    moved = GaussianMixture(torch.tensor([[MU[0]], [MU[1]]]), torch.tensor(S), torch.tensor([1.0, 3.0]),
                            torch.tensor([0, 1])).to("cpu")  # fmt: skip
    for name in ("means", "vars", "log_weights", "labels"):
        assert torch.equal(getattr(moved, name), getattr(GM, name)), name
    x = torch.tensor([[0.4]], dtype=F64)
    assert float(moved.log_prob(x, 0.3)) == float(GM.log_prob(x, 0.3))


def test_random_mixture_recipe_by_hand():
    """means = spread · N(0, I), diagonal stds std·2^{2u−1} with u ~ U[0, 1), weights ½ + U[0, 1), labels k mod C,
    all drawn in that order from a generator seeded ``seed``."""
    g = torch.Generator().manual_seed(4)
    means = torch.randn(5, 2, 3, generator=g, dtype=F64) * 2.0
    stds = 0.3 * torch.exp((2 * torch.rand(5, 2, 3, generator=g, dtype=F64) - 1) * math.log(2))
    weights = 0.5 + torch.rand(5, generator=g, dtype=F64)
    gm = GaussianMixture.random(5, (2, 3), std=0.3, spread=2.0, num_classes=2, diagonal=True, seed=4)
    torch.testing.assert_close(gm.means, means.reshape(5, 6), rtol=0, atol=0)
    torch.testing.assert_close(gm.vars, stds.reshape(5, 6) ** 2)
    torch.testing.assert_close(gm.log_weights, torch.log(weights / weights.sum()))
    assert gm.labels.tolist() == [0, 1, 0, 1, 0] and gm.num_classes == 2 and not gm.isotropic
    g = torch.Generator().manual_seed(0)  # defaults: std 0.1, spread 1, isotropic, one class per component, seed 0
    means = torch.randn(3, 2, generator=g, dtype=F64)
    weights = 0.5 + torch.rand(3, generator=g, dtype=F64)
    plain = GaussianMixture.random(3, 2)
    torch.testing.assert_close(plain.means, means, rtol=0, atol=0)
    torch.testing.assert_close(plain.vars, torch.full((3, 2), 0.01, dtype=F64))
    torch.testing.assert_close(plain.log_weights, torch.log(weights / weights.sum()))
    assert plain.labels.tolist() == [0, 1, 2] and plain.isotropic


def test_sampling_by_hand():
    """k ~ Categorical(w) (with replacement), then x = μ_k + s_k ε, both from the generator."""
    g = torch.Generator().manual_seed(8)
    k = torch.multinomial(GM.log_weights.exp().expand(10, 2), 1, replacement=True, generator=g).squeeze(1)
    eps = torch.randn(10, 1, generator=g, dtype=F64)
    x, labels = GM.sample(10, torch.Generator().manual_seed(8))
    torch.testing.assert_close(x, GM.means[k] + GM.vars[k].sqrt() * eps, rtol=0, atol=0)
    assert torch.equal(labels, GM.labels[k])


def test_constructor_checks_and_defaults():
    even = GaussianMixture(torch.zeros(4, 2), 1.0)
    torch.testing.assert_close(even.log_weights, torch.full((4,), math.log(0.25), dtype=F64))
    assert even.labels.tolist() == [0, 1, 2, 3] and even.num_classes == 4 and even.isotropic
    assert GaussianMixture(torch.zeros(2, 1), 1.0, torch.tensor([0.0, 1.0])).log_weights[1] == 0.0  # a zero weight
    assert GaussianMixture(torch.zeros(3, 1), 1.0, labels=[0, 2, 2]).num_classes == 3
    bad = [
        ({"means": torch.zeros(3)}, r"^means must have shape \(K, \*event_shape\), got \(3,\)$"),
        ({"stds": torch.tensor([1.0, 0.0])}, "^stds must be positive$"),
        ({"weights": torch.tensor([1.0, -0.5])}, "^weights must be 2 non-negative numbers with a positive sum$"),
        ({"weights": torch.tensor([0.0, 0.0])}, "^weights must be 2 non-negative numbers with a positive sum$"),
        ({"labels": torch.tensor([0, 1, 1])}, r"^labels must have shape \(2,\)$"),
    ]
    for change, message in bad:
        kwargs = {"means": torch.zeros(2, 1), "stds": 1.0, **change}
        with pytest.raises(ValueError, match=message):
            GaussianMixture(**kwargs)
    x = torch.zeros(2, 1, dtype=F64)
    with pytest.raises(ValueError, match=r"^cond must have shape \(2,\), got \(3,\)$"):
        GM.log_prob(x, 0.1, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="class"):
        GM.log_prob(x, 0.1, torch.tensor([0, 2]))  # classes are 0 and 1
    with pytest.raises(ValueError, match=r"^sigma must be a scalar or of shape \(2,\), got \(3,\)$"):
        GM.log_prob(x, torch.ones(3))
    with pytest.raises(ValueError, match="^sigma must be non-negative$"):
        GM.log_prob(x, -1.0)


def test_labels_classes_and_input_shapes_are_checked_by_name():
    assert GaussianMixture(torch.zeros(2, 1), 1.0, labels=[0.0, 1.0]).labels.dtype == torch.long
    with pytest.raises(ValueError, match="class"):  # below the null label −1
        GM.log_prob(torch.zeros(2, 1, dtype=F64), 0.1, torch.tensor([0, -2]))
    image = GaussianMixture(torch.zeros(2, 2, 3), 1.0)
    with pytest.raises(ValueError, match=r"^expected inputs of shape \(B, 2, 3\), got \(4, 5\)$"):
        image.log_prob(torch.zeros(4, 5))
