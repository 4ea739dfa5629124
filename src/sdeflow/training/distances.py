"""Per-sample distances d(a, b) for distillation and consistency losses (``fewstep.distance``).

- ``l2``: mean squared difference over the dimensions.
- ``pseudo_huber``: √(‖a − b‖² + c²) − c with c = 0.00054·√dim (Song & Dhariwal 2023, §3.3): quadratic for
  small errors, linear for large ones, so outliers weigh less than under l2; no perceptual network needed.
- ``perceptual``: the LPIPS-style distance on the FID Inception's activations (the network we have offline),
  plus l2, which keeps the colours the features do not see.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..config import ConfigError

__all__ = ["build_distance", "pseudo_huber"]


def squared(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).float().square().flatten(1).mean(1)


def pseudo_huber(a: Tensor, b: Tensor) -> Tensor:
    """√(‖a − b‖² + c²) − c, c = 0.00054·√d, per sample."""
    c = 0.00054 * a[0].numel() ** 0.5
    return ((a - b).float().square().flatten(1).sum(1) + c**2).sqrt() - c


def build_distance(name: str, resolution: int = 224) -> Callable[[Tensor, Tensor], Tensor]:
    """The distance ``fewstep.distance`` names; ``resolution``: the size images are resized to for Inception."""
    if name == "l2":
        return squared
    if name == "pseudo_huber":
        return pseudo_huber
    if name != "perceptual":
        raise ConfigError(f"unknown fewstep.distance '{name}'; choose l2, pseudo_huber or perceptual")
    from ..evaluation.inception import load_fid_inception
    from .adversarial import PerceptualLoss

    try:
        perceptual = PerceptualLoss(load_fid_inception(), size=resolution)
    except (OSError, ValueError) as e:
        raise ConfigError(f"fewstep.distance perceptual needs the FID Inception weights: {e}") from None

    def distance(a: Tensor, b: Tensor) -> Tensor:
        if a.shape[1] == 1:  # grey images: Inception reads three channels
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        perceptual.features.to(a.device)
        return perceptual(a.float(), b.float()) + squared(a, b)

    return distance
