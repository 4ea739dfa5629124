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

A *sharded* checkpoint (a ``train.parallel.strategy: fsdp`` run) holds ``sharded/`` in place of the two weight
files: every rank's slices of the weights, EMA and optimizer moments, written by ``torch.distributed.checkpoint``
(DCP) and readable on any number of ranks, or whole by one process (:func:`read_sharded`). Only tensors go into it;
its index (``.metadata``, a pickle) is read with an unpickler that builds DCP's own index classes and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError

__all__ = [
    "CheckpointError",
    "check_finite",
    "export_checkpoint",
    "find_latest",
    "list_checkpoints",
    "load_checkpoint",
    "read_sharded",
    "save_checkpoint",
    "save_sharded_checkpoint",
]

FILES = ("model.safetensors", "ema.safetensors", "state.pt")
SHARDED = "sharded"  # a sharded checkpoint's DCP folder


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
        _finish(tmp, final, FILES, state, {"step": step, **(meta or {})})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(directory, keep_last)
    return final


def _finish(tmp: Path, final: Path, files: tuple[str, ...], state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write state.pt and meta.json (with the SHA-256 of ``files`` and state.pt) into ``tmp``, fsync everything,
    then rename ``tmp`` to ``final`` (replacing a checkpoint of the same step)."""
    torch.save(state, tmp / "state.pt")
    files = tuple(dict.fromkeys((*files, "state.pt")))
    info = {**meta, "sha256": {f: _sha256(tmp / f) for f in files}}
    (tmp / "meta.json").write_text(json.dumps(info, indent=1, default=str))
    for f in (*files, "meta.json"):
        _fsync(tmp / f)
    for folder in {(tmp / f).parent for f in files} | {tmp}:
        _fsync(folder)
    if final.exists():  # re-saving the same step: move the old one aside first
        old = final.parent / f".old_{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(final.parent)


def _prune(directory: Path, keep_last: int) -> None:
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(
    directory: str | Path,
    step: int,
    tensors: dict[str, Any],
    state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Collective (every rank calls it): each rank writes its slices of ``tensors`` (a nested dict of tensors and
    DTensors) into a temporary folder with DCP; rank 0 then adds ``state.pt`` and ``meta.json`` and renames the
    folder into place, so a crash mid-write leaves the previous checkpoint as it was. ``directory`` must be one
    folder for all ranks (one host, or a shared file system)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    directory, rank = Path(directory), dist.get_rank()
    final = directory / f"step_{step:08d}"
    name = [None]
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        name = [tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=directory)]
    dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp / SHARDED, sync_files=True))
        if rank == 0:
            shards = tuple(sorted(str(p.relative_to(tmp)) for p in (tmp / SHARDED).iterdir()))
            _finish(tmp, final, shards, state, {"step": step, **meta, "sharded": True})
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        _prune(directory, keep_last)
    dist.barrier()  # no rank goes on (and possibly writes the next checkpoint) before this one is in place
    return final


class _IndexUnpickler(pickle.Unpickler):
    """Reads a DCP index (``.metadata``): DCP's metadata classes, torch sizes, dtypes and layouts, paths; any other
    global (code a crafted file would run) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in (
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("torch.serialization", "_get_layout"),
            ("torch", "Size"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("pathlib", "WindowsPath"),
            ("collections", "OrderedDict"),
        ):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"a checkpoint index may not name {module}.{name}")


def _reader(folder: Path) -> Any:
    """A DCP reader of ``folder`` whose index is read by :class:`_IndexUnpickler`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            try:
                with open(folder / ".metadata", "rb") as f:
                    md = _IndexUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, OSError) as e:
                raise CheckpointError(f"cannot read the index {folder / '.metadata'}: {e}") from None
            md.storage_meta = getattr(md, "storage_meta", None) or StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(folder)


def read_sharded(path: str | Path, target: dict[str, Any] | None = None, prefix: str | None = None) -> dict[str, Any]:
    """Load a sharded checkpoint's tensors: into ``target`` (nested dicts of the shapes saved, sharded or not; on
    every rank of a run when a process group exists), or, with ``prefix`` ("model", "ema"), whole into new CPU
    tensors, one process alone (sampling, export)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(path) / SHARDED
    reader = _reader(folder)
    if target is not None:
        dcp.load(target, storage_reader=reader)
        return target
    index = reader.read_metadata().state_dict_metadata
    whole = {
        key[len(prefix) + 1 :]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for key, m in index.items()
        if key.startswith(prefix + ".") and isinstance(m, TensorStorageMetadata)
    }
    if whole:
        with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({prefix: whole}, storage_reader=reader, no_dist=True)
    return whole


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints (with meta.json) under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step_*") if p.is_dir() and (p / "meta.json").is_file())


def find_latest(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, verify: bool = True, weights: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder: {'model', 'ema' (state dicts), 'state', 'meta', 'path'}. Refuses corrupt files.
    A sharded checkpoint's weights are read whole into this process, unless ``weights`` is False (a sharded
    resume reads each rank's slices itself, :func:`read_sharded`)."""
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
    sharded = bool(meta.get("sharded"))
    for f in meta.get("sha256", {}) if sharded else FILES:
        if not (path / f).is_file():
            raise CheckpointError(f"checkpoint {path} is missing {f}")
        if verify and _sha256(path / f) != meta.get("sha256", {}).get(f):
            raise CheckpointError(f"corrupted checkpoint file {path / f}: its SHA-256 does not match meta.json")
    try:
        if sharded:
            model, ema = (read_sharded(path, prefix=p) if weights else {} for p in ("model", "ema"))
            ema = ema or model
        else:
            model, ema = load_file(path / "model.safetensors"), load_file(path / "ema.safetensors")
    except (SafetensorError, OSError, RuntimeError) as e:
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


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """A sharded checkpoint (or any checkpoint) as the single-file kind: ``out/step_<step>/`` with
    ``model.safetensors``, ``ema.safetensors`` and the same meta, which ``sdeflow sample`` and fine-tuning read on one
    process. The optimizer state is left behind (an export is for using the model, not resuming its run)."""
    ck = load_checkpoint(path)
    step = int(ck["meta"]["step"])
    target = Path(out) / f"step_{step:08d}"
    if target.exists():  # never replace a checkpoint (the source itself, when out is its own folder)
        raise CheckpointError(f"{target} already exists: export into another --out folder")
    meta = {k: v for k, v in ck["meta"].items() if k not in ("sha256", "sharded", "world_size", "step")}
    meta["exported_from"] = str(ck["path"])
    return save_checkpoint(out, step, ck["model"], ck["ema"], {"step": step}, meta)
