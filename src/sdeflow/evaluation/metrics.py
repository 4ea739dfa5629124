"""Distances between sample sets, all in float64.

- Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017):
  FD = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}); FID is FD on Inception features.
- Improved precision and recall (Kynkäänniemi et al. 2019).
- Sliced Wasserstein-2 (Bonneel et al. 2015): the mean over random unit directions of the exact 1-D W2² between
  the projected empirical distributions (sorted samples), square-rooted.
- MMD² with a Gaussian kernel (Gretton et al. 2012), unbiased U-statistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["FeatureStats", "frechet_distance", "mmd2", "precision_recall", "sliced_wasserstein"]


@dataclass
class FeatureStats:
    """Mean and covariance (float64) of a feature set: all a Fréchet distance needs; saved as a plain .npz."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def of(cls, features: Tensor | np.ndarray) -> FeatureStats:
        f = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"features must be (N >= 2, D), got {f.shape}")
        return cls(f.mean(0), np.cov(f, rowvar=False), len(f))

    def save(self, path: Any) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, n=self.n)

    @classmethod
    def load(cls, path: Any) -> FeatureStats:
        with np.load(path, allow_pickle=False) as f:
            return cls(f["mu"], f["sigma"], int(f["n"]))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FD = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a Σ_b)^{1/2} of two Gaussian fits (Heusel et al. 2017), float64.

    tr (Σ_a Σ_b)^{1/2} = tr (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}: two symmetric eigendecompositions instead of the
    general matrix square root (scipy.linalg.sqrtm) that pytorch-fid uses, which gives the same value faster and
    never returns a complex part; rounding-level negative eigenvalues are clipped to 0.
    """
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"feature statistics of different sizes: {a.mu.shape} vs {b.mu.shape}")
    diff = a.mu - b.mu
    w, v = np.linalg.eigh(a.sigma)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ b.sigma @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the manifold of a set is the union of balls
    around its points with radius the distance to their k-th nearest neighbour. Precision: the fraction of fake
    samples inside the real manifold; recall: the fraction of real samples inside the fake manifold."""

    def radii(a: Tensor) -> Tensor:
        d = torch.cdist(a, a)
        return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0

    def inside(points: Tensor, ref: Tensor, r: Tensor) -> float:
        hits = torch.zeros(len(points), dtype=torch.bool)
        for i in range(0, len(points), 1024):
            d = torch.cdist(points[i : i + 1024], ref)
            hits[i : i + 1024] = (d <= r[None]).any(1)
        return float(hits.float().mean())

    real, fake = real.double().cpu(), fake.double().cpu()
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def sliced_wasserstein(
    x: Tensor, y: Tensor, num_projections: int = 256, generator: torch.Generator | None = None, seed: int = 0
) -> float:
    """Sliced W2 between two equally sized sample sets (B, ...); projections are fixed by ``seed``."""
    x, y = _flat(x), _flat(y)
    if x.shape != y.shape:
        raise ValueError(f"sliced Wasserstein needs sample sets of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64).to(x.device)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ dirs, dim=0)
    py, _ = torch.sort(y @ dirs, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def mmd2(x: Tensor, y: Tensor, bandwidth: float = 1.0) -> float:
    """Unbiased MMD² with the Gaussian kernel k(a, b) = exp(−‖a − b‖² / (2 h²))."""
    x, y = _flat(x), _flat(y)

    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-(torch.cdist(a, b) ** 2) / (2 * bandwidth**2))

    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())
