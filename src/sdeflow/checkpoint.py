"""Crash-safe checkpoints.

A checkpoint is a folder ``step_00001000/`` holding

- ``model.safetensors`` and ``ema.safetensors``: the network and its EMA weights (safetensors: no code runs
  on load);
- ``state.pt``: optimizer, grad-scaler, step, RNG states and data-loader position, read back with
  ``torch.load(weights_only=True)``;
- ``meta.json``: the step, the run's resolved config and the SHA-256 of every file.

It is written into a temporary folder, every file and the folder are fsync'ed, and only then is the folder
renamed into place (an atomic operation), so a crash mid-write leaves the previous checkpoint untouched and
loadable. On load every checksum is verified: a truncated or altered file is refused with its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError

__all__ = ["CheckpointError", "check_finite", "find_latest", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

FILES = ("model.safetensors", "ema.safetensors", "state.pt")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_dict(module: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = module if isinstance(module, dict) else module.state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in weights.items()}


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: nn.Module | dict[str, torch.Tensor],
    ema: nn.Module | dict[str, torch.Tensor] | None,
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep_last: int = 0,
) -> Path:
    """Atomically write checkpoint ``step`` under ``directory``; then keep only the newest ``keep_last`` (0: all)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=directory))
    try:
        save_file(_state_dict(model), tmp / "model.safetensors")
        save_file(_state_dict(ema if ema is not None else model), tmp / "ema.safetensors")
        torch.save(state, tmp / "state.pt")
        info = {"step": step, **(meta or {}), "sha256": {f: _sha256(tmp / f) for f in FILES}}
        (tmp / "meta.json").write_text(json.dumps(info, indent=1, default=str))
        for f in (*FILES, "meta.json"):
            _fsync(tmp / f)
        _fsync(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first
            old = directory / f".old_{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (with meta.json) under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step_*") if p.is_dir() and (p / "meta.json").is_file())


def find_latest(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder: {'model', 'ema' (state dicts), 'state', 'meta'}. Refuses corrupt files."""
    path = Path(path)
    if path.is_file() and path.name in (*FILES, "meta.json"):
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupted checkpoint metadata {meta_file}: {e}") from None
    for f in FILES:
        if not (path / f).is_file():
            raise CheckpointError(f"checkpoint {path} is missing {f}")
        if verify and _sha256(path / f) != meta.get("sha256", {}).get(f):
            raise CheckpointError(f"corrupted checkpoint file {path / f}: its SHA-256 does not match meta.json")
    try:
        model, ema = load_file(path / "model.safetensors"), load_file(path / "ema.safetensors")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read weights in {path}: {e}") from None
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path / 'state.pt'}: {e}") from None
    return {"model": model, "ema": ema, "state": state, "meta": meta, "path": path}


def check_finite(weights: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf (a run that diverged): nothing trained or sampled from them is usable."""
    bad = sorted(k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"{source} holds non-finite weights ({bad[:3]}): the run diverged")


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a state dict strictly, turning key/shape mismatches into a clear error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [
        f"{k}: {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in weights and weights[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}"
        )
    module.load_state_dict(weights)
