"""Denoising score matching, written once on the denoiser D (Karras et al. 2022, eq. 2 and 8):

    L = E_{σ ~ p(σ)} E_{x0, ε} [ λ(σ) ‖D(x0 + σ ε; σ) − x0‖² ]

Every classic objective is this loss with a choice of process, parameterization, σ-distribution
p(σ) and weighting λ(σ).  Weightings are stated relative to the x0 error ‖D − x0‖²:

===================  ======================================  ========================================
weighting            λ(σ)                                    equals
===================  ======================================  ========================================
``eps``              1/σ²  (= SNR)                           ‖ε̂ − ε‖², DDPM's L_simple
``x0``               1                                       ‖x̂0 − x0‖²
``v``                (1 + σ²)/σ² (VP)                        ‖v̂ − v‖²
``velocity``         (s σ̇ / σ)²                             ‖û − u‖², flow matching
``score``            1/σ²                                    σ² ‖ŝ − ∇log p‖² (Song & Ermon 2019)
``edm``              (σ² + σ_d²)/(σ σ_d)²                   EDM, eq. 8 with Table 1
``min_snr``          min(1/σ², γ)                            min-SNR-γ (Hang et al. 2023), ε-loss form
``target``           1/c_out(σ)²                             plain MSE on the network's own target
===================  ======================================  ========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .preconditioning import DenoiserFn, coefficients, pad_dims
from .process import EDMProcess, FlowProcess, Process, VEProcess, VPDiscreteProcess, VPLinearProcess, shift_time

__all__ = [
    "RECIPES",
    "SIGMA_SAMPLERS",
    "WEIGHTINGS",
    "Recipe",
    "denoising_loss",
    "loss_weight",
    "recipe",
    "sample_sigma",
]

SIGMA_SAMPLERS = ("uniform_t", "discrete", "lognormal", "logit_normal", "log_uniform")
WEIGHTINGS = ("eps", "x0", "v", "velocity", "score", "edm", "min_snr", "target")


def sample_sigma(
    scheme: str,
    n: int,
    process: Process,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    p_mean: float = -1.2,
    p_std: float = 1.2,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Tensor:
    """Draw n noise levels σ (float32, on ``device``) from a training-time scheme.

    - ``uniform_t``: t ~ U(t_min, t_max) (score SDE, rectified flow), σ = σ(t);
    - ``discrete``: t uniform over the integer steps {0..T−1} of a discrete process (DDPM);
    - ``lognormal``: ln σ ~ N(P_mean, P_std²) (EDM, §5: −1.2, 1.2);
    - ``logit_normal``: t = sigmoid(N(m, s²)) (SD3, Esser et al. 2024, eq. 19), then SD3's shift;
    - ``log_uniform``: ln σ ~ U(ln σ_min, ln σ_max) (SMLD/NCSN's geometric noise levels).
    """
    gdev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=gdev)

    def randn() -> Tensor:
        return torch.randn(n, generator=generator, dtype=torch.float64, device=gdev)

    if scheme == "uniform_t":
        t = process.t_min + (process.t_max - process.t_min) * u
        sigma = process.sigma(t)
    elif scheme == "discrete":
        if not isinstance(process, VPDiscreteProcess):
            raise ValueError("sigma sampling 'discrete' needs a discrete process (vp_discrete)")
        t = torch.randint(0, process.num_steps, (n,), generator=generator, device=gdev).double()
        sigma = process.sigma(t)
    elif scheme == "lognormal":
        sigma = torch.exp(p_mean + p_std * randn())
    elif scheme == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * randn())
        if isinstance(process, FlowProcess):
            t = shift_time(t, process.shift)
        sigma = process.sigma(t.clamp(process.t_min, process.t_max))
    elif scheme == "log_uniform":
        lo, hi = math.log(process.sigma_min), math.log(process.sigma_max)
        sigma = torch.exp(lo + (hi - lo) * u)
    else:
        raise ValueError(f"unknown sigma sampling scheme '{scheme}'; choose one of {SIGMA_SAMPLERS}")
    return sigma.float().to(device)


def loss_weight(
    weighting: str,
    sigma: Tensor,
    process: Process | None = None,
    parameterization: str = "edm",
    sigma_data: float = 0.5,
    gamma: float = 5.0,
) -> Tensor:
    """λ(σ) multiplying the x0 error ‖D − x0‖² (see the module table)."""
    if weighting in ("eps", "score"):
        return sigma**-2
    if weighting == "x0":
        return torch.ones_like(sigma)
    if weighting == "v":  # (1 + σ²)/σ² on VP processes; 1/c_out² of the v-parameterization in general
        return (1 + sigma**2) / sigma**2 if process is None else coefficients("v", sigma, process).c_out ** -2
    if weighting == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if weighting == "min_snr":
        return torch.clamp(sigma**-2, max=gamma)
    if weighting == "velocity":
        return coefficients("velocity", sigma, process).c_out ** -2
    if weighting == "target":
        return coefficients(parameterization, sigma, process, sigma_data).c_out ** -2
    raise ValueError(f"unknown loss weighting '{weighting}'; choose one of {WEIGHTINGS}")


def denoising_loss(
    denoiser: DenoiserFn,
    x0: Tensor,
    sigma: Tensor,
    weight: Tensor | None = None,
    noise: Tensor | None = None,
    cond: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample DSM loss λ(σ)·mean‖D(x0 + σε; σ) − x0‖² (mean over data dimensions), shape (B,)."""
    if sigma.shape != (x0.shape[0],):
        raise ValueError(f"sigma must have shape ({x0.shape[0]},), got {tuple(sigma.shape)}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match data {tuple(x0.shape)}")
    x = x0 + pad_dims(sigma, x0) * noise
    err = (denoiser(x, sigma, cond) - x0) ** 2
    per_sample = err.reshape(len(x0), -1).mean(1)
    return per_sample if weight is None else weight.to(per_sample) * per_sample


@dataclass
class Recipe:
    """A training objective: process + parameterization + σ-distribution + weighting."""

    name: str
    process: Process
    parameterization: str
    sigma_sampling: str
    weighting: str
    sigma_data: float = 0.5
    sampling_kwargs: dict[str, Any] = field(default_factory=dict)
    paper: str = ""

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device: Any = "cpu") -> Tensor:
        return sample_sigma(self.sigma_sampling, n, self.process, generator, device, **self.sampling_kwargs)

    def weight(self, sigma: Tensor) -> Tensor:
        return loss_weight(self.weighting, sigma, self.process, self.parameterization, self.sigma_data)

    def loss(
        self, denoiser: DenoiserFn, x0: Tensor, cond: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Mean DSM loss of a batch under this recipe."""
        sigma = self.sample_sigma(len(x0), generator, x0.device).to(x0.dtype)
        return denoising_loss(denoiser, x0, sigma, self.weight(sigma), cond=cond, generator=generator).mean()


def _recipes() -> dict[str, Recipe]:
    return {
        "ddpm": Recipe("ddpm", VPDiscreteProcess(), "eps", "discrete", "eps", paper="Ho et al. 2020, DDPM (L_simple)"),
        "ncsn": Recipe(
            "ncsn",
            VEProcess(0.01, 50.0),
            "score",
            "log_uniform",
            "score",
            paper="Song & Ermon 2019, NCSN / SMLD (λ(σ) = σ²)",
        ),
        "vp": Recipe("vp", VPLinearProcess(), "eps", "uniform_t", "eps", paper="Song et al. 2021, score SDE (VP)"),
        "ve": Recipe(
            "ve", VEProcess(0.01, 50.0), "score", "uniform_t", "score", paper="Song et al. 2021, score SDE (VE)"
        ),
        "edm": Recipe("edm", EDMProcess(), "edm", "lognormal", "edm", paper="Karras et al. 2022, EDM"),
        "rectified_flow": Recipe(
            "rectified_flow",
            FlowProcess(),
            "velocity",
            "uniform_t",
            "velocity",
            paper="Liu et al. 2022; Lipman et al. 2022 (flow matching)",
        ),
        "sd3": Recipe(
            "sd3",
            FlowProcess(shift=3.0),
            "velocity",
            "logit_normal",
            "velocity",
            paper="Esser et al. 2024, SD3 (logit-normal, shift 3)",
        ),
    }


RECIPES = ("ddpm", "ncsn", "vp", "ve", "edm", "rectified_flow", "sd3")


def recipe(name: str, **overrides: Any) -> Recipe:
    """The training recipe of a classic paper by name (see :data:`RECIPES` and the README's table)."""
    table = _recipes()
    if name not in table:
        raise ValueError(f"unknown recipe '{name}'; choose one of {sorted(table)}")
    return replace(table[name], **overrides) if overrides else table[name]
