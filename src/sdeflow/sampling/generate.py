"""One call to sample from any denoiser with any sampler, schedule and step count."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.preconditioning import DenoiserFn
from ..core.process import Process
from .samplers import get_spec
from .schedules import check_schedule, get_schedule

__all__ = ["CountingDenoiser", "SampleResult", "check_denoiser", "sample"]


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


def check_denoiser(model: Any) -> None:
    """Refuse, with the interface spelled out, a model that cannot be called as D(x, sigma, cond)."""
    if not callable(model):
        raise TypeError(f"the model must be a denoiser callable as D(x, sigma, cond), got {type(model).__name__}")
    try:
        sig = inspect.signature(model)
    except (TypeError, ValueError):  # builtins and some C extensions have no signature: let the call decide
        return
    try:
        sig.bind(None, None, None)
    except TypeError:
        raise TypeError(
            f"the model {getattr(model, '__name__', type(model).__name__)}{sig} cannot be called as "
            "D(x, sigma, cond): samplers pass x (B, ...), sigma a tensor of shape (B,) and cond (labels or None); "
            "wrap a network with sdeflow.Denoiser, or add a cond=None parameter to a plain function"
        ) from None


def _model_dtype(model: Any) -> torch.dtype:
    """float64 for a float64 torch model (its products fail on float32 input), float32 otherwise: a bf16-weight
    network still samples in float32, with the network run under autocast."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.float32


def sample(
    model: DenoiserFn,
    shape: tuple[int, ...] | None = None,
    process: Process | None = None,
    sampler: str = "heun",
    steps: int = 18,
    schedule: str | None = None,
    sigmas: Tensor | None = None,
    cond: Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    x_init: Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
    **options: Any,
) -> SampleResult:
    """Draw ``shape[0]`` samples from ``model`` (any denoiser D(x, σ, cond)).

    Args:
        model: a :class:`~sdeflow.Denoiser`, a :class:`~sdeflow.GaussianMixture`, or any callable
            ``D(x, sigma, cond)`` (see :class:`~sdeflow.core.preconditioning.DenoiserFn`).
        shape: (B, *data_shape); may be left out when ``x_init`` is given.
        process: the process that defines the prior, the default σ range and process-bound samplers.
        sampler: a name in :data:`sdeflow.sampling.samplers.SPECS`; on a flow, ``heun`` runs ``flow_heun``.
        steps: number of steps N (ignored when ``sigmas`` is given).
        schedule: a name in :data:`sdeflow.sampling.schedules.SCHEDULES`; default: the sampler's own.
        sigmas: an explicit decreasing σ grid ending in 0 (overrides steps/schedule).
        seed / generator: reproducibility; the initial noise and all sampler noise come from it.
        x_init: the initial state at σ_0 (σ-space); default: the process's prior.
        dtype: of the sampler's state; default ``x_init``'s, else float64 for a float64 model, else float32.
        options: sampler options (eta, s_churn, snr, rtol, …).
    """
    if process is None:
        raise TypeError("sample() needs the process the model was trained with (process=...)")
    spec = get_spec(sampler).resolve(process)
    check_denoiser(model)
    if x_init is not None:
        if shape is not None and tuple(x_init.shape) != tuple(shape):
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {tuple(shape)}")
        shape = tuple(x_init.shape)
        dtype = dtype or x_init.dtype
    elif shape is None:
        raise TypeError("sample() needs the batch shape (B, *data_shape) or an initial state x_init")
    dtype = dtype or _model_dtype(model)
    if sigmas is None and schedule == "optimized":  # the grid stored with the model (sdeflow.sampling.optimize)
        from .optimize import find_optimized

        sigmas = check_schedule(find_optimized(model, spec.name, steps), process)
    elif sigmas is None:
        n = max(steps, spec.min_steps) if isinstance(steps, int) and steps >= 1 else steps  # the schedule refuses < 1
        sigmas = get_schedule(schedule or spec.default_schedule(process), n, process)
    else:
        sigmas = check_schedule(sigmas, process)
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    if x_init is None:
        x_init = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
        x_init = x_init * process.prior_std(float(sigmas[0]))
    x_init = x_init.to(dtype)
    if spec.needs_process:
        options.setdefault("process", process)
    callback = options.pop("callback", None)
    unknown = set(options) - set(inspect.signature(spec.fn).parameters)
    if unknown:
        raise ValueError(f"sampler '{spec.name}' has no option(s) {sorted(unknown)}")
    counted = CountingDenoiser(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sigmas) - 1, desc=spec.name, leave=False)

    def _cb(i: int, s: float, x: Tensor, d: Tensor) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(sigma=f"{s:.3g}", nfe=counted.nfe)
        if callback is not None:
            callback(i, s, x, d)

    out = spec.fn(counted, x_init, sigmas, cond, generator=generator, callback=_cb, **options)
    if bar is not None:
        bar.close()
    return SampleResult(out, counted.nfe, sigmas)
