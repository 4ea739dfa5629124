"""The table of objectives the config's ``objective`` names, and the one call that builds one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..builders import checkpoint_config
from ..checkpoint import check_finite, load_checkpoint, load_weights
from ..config import ExperimentConfig
from ..models.autoencoder import Autoencoder
from .autoencoder import AutoencoderObjective
from .autoregressive import AutoregressiveObjective
from .baselines import FlowObjective, GANObjective
from .consistency import ConsistencyObjective
from .diffusion import DiffusionObjective
from .objective import Objective
from .reflow import ReflowObjective

__all__ = ["OBJECTIVE_CLASSES", "build_objective", "load_objective"]

OBJECTIVE_CLASSES: dict[str, type[Objective]] = {
    "diffusion": DiffusionObjective,
    "autoencoder": AutoencoderObjective,
    "gan": GANObjective,
    "flow": FlowObjective,
    "autoregressive": AutoregressiveObjective,
    "reflow": ReflowObjective,
    "consistency": ConsistencyObjective,
}


def build_objective(
    cfg: ExperimentConfig,
    data_shape: tuple[int, ...],
    autoencoder: Autoencoder | None = None,
    cached: bool = False,
    captions: list[str] | None = None,
) -> Objective:
    """``cfg.objective`` for data of ``data_shape`` (latent diffusion: the latent shape and its autoencoder;
    text-to-image: the dataset's caption table)."""
    if cfg.objective in ("diffusion", "reflow", "consistency"):
        return OBJECTIVE_CLASSES[cfg.objective].from_config(cfg, data_shape, autoencoder, cached, captions)
    return OBJECTIVE_CLASSES[cfg.objective](cfg, data_shape)  # type: ignore[call-arg]


def load_objective(
    path: str | Path, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[Objective, ExperimentConfig]:
    """The objective of a checkpoint with its trained weights (the EMA copy drawn from when ``ema``), in eval mode:
    how ``sdeflow eval`` samples a GAN, VAE, flow or autoregressive model."""
    ck = load_checkpoint(path)
    cfg, shape = checkpoint_config(ck)
    if cfg.objective == "autoencoder":  # the perceptual network only matters for training
        cfg.autoencoder = dataclasses.replace(cfg.autoencoder, perceptual_weight=0.0)
    objective = build_objective(cfg, shape)
    if isinstance(objective, AutoregressiveObjective):
        objective.check_trained(ck["meta"], str(ck["path"]))
    model, averaged = objective.saved_modules()
    for name, module in (("model", model), ("ema", averaged)):
        if module is not None:
            check_finite(ck[name], f"{ck['path']}/{name}.safetensors")
            load_weights(module, ck[name], f"{ck['path']}/{name}.safetensors")
    if not ema and hasattr(objective, "ema"):
        objective.ema = None
    return objective.to(device).eval(), cfg
