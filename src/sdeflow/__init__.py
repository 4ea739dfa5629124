"""sdeflow: diffusion and flow-matching models in one framework (the EDM view).

Every forward process is x_t = s(t)·(x0 + σ(t)·ε); every network is wrapped into one denoiser
D(x, σ, cond); losses, samplers, guidance and likelihood are written once against it.

Layers, bottom up: ``core`` (processes, preconditioning, losses, the mixture oracle), ``models``, ``data``,
``config`` and ``builders`` (config → objects, :func:`load`), ``sampling``, ``evaluation``, ``training``, ``cli``.
Importing ``sdeflow`` loads no training code.
"""

from ._moved import install as _install_moved_modules
from .builders import LoadedModel, load
from .core.condition import NULL_LABEL, TextCondition
from .core.losses import Recipe, denoising_loss, loss_weight, recipe, sample_sigma
from .core.mixture import GaussianMixture
from .core.preconditioning import PARAMETERIZATIONS, Denoiser, coefficients, convert
from .core.process import (
    EDMProcess,
    FlowProcess,
    Process,
    SubVPProcess,
    VEProcess,
    VPCosineProcess,
    VPDiscreteProcess,
    VPLinearProcess,
    get_process,
    shift_time,
)
from .sampling import (
    CUDAGraphDenoiser,
    CUDAGraphSampler,
    SampleResult,
    accelerate_denoiser,
    cast_network_weights,
    sample,
)
from .sampling.prompts import sample_prompts

__version__ = "0.1.0"
_install_moved_modules()


__all__ = [
    "NULL_LABEL",
    "PARAMETERIZATIONS",
    "CUDAGraphDenoiser",
    "CUDAGraphSampler",
    "Denoiser",
    "EDMProcess",
    "FlowProcess",
    "GaussianMixture",
    "LoadedModel",
    "Process",
    "Recipe",
    "SampleResult",
    "SubVPProcess",
    "TextCondition",
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
    "load",
    "loss_weight",
    "recipe",
    "sample",
    "sample_prompts",
    "sample_sigma",
    "shift_time",
]
