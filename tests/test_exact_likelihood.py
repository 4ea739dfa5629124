"""The probability-flow likelihood on a Gaussian, where the ODE is solvable by hand.

Data N(μ, s²) per dimension: D(x̃; σ) = μ + s²/(s² + σ²)(x̃ − μ). In u = ln σ the PF-ODE reads dx̃/du = x̃ − D =
σ²/(s² + σ²)(x̃ − μ), so x̃(σ) − μ = (x̃ − μ)√((s² + σ²)/(s² + σ_min²)), and the integrated divergence is
Δ = Σ_i ε_i² · ½ ln((s² + σ_max²)/(s² + σ_min²)) (ε_i² = 1 for the exact trace and for Rademacher probes).
"""

import math

import pytest
import torch

from sdeflow.sampling.likelihood import log_likelihood

F64 = torch.float64
S2 = 0.25


def gaussian_model(calls):
    def model(x, sigma, cond):
        calls.append(1)
        mu = cond.to(x.dtype)
        return mu + S2 / (S2 + sigma.reshape(-1, 1) ** 2) * (x - mu)

    return model


def by_hand(x, mu, smin, smax, eps_sq):
    half_log = 0.5 * math.log((S2 + smax**2) / (S2 + smin**2))
    x_end = mu + (x - mu) * math.sqrt((S2 + smax**2) / (S2 + smin**2))
    d = x.shape[1]
    prior = -0.5 * (x_end**2).sum(1) / smax**2 - d * (math.log(smax) + 0.5 * math.log(2 * math.pi))
    delta = eps_sq.sum(1) * half_log
    return prior, delta


def check(r, prior, delta, calls):
    torch.testing.assert_close(r.prior_log_prob, prior, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.delta, delta, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.log_prob, r.prior_log_prob + r.delta, rtol=1e-12, atol=0)
    assert r.nfe == len(calls) > 0


def test_exact_divergence_with_the_defaults():
    """Defaults: σ ∈ [0.002, 80], dopri5 at rtol = atol = 1e-5."""
    x, mu, calls = torch.tensor([[0.3, -1.0], [2.0, 0.5]], dtype=F64), torch.tensor([[1.0, 0.0], [-1.0, 2.0]]), []
    r = log_likelihood(gaussian_model(calls), x, cond=mu)
    check(r, *by_hand(x, mu.double(), 0.002, 80.0, torch.ones(2, 2, dtype=F64)), calls)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_probes_drawn_from_the_generator(probe):
    x, mu = torch.tensor([[0.3, -1.0, 0.2], [2.0, 0.5, -0.4]], dtype=F64), torch.zeros(2, 3)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    eps_sq = torch.ones_like(eps) if probe == "rademacher" else eps**2  # the linear model's Jacobian is diagonal
    results = []
    for global_seed in (0, 1):  # the global generator must not matter
        torch.manual_seed(global_seed)
        calls = []
        results.append(log_likelihood(gaussian_model(calls), x, 0.01, 50.0, mu, "hutchinson", probe,
                                      generator=torch.Generator().manual_seed(5)))  # fmt: skip
        check(results[-1], *by_hand(x, mu.double(), 0.01, 50.0, eps_sq), calls)
    torch.testing.assert_close(results[0].log_prob, results[1].log_prob, rtol=0, atol=0)


def test_bad_options_are_named():
    model = gaussian_model([])
    with pytest.raises(ValueError, match="divergence must be 'exact' or 'hutchinson', got 'trace'"):
        log_likelihood(model, torch.zeros(1, 1), divergence="trace")
    with pytest.raises(ValueError, match="probe must be 'rademacher' or 'gaussian', got 'sphere'"):
        log_likelihood(model, torch.zeros(1, 1), divergence="hutchinson", probe="sphere")


def test_solver_tolerances_reach_the_solver():
    """A looser tolerance takes fewer steps (rtol and atol are both handed to dopri5)."""
    x, mu = torch.tensor([[0.3, -1.0]], dtype=F64), torch.zeros(1, 2)
    nfe = {}
    for rtol, atol in ((1e-3, 1e-9), (1e-9, 1e-3), (1e-9, 1e-9)):
        nfe[rtol, atol] = log_likelihood(gaussian_model([]), x, cond=mu, rtol=rtol, atol=atol).nfe
    assert nfe[1e-3, 1e-9] < nfe[1e-9, 1e-9] and nfe[1e-9, 1e-3] < nfe[1e-9, 1e-9]
