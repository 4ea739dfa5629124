"""The exact Gaussian-mixture oracle and the DSM loss written on D."""

import math

import pytest
import torch

from sdeflow import GaussianMixture, denoising_loss, loss_weight, recipe, sample_sigma
from sdeflow.core.losses import RECIPES, SIGMA_SAMPLERS, WEIGHTINGS
from sdeflow.core.process import EDMProcess, FlowProcess, VPDiscreteProcess, VPLinearProcess


@pytest.fixture(params=["isotropic", "diagonal"])
def gm(request):
    return GaussianMixture.random(5, (2, 3), std=0.3, num_classes=2, diagonal=request.param == "diagonal", seed=3)


def test_log_prob_matches_scipy_and_sampling_moments(gm, gen):
    from scipy.stats import multivariate_normal

    x = torch.randn(7, 2, 3, generator=gen, dtype=torch.float64)
    sigma = 0.4
    w = gm.log_weights.exp().numpy()
    ref = sum(
        w[k] * multivariate_normal(gm.means[k].numpy(), (gm.vars[k] + sigma**2).numpy()).pdf(x.reshape(7, 6).numpy())
        for k in range(gm.num_components)
    )
    torch.testing.assert_close(gm.log_prob(x, sigma), torch.log(torch.as_tensor(ref)), rtol=1e-10, atol=1e-10)
    xs, _ = gm.sample(100_000, gen)
    torch.testing.assert_close(xs.mean(0), gm.mean(), atol=0.02, rtol=0)


def test_score_equals_autograd_of_log_density(gm, gen):
    for sigma in (0.01, 0.3, 5.0):
        x = gm.sample(6, gen)[0] + sigma * torch.randn(6, 2, 3, generator=gen, dtype=torch.float64)
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(gm.log_prob(x, sigma).sum(), x)
        torch.testing.assert_close(gm.score(x.detach(), sigma), g, rtol=1e-8, atol=1e-8)
        # conditional too
        y = torch.tensor([0, 1, 1, 0, -1, 1])
        (gy,) = torch.autograd.grad(gm.log_prob(x, sigma, cond=y).sum(), x)
        torch.testing.assert_close(gm.score(x.detach(), sigma, cond=y), gy, rtol=1e-8, atol=1e-8)


def test_single_gaussian_denoiser_is_the_wiener_filter(gen):
    g = GaussianMixture(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 2.0]]))
    x = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    v = torch.tensor([0.25, 4.0], dtype=torch.float64)
    sigma = 0.7
    expected = torch.tensor([1.0, -2.0]) + v / (v + sigma**2) * (x - torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(g.denoise(x, sigma), expected)
    torch.testing.assert_close(g.posterior_variance(x, sigma), (v * sigma**2 / (v + sigma**2)).sum().expand(4))


def test_oracle_minimizes_dsm_loss_and_matches_closed_form(gm, gen):
    """E‖D*(x̃) − x0‖² equals E[tr Cov(x0|x̃)]; any perturbation of D* is strictly worse."""
    n = 100_000
    for sigma_val in (0.2, 1.0):
        x0, _ = gm.sample(n, gen)
        sigma = torch.full((n,), sigma_val, dtype=torch.float64)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        x = x0 + sigma_val * noise
        loss = denoising_loss(gm, x0, sigma, noise=noise) * 6  # mean over dims → sum
        closed = gm.posterior_variance(x, sigma_val)  # exact conditional expectation of the loss
        diff = loss - closed
        assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(n)
        # perturbations: shift, shrink, and a random direction all raise the loss strictly
        for pert in (lambda d, x: d + 0.05, lambda d, x: 0.95 * d, lambda d, x: d + 0.05 * torch.tanh(x)):
            bad = denoising_loss(lambda x, s, c=None, p=pert: p(gm.denoise(x, s), x), x0, sigma, noise=noise) * 6
            gap = bad - loss
            assert float(gap.mean()) > 5 * float(gap.std()) / math.sqrt(n)


def test_conditional_oracle_and_noisy_classifier(gm, gen):
    x, y = gm.sample(2000, gen)
    # at tiny noise the exact classifier recovers the labels of well-separated samples
    logp = gm.class_log_prob(x, 1e-3)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(2000, dtype=torch.float64))
    assert float((logp.argmax(1) == y).double().mean()) > 0.9
    # Bayes: p(x|y) = p(y|x) p(x) / p(y)
    prior = torch.stack([gm.log_weights.exp()[gm.labels == c].sum() for c in range(2)])
    xs = x[:5] + 0.5 * torch.randn(5, 2, 3, generator=gen, dtype=torch.float64)
    for c in range(2):
        lhs = gm.log_prob(xs, 0.5, cond=torch.full((5,), c))
        rhs = gm.class_log_prob(xs, 0.5)[:, c] + gm.log_prob(xs, 0.5) - torch.log(prior[c])
        torch.testing.assert_close(lhs, rhs)
    _cs, cy = gm.sample(50, gen, cond=torch.ones(50, dtype=torch.long))
    assert bool((cy == 1).all())


