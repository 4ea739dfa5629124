"""Drawing the couplings of reflow (Liu et al. 2022, Alg. 1): noise ε pushed through a flow's ODE with any
deterministic sampler, stored in shards (:mod:`sdeflow.data.couplings`).

Shard i's noise comes from its own CPU generator seeded by (seed, i), so the shards do not depend on the device,
on the order they are drawn in, or on an interruption: a resumed generation writes exactly the shards an
uninterrupted one would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.preconditioning import DenoiserFn
from ..core.process import FlowProcess, Process
from ..data.couplings import read_index, shard_path, write_index, write_shard
from ..errors import DataError
from .generate import sample
from .samplers import get_spec
from .schedules import get_schedule

__all__ = ["generate_couplings", "shard_seed"]


def shard_seed(seed: int, shard: int) -> int:
    return (seed * 1_000_003 + shard * 7919 + 17) % (2**62)


def generate_couplings(
    model: DenoiserFn,
    process: Process,
    data_shape: tuple[int, ...],
    folder: str | Path,
    n: int,
    sampler: str = "flow_heun",
    steps: int = 50,
    schedule: str | None = None,
    seed: int = 0,
    shard_size: int = 1024,
    num_classes: int = 0,
    teacher: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    max_shards: int | None = None,
) -> Path:
    """Write ``n`` couplings (ε, ODE(ε)) of ``model`` into ``folder``; shards already there are kept.

    Args:
        teacher: what identifies the model (checkpoint path and weights' SHA-256): a folder begun by another
            teacher or other settings is refused rather than mixed.
        num_classes: class-conditional teachers draw labels 0, 1, … cyclically (every class equally often).
        max_shards: stop after drawing this many new shards (for tests and time-boxed runs).
    """
    if not isinstance(process, FlowProcess):
        raise DataError(f"reflow straightens a flow's paths: the teacher's process is '{process.name}', not 'flow'")
    spec = get_spec(sampler).resolve(process)
    if spec.stochastic or spec.nfe is None:
        raise DataError(f"couplings need a deterministic fixed-step ODE sampler, not '{sampler}'")
    if n < 1 or shard_size < 1:
        raise DataError(f"need n >= 1 and shard_size >= 1, got {n}, {shard_size}")
    folder = Path(folder)
    sigmas = get_schedule(schedule or spec.default_schedule(process), steps, process)
    index = {**(teacher or {}), "sampler": spec.name, "steps": steps, "schedule": schedule, "seed": seed, "n": n,
             "shard_size": shard_size, "data_shape": list(data_shape), "num_classes": num_classes}  # fmt: skip
    old = read_index(folder)
    if old is not None and old != index:
        diff = sorted(k for k in set(old) | set(index) if old.get(k) != index.get(k))
        raise DataError(f"{folder} holds couplings drawn with other settings ({', '.join(diff)}): use a new folder")
    if old is None and folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder} exists and is not a couplings folder: use a new folder")
    write_index(folder, index)
    shards = -(-n // shard_size)
    todo = [i for i in range(shards) if not shard_path(folder, i).is_file()]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=shards, initial=shards - len(todo), desc="couplings", unit="shard")
    for done, i in enumerate(todo):
        if max_shards is not None and done >= max_shards:
            break
        m = min(shard_size, n - i * shard_size)
        g = torch.Generator().manual_seed(shard_seed(seed, i))
        noise = torch.randn((m, *data_shape), generator=g)
        labels = torch.arange(i * shard_size, i * shard_size + m) % num_classes if num_classes else None
        x_init = (noise * process.prior_std(float(sigmas[0]))).to(device)
        res = sample(model, process=process, sampler=spec.name, sigmas=sigmas, x_init=x_init, device=device,
                     cond=labels.to(device) if labels is not None else None, generator=g)  # fmt: skip
        write_shard(folder, i, noise, res.samples, labels if labels is not None else torch.full((m,), -1))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return folder
