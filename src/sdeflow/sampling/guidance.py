"""Guidance as denoiser wrappers, so it works with every process, parameterization and sampler.

- Classifier-free guidance (Ho & Salimans 2022):  D_w = D(x; ∅) + w · (D(x; y) − D(x; ∅)),
  computed in one batched forward pass; optionally only for σ in an interval (Kynkäänniemi et al. 2024).
  Because every target is affine in D, guiding D is the same as guiding ε, v or the velocity.
- ControlNet over a σ interval (:class:`ControlInterval`): the control images act only where σ lies in [σ_lo, σ_hi]
  (high σ: the layout; switching control off at low σ leaves the details to the base).
- Classifier guidance (Dhariwal & Nichol 2021, Song et al. 2021): the score gains s·∇_x̃ log p(y | x̃; σ),
  i.e. D_s = D(x; ∅) + s σ² ∇_x̃ log p(y | x̃; σ) (using ∇log p(x̃; σ) = (D − x̃)/σ², Karras et al. 2022, eq. 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..core.condition import ControlCondition, TextCondition, cat_conditions, null_condition
from ..core.preconditioning import DenoiserFn, pad_dims

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "ControlInterval", "train_noisy_classifier"]


class ClassifierFreeGuidance:
    """``D_w(x, σ, y) = D(x, σ, ∅) + w (D(x, σ, y) − D(x, σ, ∅))``; w = 1: conditional, w = 0: unconditional.

    Args:
        denoiser: a conditional denoiser that treats label -1 as "no label".
        weight: the guidance weight w.
        interval: (σ_lo, σ_hi): guide only there, elsewhere return the conditional D (Kynkäänniemi et al. 2024).
        null: the condition ∅ stands for (one row or a batch): for text, the encoded empty prompt, or a negative
            prompt (guidance then pushes away from it); default for class labels: the null label -1.
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        weight: float,
        interval: tuple[float, float] | None = None,
        null: Tensor | TextCondition | None = None,
    ):
        self.denoiser, self.weight, self.interval, self.null = denoiser, weight, interval, null
        if interval is not None and not (len(interval) == 2 and interval[0] < interval[1]):
            raise ValueError(f"the guidance interval must be (σ_lo, σ_hi) with σ_lo < σ_hi, got {interval}")

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | TextCondition | None = None) -> Tensor:
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition (class labels or encoded prompts)")
        b = len(x)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        both_cond = cat_conditions(cond, null_condition(cond, self.null, b))
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both_cond)
        d_cond, d_uncond = both[:b], both[b:]
        w = torch.full((b,), float(self.weight), device=x.device, dtype=x.dtype)
        if self.interval is not None:
            inside = (sigma >= self.interval[0]) & (sigma <= self.interval[1])
            w = torch.where(inside, w, torch.ones_like(w))
        return d_uncond + pad_dims(w, x) * (d_cond - d_uncond)


class ControlInterval:
    """``D(x, σ, ControlCondition(c, images))`` for σ in [σ_lo, σ_hi], ``D(x, σ, c)`` (no control) elsewhere."""

    def __init__(self, denoiser: DenoiserFn, interval: tuple[float, float]):
        if not (len(interval) == 2 and interval[0] < interval[1]):
            raise ValueError(f"the control interval must be (σ_lo, σ_hi) with σ_lo < σ_hi, got {interval}")
        self.denoiser, self.interval = denoiser, interval

    def __call__(self, x: Tensor, sigma: Tensor, cond: object = None) -> Tensor:
        if not isinstance(cond, ControlCondition):
            return self.denoiser(x, sigma, cond)
        s = torch.as_tensor(sigma, device=x.device)
        inside = (s >= self.interval[0]) & (s <= self.interval[1])
        if bool(inside.all()):
            return self.denoiser(x, sigma, cond)
        if not bool(inside.any()):
            return self.denoiser(x, sigma, cond.cond)
        inside = inside.expand(len(x)) if inside.ndim == 0 else inside
        controlled, free = self.denoiser(x, sigma, cond), self.denoiser(x, sigma, cond.cond)
        return torch.where(inside.reshape(-1, *[1] * (x.ndim - 1)), controlled, free)


class ClassifierGuidance:
    """``D_s(x, σ, y) = D(x, σ, ∅) + s σ² ∇_x log p(y | x; σ)`` for a noise-conditional classifier.

    Args:
        denoiser: the (unconditional) denoiser; it is called with ``cond=None``.
        classifier: ``log_probs(x, σ) -> (B, num_classes)`` log p(y | x̃; σ) on σ-space inputs.
        scale: the guidance scale s (1: the exact conditional score for an exact classifier).
    """

    def __init__(self, denoiser: DenoiserFn, classifier: Callable[[Tensor, Tensor], Tensor], scale: float = 1.0):
        self.denoiser, self.classifier, self.scale = denoiser, classifier, scale

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("classifier guidance needs class labels (cond)")
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.expand(len(x)) if sigma.ndim == 0 else sigma
        d = self.denoiser(x, sigma, None)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = self.classifier(xg, sigma).gather(1, cond.long().reshape(-1, 1).to(x.device)).sum()
            (grad,) = torch.autograd.grad(logp, xg)
        return d + (self.scale * pad_dims(sigma, x) ** 2 * grad).to(d.dtype)  # in the denoiser's dtype


def train_noisy_classifier(
    x: Tensor,
    y: Tensor,
    steps: int = 1000,
    batch: int = 256,
    lr: float = 1e-3,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **classifier_kwargs,
):
    """Train a :class:`~sdeflow.models.classifier.NoisyClassifier` on noisy data x̃ = x0 + σ ε with
    ln σ ~ U(ln σ_min, ln σ_max) (every noise level a sampler visits), by cross-entropy on the labels."""
    from ..models.classifier import NoisyClassifier, fit_classifier

    lo, hi = math.log(sigma_min), math.log(sigma_max)

    def noised(xb: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        sigma = torch.exp(lo + (hi - lo) * torch.rand(len(xb), generator=g))
        return xb + pad_dims(sigma, xb) * torch.randn(xb.shape, generator=g), sigma

    clf = NoisyClassifier(tuple(x.shape[1:]), int(y.max()) + 1, **classifier_kwargs)
    return fit_classifier(clf, x, y, steps, batch, lr, seed, device, weight_decay=0.01, inputs=noised)
