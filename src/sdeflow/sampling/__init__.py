"""Sampling: σ grids, the samplers and their table of facts, ``sample()``, guidance, likelihood, acceleration;
``sample_codes()`` for the autoregressive prior over VQ codes."""

from .acceleration import PRECISIONS, CUDAGraphDenoiser, accelerate_denoiser, cast_network_weights
from .generate import CountingDenoiser, SampleResult, check_denoiser, sample
from .graphed import CUDAGraphSampler
from .samplers import SAMPLERS, SPECS, SamplerSpec, default_schedule, get_spec, nfe_per_steps, steps_for_nfe
from .schedules import SCHEDULES, get_schedule
from .tokens import sample_codes

__all__ = [
    "PRECISIONS",
    "SAMPLERS",
    "SCHEDULES",
    "SPECS",
    "CUDAGraphDenoiser",
    "CUDAGraphSampler",
    "CountingDenoiser",
    "SampleResult",
    "SamplerSpec",
    "accelerate_denoiser",
    "cast_network_weights",
    "check_denoiser",
    "default_schedule",
    "get_schedule",
    "get_spec",
    "nfe_per_steps",
    "sample",
    "sample_codes",
    "steps_for_nfe",
]
