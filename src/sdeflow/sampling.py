"""One call to sample from any model with any sampler, schedule and step count."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .preconditioning import DenoiserFn
from .process import FlowProcess, Process, VPDiscreteProcess
from .samplers import PROCESS_SAMPLERS, SAMPLERS
from .schedules import check_schedule, get_schedule

__all__ = ["CountingDenoiser", "SampleResult", "default_schedule", "sample"]


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations (NFE): one per batched call."""

    def __init__(self, model: DenoiserFn):
        self.model, self.nfe = model, 0

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        self.nfe += 1
        return self.model(x, sigma, cond)


@dataclass
class SampleResult:
    samples: Tensor
    nfe: int
    sigmas: Tensor


def default_schedule(sampler: str, process: Process) -> str:
    """Flow processes: SD3's shifted schedule; DDPM/DDIM on a discrete process: diffusers' 'leading';
    otherwise EDM's Karras schedule."""
    if isinstance(process, FlowProcess):
        return "flow"
    if isinstance(process, VPDiscreteProcess) and sampler in ("ddpm", "ddim"):
        return "leading"
    return "karras"


def sample(
    model: DenoiserFn,
    shape: tuple[int, ...],
    process: Process,
    sampler: str = "heun",
    steps: int = 18,
    schedule: str | None = None,
    sigmas: Tensor | None = None,
    cond: Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    x_init: Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    **options: Any,
) -> SampleResult:
    """Draw ``shape[0]`` samples from ``model`` (any denoiser D(x, σ, cond)).

    Args:
        model: a :class:`~sdeflow.Denoiser`, a :class:`~sdeflow.GaussianMixture`, or any callable D.
        shape: (B, *data_shape).
        process: the process that defines the prior, the default σ range and process-bound samplers.
        sampler: a name in :data:`sdeflow.samplers.SAMPLERS`.
        steps: number of steps N (ignored when ``sigmas`` is given).
        schedule: a name in :data:`sdeflow.schedules.SCHEDULES`; default :func:`default_schedule`.
        sigmas: an explicit decreasing σ grid ending in 0 (overrides steps/schedule).
        seed / generator: reproducibility; the initial noise and all sampler noise come from it.
        x_init: the initial state at σ_0 (σ-space); default: the process's prior.
        options: sampler options (eta, s_churn, snr, rtol, …).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose one of {sorted(SAMPLERS)}")
    fn = SAMPLERS[sampler]
    if sigmas is None:
        sigmas = get_schedule(schedule or default_schedule(sampler, process), steps, process)
    else:
        sigmas = check_schedule(sigmas, process)
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    if x_init is None:
        x_init = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
        x_init = x_init * process.prior_std(float(sigmas[0]))
    elif tuple(x_init.shape) != tuple(shape):
        raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {tuple(shape)}")
    if sampler in PROCESS_SAMPLERS:
        options.setdefault("process", process)
    unknown = set(options) - set(inspect.signature(fn).parameters)
    if unknown:
        raise ValueError(f"sampler '{sampler}' has no option(s) {sorted(unknown)}")
    counted = CountingDenoiser(model)
    callback = options.pop("callback", None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sigmas) - 1, desc=sampler, leave=False)

    def _cb(i: int, s: float, x: Tensor, d: Tensor) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(sigma=f"{s:.3g}", nfe=counted.nfe)
        if callback is not None:
            callback(i, s, x, d)

    out = fn(counted, x_init, sigmas, cond, generator=generator, callback=_cb, **options)
    if bar is not None:
        bar.close()
    return SampleResult(out, counted.nfe, sigmas)
