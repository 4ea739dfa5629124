"""Step schedules: decreasing σ grids σ_0 > σ_1 > … > σ_{N−1} > σ_N = 0 for any process.

Every schedule returns N + 1 values (float64), the last one 0: a sampler with N steps walks the
grid from σ_0 to 0.  The grids of diffusers' discrete schedulers ("leading", "trailing",
"linspace" spacing) are reproduced exactly on discrete processes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..core.process import FlowProcess, Process, VPDiscreteProcess, shift_time

__all__ = [
    "SCHEDULES",
    "check_schedule",
    "consistency_grid",
    "ddpm_discrete",
    "flow_shifted",
    "get_schedule",
    "karras",
    "log_snr_uniform",
    "uniform_t",
]


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of steps must be an integer >= 1, got {n!r}")


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's schedule (Karras et al. 2022, eq. 5): σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ."""
    _check_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    inv_rho = 1 / rho
    return _append_zero((sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho)


def log_snr_uniform(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in log-SNR λ = −2 ln σ, i.e. geometric in σ (DPM-Solver's 'logSNR'; VE/SMLD's geometric levels)."""
    _check_steps(n)
    return _append_zero(torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)))


def uniform_t(n: int, process: Process) -> Tensor:
    """Uniform in the process's own time: t_i from t_max to t_min (Song et al. 2021's samplers)."""
    _check_steps(n)
    t = torch.linspace(process.t_max, process.t_min, n, dtype=torch.float64)
    return _append_zero(process.sigma(t))


def ddpm_discrete(n: int, process: VPDiscreteProcess, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
    """σ at the integer timesteps diffusers picks for n inference steps (Lin et al. 2024, Table 2).

    - ``leading``: t = (0, k, 2k, …)·reversed + offset with k = T // n (DDIM, Song et al. 2021);
    - ``trailing``: t = round(T − i·T/n) − 1 (Lin et al. 2024: always starts at T − 1);
    - ``linspace``: t = round(linspace(0, T − 1, n)) reversed.
    """
    _check_steps(n)
    if not isinstance(process, VPDiscreteProcess):
        raise ValueError("the 'ddpm_discrete' schedule needs a discrete process (vp_discrete)")
    T = process.num_steps
    if n > T:
        raise ValueError(f"steps ({n}) exceed the process's {T} discrete timesteps")
    # numpy, as diffusers computes them: torch's float arange / linspace round differently at a few halves
    if spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / n)) - 1
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, n).round()[::-1]
    else:
        raise ValueError(f"unknown spacing '{spacing}'; choose 'leading', 'trailing' or 'linspace'")
    return _append_zero(process.sigmas[torch.from_numpy(t.astype(np.int64))])


def flow_shifted(n: int, process: FlowProcess, shift: float | None = None) -> Tensor:
    """SD3's sampling schedule: t uniform from 1 towards 0, then shifted (Esser et al. 2024, eq. 23),
    clamped to [t_min, t_max] of the process."""
    _check_steps(n)
    if not isinstance(process, FlowProcess):
        raise ValueError("the 'flow_shifted' schedule needs a flow process")
    shift = process.shift if shift is None else shift
    u = torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1]
    t = shift_time(u, shift).clamp(process.t_min, process.t_max)
    return _append_zero(process.sigma(t))


def consistency_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Multistep consistency sampling's τ_0 … τ_{N−1}: Karras's grid of N + 1 points without its last, σ_min
    (a consistency model maps σ_min to itself, so a step there would do nothing); N = 1 is [σ_max, 0]."""
    return torch.cat([karras(n + 1, sigma_min, sigma_max, rho)[:-2], torch.zeros(1, dtype=torch.float64)])


SCHEDULES = ("karras", "edm", "log_snr", "geometric", "uniform_t", "leading", "trailing", "linspace", "flow",
             "consistency", "optimized")  # fmt: skip


def get_schedule(
    name: str,
    n: int,
    process: Process,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """A named schedule of n steps for ``process`` (σ_min/σ_max default to the process's range)."""
    smin = process.sigma_min if sigma_min is None else sigma_min
    smax = process.sigma_max if sigma_max is None else sigma_max
    if name in ("karras", "edm"):
        sig = karras(n, smin, smax, rho)
    elif name in ("log_snr", "geometric"):
        sig = log_snr_uniform(n, smin, smax)
    elif name == "uniform_t":
        sig = uniform_t(n, process)
    elif name in ("leading", "trailing", "linspace"):
        sig = ddpm_discrete(n, process, name)  # type: ignore[arg-type]
    elif name == "flow":
        sig = flow_shifted(n, process)  # type: ignore[arg-type]
    elif name == "consistency":
        sig = consistency_grid(n, smin, smax, rho)
    elif name == "optimized":
        raise ValueError("the 'optimized' schedule belongs to a model: load it with sdeflow.load (computed by "
                         "`sdeflow schedule CHECKPOINT`) or pass its sigmas")  # fmt: skip
    else:
        raise ValueError(f"unknown schedule '{name}'; choose one of {SCHEDULES}")
    check_schedule(sig, process)
    return sig


def check_schedule(sigmas: Tensor, process: Process | None = None, rtol: float = 1e-4) -> Tensor:
    """Validate a σ grid: 1-D, at least two entries, strictly decreasing, final σ = 0, finite, and (given a
    process) inside its σ range."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("a schedule must be a 1-D grid of at least two σ values (N steps: N + 1 values)")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError("the schedule contains non-finite σ")
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"the schedule must end at σ = 0, got {float(sigmas[-1])}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("the schedule must be strictly decreasing")
    if process is not None:
        process.check_sigma(sigmas[:-1], rtol=rtol)
    return sigmas
