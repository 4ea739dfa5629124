"""Denoising score matching as an objective: L = E_σ E_{x0,ε} [λ(σ) ‖D(x0 + σε; σ) − x0‖²]
(Karras et al. 2022, eq. 2 and 8) with the recipe's σ-distribution and weighting."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..builders import build_denoiser, build_network, build_recipe
from ..config import ExperimentConfig
from ..core.losses import Recipe, denoising_loss
from ..core.preconditioning import Denoiser
from ..sampling import sample
from .ema import EMA
from .objective import Objective
from .stream import Batch

__all__ = ["DiffusionObjective"]


class DiffusionObjective(Objective):
    """One network trained by denoising score matching, with an optional EMA copy that sampling uses.

    Args:
        net: the backbone, called as ``net(x, c_noise, cond)``.
        recipe: process, parameterization, σ-distribution and weighting.
        cfg: the experiment (its ``diffusion``, ``train.ema`` and ``sample`` sections).
    """

    name = "diffusion"
    phases = ("model",)

    def __init__(self, net: nn.Module, recipe: Recipe, cfg: ExperimentConfig, data_shape: tuple[int, ...]):
        super().__init__()
        self.net, self.recipe, self.cfg, self.data_shape = net, recipe, cfg, tuple(data_shape)
        e = cfg.train.ema
        self.ema = EMA(net, e.kind, e.decay, e.std, e.start_step) if e.kind != "none" else None
        self.distribute(lambda m: m)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, data_shape: tuple[int, ...]) -> DiffusionObjective:
        return cls(build_network(cfg.model, data_shape), build_recipe(cfg.diffusion), cfg, data_shape)

    def parameters_for(self, phase: str) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        # a plain attribute, not a submodule: the wrapped forward must not enter state dicts or .to() twice
        object.__setattr__(self, "denoiser", build_denoiser(wrap(self.net), self.recipe, self.cfg.diffusion, False))

    def loss(self, batch: Batch, phase: str) -> Tensor:
        sigma = self.recipe.sample_sigma(batch.global_size, batch.generator, batch.x.device)[batch.rows]
        noise = batch.randn_like_x()
        weight = self.recipe.weight(sigma)
        return denoising_loss(self.denoiser, batch.x, sigma, weight, noise=noise, cond=batch.labels).mean()

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.net, step)

    def saved_modules(self) -> tuple[nn.Module, nn.Module | None]:
        return self.net, (self.ema.model if self.ema is not None else None)

    def ema_denoiser(self) -> Denoiser:
        """D of the averaged weights (the raw ones without EMA), in eval mode, σ-range checked."""
        net = self.ema.model if self.ema is not None else self.net
        return build_denoiser(net.eval(), self.recipe, self.cfg.diffusion).eval()

    @torch.no_grad()
    def generate(self, n: int, seed: int) -> tuple[Tensor, Tensor | None]:
        """n samples of the EMA model with the configured sampler; conditional models cycle through the classes."""
        s, k = self.cfg.sample, self.cfg.model.num_classes
        device = next(self.net.parameters()).device
        labels = torch.arange(n, device=device) % k if k else None
        shape = (n, *self.data_shape)
        res = sample(self.ema_denoiser(), shape, self.recipe.process, s.sampler, s.steps, s.schedule,
                     cond=labels, seed=seed, device=device)  # fmt: skip
        self.net.train()
        return res.samples, labels
