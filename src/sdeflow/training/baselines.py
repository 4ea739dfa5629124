"""The non-diffusion generative baselines as objectives on the same loop: a GAN and a normalizing flow.

- :class:`GANObjective`: DCGAN (Radford et al. 2016) with the non-saturating loss (Goodfellow et al. 2014) or a
  WGAN-GP critic (Gulrajani et al. 2017, Alg. 1 with one critic step per generator step): phase "disc" then
  phase "gen" in every optimizer step, each on its own optimizer.
- :class:`FlowObjective`: maximum likelihood of uniformly dequantised data under a multi-scale flow
  (:class:`~sdeflow.models.flows.Flow`), the loss being bits per dimension as the papers report it
  (Theis et al. 2016; Dinh et al. 2016, §4.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ExperimentConfig
from ..models.flows import Flow
from ..models.gan import DCGANDiscriminator, DCGANGenerator
from ..sampling.likelihood import bits_per_dim
from .adversarial import discriminator_loss, generator_loss, gradient_penalty
from .autoencoder import dequantize_batch
from .ema import EMA
from .objective import Objective
from .stream import Batch

__all__ = ["FlowObjective", "GANObjective"]


def _ema(cfg: ExperimentConfig, net: nn.Module) -> EMA | None:
    e = cfg.train.ema
    return EMA(net, e.kind, e.decay, e.std, e.start_step) if e.kind != "none" else None


class GANObjective(Objective):
    """Generator G(z), z ~ N(0, I), against a discriminator (or WGAN critic) D."""

    name = "gan"
    phases = ("disc", "gen")

    def __init__(self, cfg: ExperimentConfig, data_shape: tuple[int, ...]):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"the DCGAN needs image data (C, H, W), got shape {tuple(data_shape)}")
        g = self.g = cfg.gan
        self.data_shape = tuple(data_shape)
        self.nets = nn.ModuleDict(
            {
                "generator": DCGANGenerator(self.data_shape, g.z_dim, g.width),  # type: ignore[arg-type]
                "discriminator": DCGANDiscriminator(self.data_shape, g.width, g.critic_norm),  # type: ignore[arg-type]
            }
        )
        self.ema = _ema(cfg, self.nets["generator"])
        self.distribute(lambda m: m)

    def parameters_for(self, phase: str) -> list[nn.Parameter]:
        return list(self.nets["discriminator" if phase == "disc" else "generator"].parameters())

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        object.__setattr__(self, "run_g", wrap(self.nets["generator"]))
        object.__setattr__(self, "run_d", wrap(self.nets["discriminator"]))

    def loss(self, batch: Batch, phase: str) -> Tensor:
        z = batch.randn(self.g.z_dim).to(batch.x.dtype)
        if phase == "gen":
            return generator_loss(self.g.loss, self.run_d(self.run_g(z)))
        fake = self.run_g(z).detach()
        loss = discriminator_loss(self.g.loss, self.run_d(batch.x), self.run_d(fake))
        if self.g.loss == "wgan_gp":
            loss = loss + self.g.gp_weight * gradient_penalty(self.run_d, batch.x, fake, batch.rand())
        return loss

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.nets["generator"], step)

    def saved_modules(self) -> tuple[nn.Module, nn.Module | None]:
        return self.nets, (self.ema.model if self.ema is not None else None)

    @torch.no_grad()
    def generate(self, n: int, seed: int) -> tuple[Tensor, Tensor | None]:
        """G(z) for n draws z ~ N(0, I) (the EMA generator, BatchNorm on its running statistics)."""
        g = (self.ema.model if self.ema is not None else self.nets["generator"]).eval()
        device = next(g.parameters()).device
        z = torch.randn((n, self.g.z_dim), generator=torch.Generator(device).manual_seed(seed), device=device)
        out = g(z)
        self.nets["generator"].train()
        return out, None


class FlowObjective(Objective):
    """−log₂ p(x̃)/D + log₂((L − 1)/2) for dequantised x̃ (bits per dimension of the L-level data)."""

    name = "flow"

    def __init__(self, cfg: ExperimentConfig, data_shape: tuple[int, ...]):
        super().__init__()
        f = self.f = cfg.flow
        if len(data_shape) != 3:
            raise ValueError(f"the flow needs image data (C, H, W), got shape {tuple(data_shape)}")
        self.data_shape = tuple(data_shape)
        self.flow = Flow(self.data_shape, f.levels, f.steps, f.hidden, f.coupling, f.mask, f.glow)  # type: ignore[arg-type]
        self.ema = _ema(cfg, self.flow)
        self.distribute(lambda m: m)

    def parameters_for(self, phase: str) -> list[nn.Parameter]:
        return list(self.flow.parameters())

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        object.__setattr__(self, "run_flow", wrap(self.flow))

    def bits_per_dim(self, flow: Callable, x: Tensor, noise: Tensor) -> Tensor:
        levels = self.f.quantization_levels
        log_prob = Flow.log_prob_of(*flow(dequantize_batch(x, noise, levels)))
        return bits_per_dim(log_prob, math.prod(self.data_shape), levels)

    def loss(self, batch: Batch, phase: str) -> Tensor:
        return self.bits_per_dim(self.run_flow, batch.x, batch.rand(*self.data_shape)).mean()

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.flow, step)

    def saved_modules(self) -> tuple[nn.Module, nn.Module | None]:
        return self.flow, (self.ema.model if self.ema is not None else None)

    def sampling_flow(self) -> Flow:
        return (self.ema.model if self.ema is not None else self.flow).eval()  # type: ignore[return-value]

    @torch.no_grad()
    def generate(self, n: int, seed: int) -> tuple[Tensor, Tensor | None]:
        flow = self.sampling_flow()
        device = next(flow.parameters()).device
        out = flow.sample(n, self.f.temperature, torch.Generator(device).manual_seed(seed)).clamp(-1, 1)
        self.flow.train()
        return out, None

    @torch.no_grad()
    def evaluate(
        self, x: Tensor, labels: Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Exact bits/dim of ``x`` (one uniform dequantisation drawn from ``generator``); ``labels`` unused."""
        g = generator or torch.Generator(x.device).manual_seed(0)
        noise = torch.rand(x.shape, generator=g, device=x.device)
        bpd = self.bits_per_dim(self.sampling_flow(), x, noise)
        self.flow.train()
        return {"bits_per_dim": float(bpd.mean()), "bits_per_dim_se": float(bpd.std() / math.sqrt(len(bpd)))}
