"""Classifiers, and the one cross-entropy loop that fits them.

- :class:`NoisyClassifier` p(y | x̃; σ) for classifier guidance (Dhariwal & Nichol 2021, §4). Inputs are
  preconditioned as in EDM (c_in = 1/√(σ² + σ_d²), c_noise = ¼ ln σ), so one classifier serves every process in
  σ-space. Images use the encoder half of the UNet (ADM's classifier); vectors a residual MLP.
- :class:`DatasetClassifier`: a small CNN or MLP trained on the dataset itself, whose penultimate features give a
  fast Fréchet distance on a CPU and check the class of generated samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import NoiseEmbedding
from .unet import UNet

__all__ = ["DatasetClassifier", "NoisyClassifier", "fit_classifier", "train_classifier"]


class NoisyClassifier(nn.Module):
    """``forward(x̃, σ) -> logits`` and ``log_probs(x̃, σ) -> log p(y | x̃; σ)``."""

    def __init__(
        self,
        shape: tuple[int, ...],
        num_classes: int,
        sigma_data: float = 0.5,
        width: int = 128,
        unet: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.shape, self.num_classes, self.sigma_data = tuple(shape), num_classes, sigma_data
        if len(shape) == 3:
            kw = {
                "model_channels": 32,
                "channel_mult": (1, 2),
                "num_blocks": 1,
                "attn_resolutions": (),
                "dropout": 0.0,
                "scale_shift": True,
                **(unet or {}),
            }
            body = UNet(img_resolution=shape[-1], in_channels=shape[0], **kw)
            self.noise_emb, self.enc = body.noise_emb, body.enc  # the encoder half only
            ch = body.enc[list(body.enc)[-1]].conv1.out_channels
            self.head = nn.Sequential(
                nn.GroupNorm(min(32, ch // 4), ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(ch, num_classes),
            )
        else:
            dim = int(torch.tensor(shape).prod())
            self.noise_emb = NoiseEmbedding(width, width)
            self.inp = nn.Linear(dim, width)
            self.mlp = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
            self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(len(x))
        c_in = torch.rsqrt(sigma**2 + self.sigma_data**2).reshape(-1, *([1] * (x.ndim - 1)))
        emb = self.noise_emb(torch.log(sigma) / 4)
        h = (c_in * x).to(emb.dtype)
        if hasattr(self, "enc"):
            e = F.silu(emb)
            for m in self.enc.values():
                h = m(h) if isinstance(m, nn.Conv2d) else m(h, e)
            return self.head(h)
        h = self.inp(h.reshape(len(x), -1)) + emb
        for layer in self.mlp:
            h = h + layer(F.silu(h))
        return self.head(F.silu(h))

    def log_probs(self, x: Tensor, sigma: Tensor) -> Tensor:
        return torch.log_softmax(self(x, sigma), dim=1)


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
                nn.Flatten(), nn.Linear(math.prod(shape), 128), nn.SiLU(), nn.Linear(128, feat_dim), nn.SiLU()
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


def fit_classifier(
    clf: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int,
    batch: int,
    lr: float,
    seed: int = 0,
    device: Any = "cpu",
    weight_decay: float = 0.0,
    inputs: Callable[[Tensor, torch.Generator], tuple[Tensor, ...]] | None = None,
) -> nn.Module:
    """Fit ``clf`` by cross-entropy with AdamW for ``steps`` steps over shuffled epochs of (x, y).

    ``inputs(x_batch, generator)`` turns a batch into the classifier's arguments (noise augmentation, noise
    levels); batches and noise are drawn on the CPU from ``seed``, so the result does not depend on ``device``
    beyond floating-point rounding. Returns ``clf`` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = clf.to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    perm, pos, n = torch.empty(0, dtype=torch.long), 0, len(x)
    for _ in range(steps):
        if pos >= len(perm):
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        args = inputs(x[idx], g) if inputs is not None else (x[idx],)
        loss = F.cross_entropy(clf(*(a.to(device) for a in args)), y[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


def train_classifier(
    x: Tensor,
    y: Tensor,
    epochs: int = 15,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    noise_aug: float = 0.05,
    device: Any = "cpu",
) -> DatasetClassifier:
    """A :class:`DatasetClassifier` fitted to images/vectors x (N, ...) with labels y (N,), with a little Gaussian
    noise as augmentation (generated samples are never exactly on the data)."""
    clf = DatasetClassifier(tuple(x.shape[1:]), int(y.max()) + 1)
    steps = epochs * -(-len(x) // batch)

    def noisy(xb: Tensor, g: torch.Generator) -> tuple[Tensor]:
        return (xb + noise_aug * torch.randn(xb.shape, generator=g),)

    return fit_classifier(clf, x, y, steps, batch, lr, seed, device, weight_decay=1e-4, inputs=noisy)
