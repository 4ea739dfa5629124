"""A run's checkpoints: everything needed to continue a run exactly (weights, EMA, every phase's optimizer, LR
schedule and gradient scaler, RNG states, step, losses), written atomically by :mod:`sdeflow.checkpoint`; a
sharded run's weights, EMA and optimizer moments go through :mod:`.sharding` instead."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import check_finite, load_weights, save_checkpoint
from ..config import ExperimentConfig
from . import sharding
from .objective import Objective
from .optim import Phase
from .posthoc_ema import PostHocEMA

__all__ = ["restore", "save"]

_PARTS = (("optimizers", "optimizer"), ("lr_schedulers", "scheduler"), ("scalers", "scaler"))


def portable(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's or LR schedule's state dict as an eager run holds it: a CUDA-graphed run's device LR
    tensors and capturable flag (see :mod:`.graphed`) become floats and False, so any run can resume from it."""
    for group in state.get("param_groups", ()):
        for key in ("lr", "initial_lr"):
            if isinstance(group.get(key), torch.Tensor):
                group[key] = float(group[key])
        if "capturable" in group:
            group["capturable"] = False
    if "_last_lr" in state:
        state["_last_lr"] = [float(v) for v in state["_last_lr"]]
    return state


def save(
    directory: Path,
    step: int,
    cfg: ExperimentConfig,
    objective: Objective,
    phases: dict[str, Phase],
    data_shape: tuple[int, ...],
    losses: list[float],
    posthoc: PostHocEMA | None = None,
    sharded: bool = False,
) -> Path:
    """Write checkpoint ``step_<step>`` of the run under ``directory`` and prune to ``train.keep_last``;
    ``posthoc``: the post-hoc EMA trackers' weights, kept in ``state.pt`` to resume them. ``sharded``: an FSDP
    run's checkpoint, written by every rank together."""
    from .. import __version__

    state: dict[str, Any] = {
        key: {name: portable(getattr(p, attr).state_dict()) for name, p in phases.items()}
        for key, attr in _PARTS[int(sharded) :]  # a sharded run's optimizer state is sharded too
    }
    state.update(
        step=step,
        rng={"torch": torch.get_rng_state(), "python": random.getstate()},
        samples_seen=step * cfg.train.batch_size,
        losses=losses,
        objective=objective.extra_state(),
        **({"posthoc": posthoc.state_dict()} if posthoc is not None else {}),
    )
    meta = {
        "config": cfg.to_dict(),
        "objective": objective.name,
        "phases": list(objective.phases),
        "data_shape": list(data_shape),
        "num_classes": cfg.model.num_classes,
        "sdeflow_version": __version__,
        **objective.meta(),
    }
    if sharded:
        return sharding.save(directory, step, cfg, objective, phases, state, meta)
    model, ema = objective.saved_modules()
    return save_checkpoint(directory, step, model, ema, state, meta, keep_last=cfg.train.keep_last)


def restore(
    ck: dict[str, Any], objective: Objective, phases: dict[str, Phase], posthoc: PostHocEMA | None = None
) -> tuple[int, list[float]]:
    """Load a checkpoint read by :func:`~sdeflow.checkpoint.load_checkpoint` into the objective's modules, the
    phases, the post-hoc EMA trackers and the RNGs; returns (step, losses)."""
    path, st = Path(ck["path"]), ck["state"]
    sharded = bool(ck["meta"].get("sharded"))
    if sharded:
        sharding.restore(ck, objective, phases)
    else:
        model, ema = objective.saved_modules()
        for name in ("model", "ema"):
            check_finite(ck[name], str(path / f"{name}.safetensors"))
        load_weights(model, ck["model"], str(path / "model.safetensors"))
        if ema is not None:
            load_weights(ema, ck["ema"], str(path / "ema.safetensors"))
    for key, attr in _PARTS[int(sharded) :]:  # single-optimizer checkpoints of earlier versions: a singular key
        saved = st[key] if key in st else {objective.phases[0]: st[key[:-1]]}
        for name, p in phases.items():
            getattr(p, attr).load_state_dict(saved[name])
    objective.load_extra_state(st.get("objective", {}))
    if posthoc is not None:
        posthoc.load_state_dict(st.get("posthoc", {}), int(st["step"]))
    torch.set_rng_state(st["rng"]["torch"])
    random.setstate(st["rng"]["python"])
    return int(st["step"]), list(st.get("losses", []))
