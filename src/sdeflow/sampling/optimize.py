"""Step schedules optimised for one model and sampler (in the spirit of Align Your Steps, Sabour et al. 2024).

AYS chooses the N + 1 noise levels that minimise an upper bound on the discretisation error of the sampler for
the given model. We minimise the error itself, measured: for a batch of initial noise x_T, the mean squared
distance between the N-step sample and a converged solution of the same probability-flow ODE from the same x_T,

    E(σ_1 … σ_{N−1}) = E_{x_T} ‖Φ_N(x_T; σ) − Φ_∞(x_T)‖²,

by coordinate descent on log σ_i (each σ_i searched between its neighbours with a bounded scalar search, σ_0 =
σ_max and σ_N = 0 fixed; AYS refines its grid coordinate-wise too). Started from the Karras grid, the result is
never worse than it on the batch. The grid is stored beside the checkpoint's weights (``schedules.json``, with
the SHA-256 of the weights it was computed for) and used by ``sample(..., schedule="optimized")``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

from ..core.preconditioning import DenoiserFn
from ..core.process import Process
from ..errors import CheckpointError
from .generate import sample
from .samplers import get_spec
from .schedules import check_schedule, get_schedule

__all__ = ["SCHEDULES_FILE", "find_optimized", "optimize_schedule", "read_schedules", "save_schedule"]

SCHEDULES_FILE = "schedules.json"


def _key(sampler: str, steps: int) -> str:
    return f"{sampler}:{steps}"


@torch.no_grad()
def optimize_schedule(
    model: DenoiserFn,
    process: Process,
    sampler: str,
    steps: int,
    noise: Tensor,
    cond: Tensor | None = None,
    reference_steps: int = 256,
    sweeps: int = 3,
    start: str | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """(σ grid, errors): the ``steps``-step grid of ``sampler`` minimising the mean squared error to the reference
    ODE solution from ``noise`` (unit normal, (B, …)); errors holds the start grid's and the result's RMSE."""
    spec = get_spec(sampler).resolve(process)
    if spec.stochastic or spec.nfe is None:
        raise ValueError(f"schedule optimisation needs a deterministic fixed-step sampler, not '{sampler}'")
    if steps < 2:
        raise ValueError("a 1-step grid has no free noise level to optimise: use steps >= 2")
    grid = get_schedule(start or spec.default_schedule(process), steps, process)
    x_init = noise * process.prior_std(float(grid[0]))
    ref = sample(model, process=process, sampler="heun", steps=reference_steps, x_init=x_init, cond=cond).samples

    def error(sigmas: Tensor) -> float:
        out = sample(model, process=process, sampler=spec.name, sigmas=sigmas, x_init=x_init, cond=cond).samples
        return float((out - ref).double().square().mean())

    best = error(grid)
    start_error = best
    log_floor = math.log(process.sigma_min)
    for _ in range(sweeps):
        improved = False
        for i in range(1, steps):
            lo = math.log(float(grid[i + 1])) if i + 1 < steps else log_floor
            hi = math.log(float(grid[i - 1]))

            def at(u: float, i: int = i, lo: float = lo, hi: float = hi) -> float:
                g = grid.clone()
                g[i] = math.exp(min(max(u, lo + 1e-9), hi - 1e-9))
                return error(g)

            res = minimize_scalar(at, bounds=(lo, hi), method="bounded", options={"xatol": 1e-3, "maxiter": 20})
            if res.fun < best:
                grid[i] = math.exp(min(max(res.x, lo + 1e-9), hi - 1e-9))
                improved |= res.fun < best * (1 - 1e-4)
                best = float(res.fun)
        if not improved:
            break
    check_schedule(grid, process)
    return grid, {"rmse_start": start_error**0.5, "rmse_optimized": best**0.5}


def read_schedules(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint folder's stored schedules ({} where there are none)."""
    path = Path(checkpoint) / SCHEDULES_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupted schedules file {path}: {e}") from None


def save_schedule(checkpoint: str | Path, sampler: str, steps: int, sigmas: Tensor, info: dict[str, Any]) -> Path:
    """Add (or replace) the grid of ``sampler`` with ``steps`` steps in the checkpoint's ``schedules.json``;
    written to a temporary file and renamed, so a crash leaves the previous file."""
    path = Path(checkpoint) / SCHEDULES_FILE
    table = read_schedules(checkpoint)
    table[_key(sampler, steps)] = {"sigmas": [float(s) for s in sigmas], **info}
    tmp = path.with_name(f".{SCHEDULES_FILE}.tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, path)
    return path


def find_optimized(model: Any, sampler: str, steps: int) -> Tensor:
    """The stored grid of ``sampler`` and ``steps`` of the denoiser inside ``model`` (guidance and speed wrappers
    are looked through), as :func:`sdeflow.load` attached it."""
    seen = model
    for _ in range(6):
        table = getattr(seen, "optimized_schedules", None)
        if table is not None:
            break
        seen = getattr(seen, "model", None) or getattr(seen, "denoiser", None)
        if seen is None:
            break
    table = table or {}
    if _key(sampler, steps) not in table:
        have = ", ".join(sorted(table)) or "none"
        raise ValueError(f"no optimized schedule for sampler '{sampler}' with {steps} steps is stored with this "
                         f"model (stored: {have}); compute one with `sdeflow schedule CHECKPOINT --sampler {sampler} "
                         f"--steps {steps}`")  # fmt: skip
    return torch.tensor(table[_key(sampler, steps)], dtype=torch.float64)
