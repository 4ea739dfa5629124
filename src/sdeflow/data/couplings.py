"""Couplings (noise ε, sample x) of a trained flow's ODE: the training data of reflow (Liu et al. 2022, §2.2).

A couplings folder holds ``couplings.json`` (the teacher, its weights' SHA-256, sampler, steps, seed, shard size,
count, data shape) and shards ``shard_00000.safetensors`` … with tensors ``noise`` (unit normal, the ε the ODE
started from: x̃ = σ_max ε), ``x`` (the ODE's end point) and ``y`` (labels, -1 when unconditional). Shards are
written atomically, so an interrupted generation keeps every finished shard and resumes with the next one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = ["INDEX", "CouplingDataset", "read_index", "shard_path", "write_index", "write_shard"]

INDEX = "couplings.json"


def shard_path(folder: Path, i: int) -> Path:
    return Path(folder) / f"shard_{i:05d}.safetensors"


def read_index(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``couplings.json``, or None where there is none."""
    path = Path(folder) / INDEX
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"corrupted couplings index {path}: {e}") from None


def write_index(folder: Path, index: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, folder / INDEX)


def write_shard(folder: Path, i: int, noise: Tensor, x: Tensor, y: Tensor) -> None:
    """Shard ``i``, written to a temporary name and renamed into place."""
    path = shard_path(folder, i)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {"noise": noise.contiguous().cpu(), "x": x.float().contiguous().cpu(), "y": y.long().cpu()}
    save_file(tensors, tmp, metadata={"shard": str(i)})
    os.replace(tmp, path)


class CouplingDataset(Dataset):
    """A couplings folder as a dataset: ``x`` the teacher's samples, ``y`` their labels, and ``noise`` the ε each
    was drawn from (the trainer's batches carry it as ``batch.noise``). Refuses an incomplete folder."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = read_index(folder)
        if index is None:
            raise DataError(f"{folder} holds no couplings ({INDEX} missing): generate them with `sdeflow reflow`")
        shards = -(-index["n"] // index["shard_size"])
        missing = [shard_path(folder, i).name for i in range(shards) if not shard_path(folder, i).is_file()]
        if missing:
            raise DataError(f"couplings in {folder} are incomplete: {len(missing)} of {shards} shards missing "
                            f"({missing[0]}, …); resume the generation with the same command")  # fmt: skip
        parts = []
        for i in range(shards):
            try:
                parts.append(load_file(shard_path(folder, i)))
            except (SafetensorError, OSError) as e:
                raise DataError(f"cannot read couplings shard {shard_path(folder, i)}: {e}") from None
        x = torch.cat([p["x"] for p in parts])
        noise = torch.cat([p["noise"] for p in parts])
        if x.shape != noise.shape or tuple(x.shape[1:]) != tuple(index["data_shape"]) or len(x) != index["n"]:
            raise DataError(f"couplings in {folder} do not match their index: {tuple(x.shape)} samples, "
                            f"{tuple(noise.shape)} noise, index {index['n']} × {index['data_shape']}")  # fmt: skip
        self.x, self.y, self.noise = x.float(), torch.cat([p["y"] for p in parts]), noise.float()
        self.shape, self.horizontal_flip = tuple(x.shape[1:]), False
        self.num_classes, self.index, self.folder = int(index.get("num_classes", 0)), index, folder

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.x[i], int(self.y[i])
