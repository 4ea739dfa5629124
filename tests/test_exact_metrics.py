"""Sample-quality metrics against hand computations: MMD² on a few numbers, precision and recall against a brute
force with the ball boundary included, and the Gaussian fit behind the Fréchet distance."""

import math

import numpy as np
import pytest
import torch

from sdeflow.evaluation.metrics import FeatureStats, frechet_distance, mmd2, precision_recall

F64 = torch.float64


@pytest.mark.parametrize("h", [1.0, 3.0])
def test_mmd2_by_hand(h):
    """Unbiased MMD² = mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean k(x_i, y_j), k = exp(−d²/2h²)."""
    x, y = [0.0, 1.0], [0.0, 2.0, 3.0]

    def k(a, b):
        return math.exp(-((a - b) ** 2) / (2 * h * h))

    sxx = sum(k(a, b) for a in x for b in x if a != b) / 2
    syy = sum(k(a, b) for i, a in enumerate(y) for j, b in enumerate(y) if i != j) / 6
    sxy = sum(k(a, b) for a in x for b in y) / 6
    got = mmd2(torch.tensor(x)[:, None], torch.tensor(y)[:, None], *([h] if h != 1.0 else []))
    assert got == pytest.approx(sxx + syy - 2 * sxy, rel=1e-12)


def brute_force(real, fake, k):
    def radius(p, pts):
        return sorted(abs(p - q) for q in pts)[k]  # index k: the point itself comes first

    precision = sum(any(abs(f - r) <= radius(r, real) for r in real) for f in fake) / len(fake)
    recall = sum(any(abs(r - f) <= radius(f, fake) for f in fake) for r in real) / len(real)
    return precision, recall


def test_precision_recall_against_a_brute_force_with_the_boundary_inside():
    """k = 1 on a line: the real ball around 0 has radius 1, so a fake point at −1 lies on its boundary (inside)."""
    real, fake = [0.0, 1.0, 2.0, 3.0, 10.0], [-1.0, 3.5, 20.0, 11.0]
    t = lambda v: torch.tensor(v)[:, None]  # noqa: E731
    assert precision_recall(t(real), t(fake), k=1) == pytest.approx(brute_force(real, fake, 1))
    assert precision_recall(t(real), t(fake), k=1)[0] == 0.75
    real3, fake3 = [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0], [5.0, 7.0, -4.0, 20.0, 6.0]
    assert precision_recall(t(real3), t(fake3)) == pytest.approx(brute_force(real3, fake3, 3))  # default k = 3
    assert brute_force(real3, fake3, 3) != brute_force(real3, fake3, 4)  # the data tell k = 3 from k = 4


def test_precision_counts_every_chunk_of_a_large_set():
    """More than two chunks of 1024 points, all inside: precision is exactly 1."""
    real = torch.arange(0.0, 10.0)[:, None]
    fake = torch.linspace(0.0, 9.0, 2100)[:, None]
    assert precision_recall(real, fake, k=1)[0] == 1.0


def test_feature_stats_by_hand_and_their_round_trip(tmp_path):
    f = torch.tensor([[0.0, 0.0], [2.0, 2.0], [4.0, -2.0]], requires_grad=True)
    st = FeatureStats.of(f)
    assert st.mu.dtype == np.float64 and st.n == 3
    np.testing.assert_allclose(st.mu, [2.0, 0.0])
    np.testing.assert_allclose(st.sigma, [[4.0, -2.0], [-2.0, 4.0]])  # sample covariance, N − 1 = 2
    assert FeatureStats.of(np.ones((2, 3))).n == 2  # two rows are enough for a covariance
    for bad in (np.ones((1, 3)), np.ones(4), np.ones((2, 2, 2))):
        with pytest.raises(ValueError, match=r"features must be \(N >= 2, D\)"):
            FeatureStats.of(bad)
    st.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, st.mu)
    np.testing.assert_array_equal(back.sigma, st.sigma)
    assert back.n == 3


def test_frechet_distance_checks_both_sizes():
    a = FeatureStats(np.zeros(2), np.eye(2), 10)
    assert frechet_distance(a, FeatureStats(np.ones(2), 4 * np.eye(2), 10)) == pytest.approx(2 + 2 + 8 - 2 * 4)
    for b in (FeatureStats(np.zeros(3), np.eye(3), 10), FeatureStats(np.zeros(2), np.eye(3), 10)):
        with pytest.raises(ValueError, match="feature statistics of different sizes"):
            frechet_distance(a, b)


def test_sliced_wasserstein_by_hand():
    """SW₂ = √(mean over projections θ and ranks i of (sort(x·θ)_i − sort(y·θ)_i)²), θ unit columns of a normal
    matrix drawn from ``seed`` (256 of them by default) or from a given generator."""
    from sdeflow.evaluation.metrics import sliced_wasserstein

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64) + 1.0

    def hand(dirs):
        dirs = dirs / dirs.norm(dim=0)
        px, py = (x @ dirs).sort(0).values, (y @ dirs).sort(0).values
        return float(((px - py) ** 2).mean().sqrt())

    draw = lambda seed, k: torch.randn(3, k, generator=torch.Generator().manual_seed(seed), dtype=F64)  # noqa: E731
    assert sliced_wasserstein(x, y) == pytest.approx(hand(draw(0, 256)), rel=1e-12)
    assert sliced_wasserstein(x, y, 16, seed=3) == pytest.approx(hand(draw(3, 16)), rel=1e-12)
    assert sliced_wasserstein(x, y, 16, torch.Generator().manual_seed(7), seed=3) == pytest.approx(
        hand(draw(7, 16)), rel=1e-12)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"^sliced Wasserstein needs sample sets of equal shape, got \(5, 3\), \(4, 3\)"
    ):
        sliced_wasserstein(x, y[:4])


def test_feature_stats_files_are_never_unpickled(tmp_path):
    np.savez(tmp_path / "evil.npz", mu=np.zeros(2), sigma=np.array([{"a": 1}], dtype=object), n=3)
    with pytest.raises(ValueError, match="allow_pickle"):
        FeatureStats.load(tmp_path / "evil.npz")
