"""Distances between sample sets for low-dimensional data and oracle mixtures.

- Sliced Wasserstein-2 (Bonneel et al. 2015): the mean over random unit directions of the exact 1-D
  W2² between the projected empirical distributions (sorted samples), square-rooted.
- MMD² with a Gaussian kernel (Gretton et al. 2012), unbiased U-statistic.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mmd2", "sliced_wasserstein"]


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
