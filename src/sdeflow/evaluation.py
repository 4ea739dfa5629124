"""Evaluation: Fréchet distances, a dataset classifier whose features measure quality fast on a CPU.

The Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017):

    FD = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}),

computed in float64 with scipy's matrix square root (the same computation as pytorch-fid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DatasetClassifier", "FeatureStats", "frechet_distance", "train_classifier"]


@dataclass
class FeatureStats:
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


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """FD between two Gaussian fits, float64. A singular product gets ε·I added, as pytorch-fid does."""
    from scipy import linalg

    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"feature statistics of different sizes: {a.mu.shape} vs {b.mu.shape}")
    diff = a.mu - b.mu
    covmean, _ = linalg.sqrtm(a.sigma @ b.sigma, disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(len(a.mu)) * eps
        covmean = linalg.sqrtm((a.sigma + off) @ (b.sigma + off))
    covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


class DatasetClassifier(nn.Module):
    """A small CNN (images) or MLP (vectors) trained on the dataset itself; ``features`` is its penultimate
    layer, used for a fast Fréchet distance and for checking the class of generated samples."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, width: int = 32, feat_dim: int = 64):
        super().__init__()
        self.shape = tuple(shape)
        if len(shape) == 3:
            c = shape[0]
            self.body = nn.Sequential(
                nn.Conv2d(c, width, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.SiLU(),
                nn.AvgPool2d(2) if shape[-1] >= 8 else nn.Identity(),
                nn.Conv2d(width, 2 * width, 3, padding=1),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(4),
                nn.Flatten(),
                nn.Linear(2 * width * 16, feat_dim),
                nn.SiLU(),
            )
        else:
            self.body = nn.Sequential(
                nn.Flatten(), nn.Linear(int(np.prod(shape)), 128), nn.SiLU(), nn.Linear(128, feat_dim), nn.SiLU()
            )
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def batched(self, x: Tensor, fn: str = "features", batch: int = 1024) -> Tensor:
        self.eval()
        dev = next(self.parameters()).device
        return torch.cat([getattr(self, fn)(x[i : i + batch].to(dev)).float().cpu() for i in range(0, len(x), batch)])


def train_classifier(
    x: Tensor, y: Tensor, epochs: int = 15, batch: int = 128, lr: float = 2e-3, seed: int = 0, noise_aug: float = 0.05
) -> DatasetClassifier:
    """Train a :class:`DatasetClassifier` on images/vectors x (N, ...) with labels y (N,)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(y.max()) + 1
    clf = DatasetClassifier(tuple(x.shape[1:]), num_classes)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    n = len(x)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            xb = x[idx] + noise_aug * torch.randn(x[idx].shape, generator=g)
            loss = F.cross_entropy(clf(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf.eval()


def digits_demo_metrics(trainer: Any, n_per_class: int = 100) -> dict[str, float]:
    """For the demo: class-conditional samples → accuracy of a classifier trained on the real digits (is the
    requested digit drawn?) and the classifier-feature Fréchet distance to the real digits."""
    from .sampling import sample

    ds = trainer.dataset
    clf = train_classifier(ds.x, ds.y)
    real_acc = float((clf.batched(ds.x, "forward").argmax(1) == ds.y).float().mean())
    num_classes = trainer.num_classes or 0
    n = n_per_class * max(1, num_classes)
    labels = (torch.arange(n) % num_classes).to(trainer.device) if num_classes else None
    s = trainer.cfg.sample
    res = sample(
        trainer.ema_denoiser(),
        (n, *trainer.data_shape),
        trainer.recipe.process,
        s.sampler,
        s.steps,
        s.schedule,
        cond=labels,
        seed=trainer.cfg.seed + 1,
        device=trainer.device,
    )
    x = res.samples.float().cpu().clamp(-1, 1)
    fd = frechet_distance(FeatureStats.of(clf.batched(x)), FeatureStats.of(clf.batched(ds.x)))
    out = {"classifier_accuracy_on_real": real_acc, "fd_classifier_features": fd, "sample_nfe": res.nfe, "n_samples": n}
    if labels is not None:
        out["class_accuracy_of_samples"] = float((clf.batched(x, "forward").argmax(1) == labels.cpu()).float().mean())
    return out
