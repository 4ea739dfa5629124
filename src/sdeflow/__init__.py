"""sdeflow: diffusion and flow-matching models in one framework (the EDM view).

Every forward process is x_t = s(t)·(x0 + σ(t)·ε); every network is wrapped into one denoiser
D(x, σ, cond); losses, samplers, guidance and likelihood are written once against it.
"""

from .losses import Recipe, denoising_loss, loss_weight, recipe, sample_sigma
from .mixture import NULL_LABEL, GaussianMixture
from .preconditioning import PARAMETERIZATIONS, Denoiser, coefficients, convert
from .process import (
    EDMProcess,
    FlowProcess,
    Process,
    VEProcess,
    VPCosineProcess,
    VPDiscreteProcess,
    VPLinearProcess,
    get_process,
    shift_time,
)
from .sampling import CUDAGraphDenoiser, SampleResult, accelerate_denoiser, cast_network_weights, sample

__version__ = "0.1.0"

__all__ = [
    "NULL_LABEL",
    "PARAMETERIZATIONS",
    "CUDAGraphDenoiser",
    "Denoiser",
    "EDMProcess",
    "FlowProcess",
    "GaussianMixture",
    "Process",
    "Recipe",
    "SampleResult",
    "VEProcess",
    "VPCosineProcess",
    "VPDiscreteProcess",
    "VPLinearProcess",
    "accelerate_denoiser",
    "cast_network_weights",
    "coefficients",
    "convert",
    "denoising_loss",
    "get_process",
    "loss_weight",
    "recipe",
    "sample",
    "sample_sigma",
    "shift_time",
]
