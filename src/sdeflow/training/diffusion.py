"""Denoising score matching as an objective: L = E_σ E_{x0,ε} [λ(σ) ‖D(x0 + σε; σ) − x0‖²]
(Karras et al. 2022, eq. 2 and 8) with the recipe's σ-distribution and weighting; in latent diffusion x0 = c·z with
z ~ q(z|x) of a frozen autoencoder and c its scaling factor (Rombach et al. 2022, §3.3 and appendix G)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..builders import build_denoiser, build_network, build_recipe
from ..config import ExperimentConfig
from ..core.losses import Recipe, denoising_loss
from ..core.preconditioning import Denoiser
from ..models.autoencoder import Autoencoder, AutoencoderKL
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
        data_shape: the shape the network sees (the latent shape in latent diffusion).
        autoencoder: latent diffusion's frozen autoencoder; batches hold images, or their posterior moments when
            ``cached`` (see :mod:`~sdeflow.training.latents`).
    """

    name = "diffusion"
    phases = ("model",)

    def __init__(
        self,
        net: nn.Module,
        recipe: Recipe,
        cfg: ExperimentConfig,
        data_shape: tuple[int, ...],
        autoencoder: Autoencoder | None = None,
        cached: bool = False,
    ):
        super().__init__()
        self.net, self.recipe, self.cfg, self.data_shape = net, recipe, cfg, tuple(data_shape)
        self.autoencoder, self.cached = autoencoder, cached
        if autoencoder is not None:  # frozen: its fingerprint and scaling factor are fixed for the run
            autoencoder.eval().requires_grad_(False)
            self._ae_meta = {"autoencoder_fingerprint": autoencoder.fingerprint(),
                             "latent_scale": autoencoder.scaling_factor}  # fmt: skip
        e = cfg.train.ema
        self.ema = EMA(net, e.kind, e.decay, e.std, e.start_step) if e.kind != "none" else None
        self.distribute(lambda m: m)

    @classmethod
    def from_config(
        cls, cfg: ExperimentConfig, data_shape: tuple[int, ...], autoencoder: Autoencoder | None = None,
        cached: bool = False,
    ) -> DiffusionObjective:  # fmt: skip
        net = build_network(cfg.model, data_shape)
        return cls(net, build_recipe(cfg.diffusion), cfg, data_shape, autoencoder, cached)

    def clean_data(self, batch: Batch) -> Tensor:
        """x0: the batch's images, or c·z with z = μ + σ·ε from their posterior (ε drawn from the batch)."""
        ae = self.autoencoder
        if ae is None:
            return batch.x
        with torch.no_grad(), torch.autocast(batch.x.device.type, enabled=False):
            moments = batch.x if self.cached else ae.moments(batch.x)
            noise = batch.randn(*self.data_shape).to(moments.dtype) if isinstance(ae, AutoencoderKL) else None
            return ae.latent(moments, noise) * self._ae_meta["latent_scale"]  # a float: no GPU sync per step

    def train(self, mode: bool = True) -> DiffusionObjective:
        super().train(mode)
        if self.autoencoder is not None:  # frozen: always in eval mode
            self.autoencoder.eval()
        return self

    def meta(self) -> dict:
        if self.autoencoder is None:
            return {}
        return dict(self._ae_meta)

    def parameters_for(self, phase: str) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        # a plain attribute, not a submodule: the wrapped forward must not enter state dicts or .to() twice
        object.__setattr__(self, "denoiser", build_denoiser(wrap(self.net), self.recipe, self.cfg.diffusion, False))

    def loss(self, batch: Batch, phase: str) -> Tensor:
        x0 = self.clean_data(batch)
        sigma = self.recipe.sample_sigma(batch.global_size, batch.generator, batch.x.device)[batch.rows]
        noise = batch.randn(*x0.shape[1:]).to(x0.dtype)
        weight = self.recipe.weight(sigma)
        return denoising_loss(self.denoiser, x0, sigma, weight, noise=noise, cond=batch.labels).mean()

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
        if self.autoencoder is not None:
            return self.autoencoder.decode(res.samples / self.autoencoder.scaling_factor).clamp(-1, 1), labels
        return res.samples, labels
