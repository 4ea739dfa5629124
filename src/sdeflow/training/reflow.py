"""Reflow and its distillation (Liu et al. 2022, "Flow Straight and Fast", §2.2–2.3), as an objective.

Given couplings (ε, x) drawn by a flow's ODE, the next rectified flow minimises E_t ‖(ε − x) − v(x_t, t)‖² with
x_t = (1 − t) x + t ε (eq. 1). In the EDM view x_t / (1 − t) = x + σ ε, and the loss is the denoising loss
E_σ λ(σ) ‖D(x + σ ε; σ) − x‖² with the coupled ε in place of fresh noise (λ: the recipe's weighting; flow
matching's ``velocity`` weighting makes it eq. 1 exactly): that line is all that differs from
:class:`~sdeflow.training.diffusion.DiffusionObjective`.

Distillation (``fewstep.distill_steps`` = k > 0): one Euler step of a flow from t to 0 lands exactly on D(x_t),
so the k-step Euler sampler evaluates D at k noise levels only. The student regresses D(x + σ_i ε; σ_i) onto the
coupled x at those levels with ``fewstep.distance`` (Liu et al. §2.3 with an offline distance in place of LPIPS).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ConfigError
from ..core.losses import denoising_loss
from ..core.preconditioning import pad_dims
from ..core.process import FlowProcess
from ..data.couplings import read_index
from ..sampling.schedules import get_schedule
from .diffusion import DiffusionObjective
from .distances import build_distance
from .stream import Batch

__all__ = ["ReflowObjective"]


class ReflowObjective(DiffusionObjective):
    """The (k+1)-rectified flow trained on the couplings of the k-th (``finetune.base``), or its distillation."""

    name = "reflow"

    def __init__(self, net, recipe, cfg, data_shape, *args, **kwargs):
        super().__init__(net, recipe, cfg, data_shape, *args, **kwargs)
        if not isinstance(recipe.process, FlowProcess):
            where = f"finetune.base {cfg.finetune.base}" if cfg.finetune.base else "this config (diffusion.recipe)"
            raise ConfigError(f"reflow straightens a flow: {where} uses process '{recipe.process.name}', not 'flow'")
        f = cfg.fewstep
        if f.distill_steps:  # the noise levels the k-step Euler sampler evaluates D at
            levels = get_schedule("flow", f.distill_steps, recipe.process)[:-1].float()
            self.register_buffer("levels", levels, persistent=False)
            self.distance = build_distance(f.distance, f.perceptual_resolution)

    def start_from_base(self, data_shape: tuple[int, ...]) -> None:
        """The base's weights; refused if the couplings were drawn by another model."""
        super().start_from_base(data_shape)
        drawn_by = (read_index(self.cfg.data.path) or {}).get("teacher_sha256")
        if drawn_by is not None and drawn_by != self._base_sha:
            raise ConfigError(f"the couplings in {self.cfg.data.path} were drawn by another model than finetune.base "
                              f"{self.cfg.finetune.base}: reflow trains on the couplings of the flow it starts "
                              "from")  # fmt: skip

    def loss(self, batch: Batch, phase: str) -> Tensor:
        x0, noise = batch.x, batch.noise
        if noise is None:
            raise ConfigError("objective 'reflow' needs couplings: data.name couplings")
        cond = self.condition(batch.labels, len(x0))
        k = self.cfg.fewstep.distill_steps
        if k == 0:  # eq. 1 on the couplings
            sigma = self.recipe.sample_sigma(batch.global_size, batch.generator, x0.device)[batch.rows]
            return denoising_loss(self.denoiser, x0, sigma, self.recipe.weight(sigma), noise=noise, cond=cond).mean()
        pick = (batch.rand() * k).long().clamp_max(k - 1)
        sigma = self.levels.to(x0.device)[pick.to(x0.device)]
        with torch.no_grad():
            x = x0 + pad_dims(sigma, x0) * noise.to(x0.dtype)
        return self.distance(self.denoiser(x, sigma, cond), x0).mean()