def test_weightings_equal_target_space_losses(gen):
    """λ(σ)‖D − x0‖² equals the plain MSE in ε, v and velocity space."""
    from sdeflow import convert

    for proc in (FlowProcess(), VPLinearProcess()):
        sigma = torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64)
        x0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        eps = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        x = x0 + sigma[:, None] * eps
        d = x0 + 0.1 * torch.randn(3, 4, generator=gen, dtype=torch.float64)  # an imperfect denoiser
        err_x0 = ((d - x0) ** 2).sum(1)
        for w, target in (("eps", "eps"), ("v", "v"), ("velocity", "velocity"), ("x0", "x0")):
            pred = convert(d, x, sigma, "x0", target, proc)
            true = convert(x0, x, sigma, "x0", target, proc)
            torch.testing.assert_close(loss_weight(w, sigma, proc) * err_x0, ((pred - true) ** 2).sum(1))
        if isinstance(proc, VPLinearProcess):
            torch.testing.assert_close(loss_weight("v", sigma, proc), (1 + sigma**2) / sigma**2)
    torch.testing.assert_close(loss_weight("min_snr", sigma, gamma=5.0), torch.clamp(sigma**-2, max=5.0))
    torch.testing.assert_close(loss_weight("target", sigma, EDMProcess(), "edm"), loss_weight("edm", sigma))


def test_sigma_samplers(gen):
    edm = EDMProcess()
    s = sample_sigma("lognormal", 100_000, edm, gen)
    assert abs(float(s.log().mean()) + 1.2) < 0.02 and abs(float(s.log().std()) - 1.2) < 0.02
    d = sample_sigma("discrete", 1000, VPDiscreteProcess(), gen)
    t = VPDiscreteProcess().t_of_sigma(d.double())
    torch.testing.assert_close(t, t.round(), atol=1e-3, rtol=0)
    f = FlowProcess(shift=3.0)
    tf = f.t_of_sigma(sample_sigma("logit_normal", 100_000, f, gen).double())
    assert float(tf.median()) == pytest.approx(0.75, abs=0.01)  # shift(sigmoid(0)) = 3·0.5/(1+2·0.5)
    for scheme in SIGMA_SAMPLERS:
        if scheme != "discrete":
            assert sample_sigma(scheme, 10, edm, gen).shape == (10,)
    with pytest.raises(ValueError, match="unknown sigma sampling scheme 'beta'"):
        sample_sigma("beta", 3, edm)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weight("snr2", torch.ones(2))
    assert len(WEIGHTINGS) == 8


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_with_oracle(name, gen):
    """Each recipe's loss is finite and the oracle beats a perturbed oracle under it."""
    r = recipe(name)
    gm = GaussianMixture.random(3, 4, std=0.3, seed=0)
    x0 = gm.sample(4096, gen)[0]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    good = r.loss(gm, x0, generator=g1)
    bad = r.loss(lambda x, s, c=None: gm(x, s) + 0.03, x0, generator=g2)
    assert torch.isfinite(good) and float(bad) > float(good)
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("ddim")


def test_mixture_errors():
    with pytest.raises(ValueError, match="stds must"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(3, 3))
    gm = GaussianMixture(torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="expected inputs of shape"):
        gm.denoise(torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match="class labels must lie"):
        gm.denoise(torch.zeros(1, 3), 1.0, cond=torch.tensor([5]))
    with pytest.raises(ValueError, match="sigma must be non-negative"):
        gm.denoise(torch.zeros(1, 3), -1.0)
