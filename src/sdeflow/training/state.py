"""A run's checkpoints: everything needed to continue a run exactly (weights, EMA, every phase's optimizer, LR
schedule and gradient scaler, RNG states, step, losses), written atomically by :mod:`sdeflow.checkpoint`."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import find_latest, load_checkpoint, load_weights, save_checkpoint

if TYPE_CHECKING:
    from .loop import Trainer

__all__ = ["restore", "save"]

_PER_PHASE = (("optimizers", "optimizer"), ("lr_schedulers", "lr_scheduler"), ("scalers", "scaler"))


def save(tr: Trainer) -> Path | None:
    """Write checkpoint ``step_<step>`` of the run (rank 0 only) and prune to ``train.keep_last``."""
    if tr.rank != 0:
        return None
    from .. import __version__

    state: dict[str, Any] = {
        "step": tr.step,
        "optimizers": {k: o.state_dict() for k, o in tr.optimizers.items()},
        "lr_schedulers": {k: s.state_dict() for k, s in tr.schedulers.items()},
        "scalers": {k: s.state_dict() for k, s in tr.scalers.items()},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "samples_seen": tr.step * tr.cfg.train.batch_size,
        "losses": tr.losses,
    }
    meta = {
        "config": tr.cfg.to_dict(),
        "objective": tr.objective.name,
        "phases": list(tr.objective.phases),
        "data_shape": list(tr.data_shape),
        "num_classes": tr.cfg.model.num_classes,
        "sdeflow_version": __version__,
    }
    model, ema = tr.objective.saved_modules()
    return save_checkpoint(tr.ckpt_dir, tr.step, model, ema, state, meta, keep_last=tr.cfg.train.keep_last)


def restore(tr: Trainer, resume: bool | str | Path) -> None:
    """Continue from the latest checkpoint of the run (``resume=True``) or from the given checkpoint folder."""
    path = find_latest(tr.ckpt_dir) if resume is True else Path(resume)
    if path is None:
        if tr.rank == 0:
            print(f"no checkpoint under {tr.ckpt_dir}: starting from scratch")
        return
    ck = load_checkpoint(path)
    model, ema = tr.objective.saved_modules()
    load_weights(model, ck["model"], str(path / "model.safetensors"))
    if ema is not None:
        load_weights(ema, ck["ema"], str(path / "ema.safetensors"))
    st = ck["state"]
    first = tr.objective.phases[0]
    for many, one in _PER_PHASE:  # checkpoints of single-optimizer runs hold one state under the singular key
        saved = st[many] if many in st else {first: st[one]}
        for phase, obj in getattr(tr, many.replace("lr_schedulers", "schedulers")).items():
            obj.load_state_dict(saved[phase])
    torch.set_rng_state(st["rng"]["torch"])
    random.setstate(st["rng"]["python"])
    tr.step = int(st["step"])
    tr.losses = list(st.get("losses", []))
    if tr.rank == 0:
        print(f"resumed from {path} at step {tr.step}")
