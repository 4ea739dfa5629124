"""The loss parts of adversarial and perceptual training, each a few lines with its paper.

- GAN losses on discriminator logits d: non-saturating (Goodfellow et al. 2014, §3: L_D = softplus(−d_real) +
  softplus(d_fake), L_G = softplus(−d_fake)), hinge (Lim & Ye 2017; VQGAN's: L_D = ½[relu(1 − d_real) +
  relu(1 + d_fake)], L_G = −d_fake) and Wasserstein (Arjovsky et al. 2017: L_D = d_fake − d_real, L_G = −d_fake).
- :func:`gradient_penalty`: WGAN-GP's E[(‖∇_x̂ D(x̂)‖₂ − 1)²] on x̂ = εx + (1 − ε)x̃ (Gulrajani et al. 2017, eq. 3).
- :func:`adaptive_weight`: VQGAN's λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_GAN‖ + δ) at the decoder's last layer G_L
  (Esser et al. 2021, eq. 7), which keeps the adversarial gradient on the scale of the reconstruction gradient.
- :class:`PerceptualLoss`: LPIPS' distance with unit weights (Zhang et al. 2018, eq. 1): channel-normalised
  activations of a fixed network, squared differences averaged over positions and summed over layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GAN_LOSSES",
    "PerceptualLoss",
    "adaptive_weight",
    "discriminator_loss",
    "generator_loss",
    "gradient_penalty",
]

GAN_LOSSES = ("hinge", "non_saturating", "wgan_gp")


def discriminator_loss(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    """The discriminator's loss on the logits of real and generated samples."""
    if kind == "hinge":
        return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    if kind == "non_saturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "wgan_gp":
        return fake.mean() - real.mean()
    raise ValueError(f"unknown GAN loss '{kind}'; choose one of {GAN_LOSSES}")


def generator_loss(kind: str, fake: Tensor) -> Tensor:
    """The generator's loss on the discriminator's logits of its samples."""
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    if kind in ("hinge", "wgan_gp"):
        return -fake.mean()
    raise ValueError(f"unknown GAN loss '{kind}'; choose one of {GAN_LOSSES}")


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, eps: Tensor) -> Tensor:
    """E[(‖∇_x̂ D(x̂)‖₂ − 1)²] at x̂ = ε·real + (1 − ε)·fake, ε of shape (B,) uniform on [0, 1]."""
    e = eps.view(-1, *([1] * (real.ndim - 1))).to(real.dtype)
    mixed = (e * real.detach() + (1 - e) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def adaptive_weight(rec: Tensor, gan: Tensor, last_layer: Tensor, delta: float = 1e-4, cap: float = 1e4) -> Tensor:
    """λ = ‖∇ L_rec‖ / (‖∇ L_GAN‖ + δ) w.r.t. ``last_layer``, clamped to [0, cap] and detached."""
    (g_rec,) = torch.autograd.grad(rec, last_layer, retain_graph=True)
    (g_gan,) = torch.autograd.grad(gan, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_gan.norm() + delta)).clamp(0, cap).detach()


class PerceptualLoss(nn.Module):
    """d(x, y) = Σ_l mean_{h,w} ‖f̂_l(x) − f̂_l(y)‖² with f̂ = f / ‖f‖ over channels, per sample.

    Args:
        features: a frozen network mapping images in [0, 1] to a list of activation maps
            (e.g. :meth:`~sdeflow.evaluation.inception.FIDInceptionV3.feature_maps`, the FID network we have offline).
    """

    def __init__(self, features: nn.Module, method: str = "feature_maps", size: int | None = None):
        super().__init__()
        self.features = features.eval().requires_grad_(False)
        self.method, self.size = method, size

    def train(self, mode: bool = True) -> PerceptualLoss:  # the feature network stays in eval mode
        return self

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Images in [−1, 1]; returns (B,) distances."""
        f = getattr(self.features, self.method)
        args = () if self.size is None else (self.size,)
        fx, fy = f((x + 1) / 2, *args), f((y + 1) / 2, *args)
        return sum((_unit(a) - _unit(b)).square().sum(1).flatten(1).mean(1) for a, b in zip(fx, fy))


def _unit(f: Tensor, eps: float = 1e-10) -> Tensor:
    return f / (f.square().sum(1, keepdim=True).sqrt() + eps)
