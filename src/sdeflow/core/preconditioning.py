"""Parameterizations: what the network predicts, and the one denoiser ``D(x, σ, cond)`` built from it.

Whatever the network ``F`` predicts, the denoiser is affine in it (Karras et al. 2022, eq. 7):

    D(x̃; σ) = c_skip(σ) · x̃ + c_out(σ) · F(c_in(σ) · x̃, c_noise(σ))

with x̃ = x0 + σ ε the unscaled noisy input.  For a process with scale s(t) and σ(t):

=============  ================================  ===========================  ===================
target         meaning                           c_skip                       c_out
=============  ================================  ===========================  ===================
``eps``        ε (Ho et al. 2020)                1                            −σ
``x0``         x0                                0                            1
``v``          α ε − σ_t x0 (Salimans & Ho)      1/(1+σ²)                     −σ / (s (1+σ²))
``velocity``   dx_t/dt = ṡ x0 + (sσ)' ε          (ṡσ + sσ̇)/(sσ̇)             −σ / (s σ̇)
``score``      ∇_x̃ log p(x̃; σ)                 1                            σ²
``edm``        EDM's F                           σ_d²/(σ²+σ_d²)               σσ_d/√(σ²+σ_d²)
=============  ================================  ===========================  ===================

(α = s, σ_t = sσ in the notation of Salimans & Ho.)  For all but ``edm`` the network sees the
process's own x_t = s x̃ (c_in = s) and time t (c_noise = time_scale · t(σ)); ``edm`` uses
c_in = 1/√(σ²+σ_d²), c_noise = ¼ ln σ (Karras et al. 2022, Table 1).

Because every target is affine in D, converting between targets is exact: see :func:`convert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from .process import Process

__all__ = [
    "PARAMETERIZATIONS",
    "Coefficients",
    "Denoiser",
    "DenoiserFn",
    "coefficients",
    "convert",
    "pad_dims",
]

PARAMETERIZATIONS = ("eps", "x0", "v", "velocity", "score", "edm")


class DenoiserFn(Protocol):
    """Anything callable as ``D(x, sigma, cond) -> x0_hat`` in σ-space."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor: ...


def pad_dims(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector (B,) or scalar to broadcast against ``like`` (B, ...)."""
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class Coefficients:
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def coefficients(
    parameterization: str,
    sigma: Tensor,
    process: Process | None = None,
    sigma_data: float = 0.5,
    time_scale: float = 1.0,
) -> Coefficients:
    """The preconditioning coefficients of a parameterization at noise level σ (see module table)."""
    sigma = torch.as_tensor(sigma)
    if parameterization == "edm":
        sd2 = sigma_data**2
        return Coefficients(
            c_skip=sd2 / (sigma**2 + sd2),
            c_out=sigma * sigma_data / torch.sqrt(sigma**2 + sd2),
            c_in=torch.rsqrt(sigma**2 + sd2),
            c_noise=torch.log(sigma) / 4,
        )
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization '{parameterization}'; choose one of {PARAMETERIZATIONS}")
    if process is None:
        raise ValueError(f"parameterization '{parameterization}' needs a process (for s(t) and t(σ))")
    # The process's coefficients are per-sample scalars: take them in float64 and return them in σ's dtype. For a
    # flow near t = 1, 1 − t and the velocity's c_skip = 1 + ṡσ/(sσ̇) cancel catastrophically in float32. MPS has
    # no float64.
    out_dtype = sigma.dtype
    if sigma.device.type != "mps":
        sigma = sigma.double()
    c = _process_coefficients(parameterization, sigma, process, time_scale)
    return Coefficients(*(v.to(out_dtype) for v in (c.c_skip, c.c_out, c.c_in, c.c_noise)))


def _process_coefficients(parameterization: str, sigma: Tensor, process: Process, time_scale: float) -> Coefficients:
    t = process.t_of_sigma(sigma)
    s = process.s(t).to(sigma.dtype)
    one = torch.ones_like(sigma)
    if parameterization == "eps":
        c_skip, c_out = one, -sigma
    elif parameterization == "x0":
        c_skip, c_out = torch.zeros_like(sigma), one
    elif parameterization == "v":
        c_skip, c_out = 1 / (1 + sigma**2), -sigma / (s * (1 + sigma**2))
    elif parameterization == "velocity":
        ds, dsig = process.ds_dt(t).to(sigma.dtype), process.dsigma_dt(t).to(sigma.dtype)
        c_skip, c_out = (ds * sigma + s * dsig) / (s * dsig), -sigma / (s * dsig)
    else:  # score
        c_skip, c_out = one, sigma**2
    return Coefficients(c_skip=c_skip, c_out=c_out, c_in=s, c_noise=(time_scale * t).to(sigma.dtype))


def convert(
    pred: Tensor,
    x: Tensor,
    sigma: Tensor,
    source: str,
    target: str,
    process: Process | None = None,
    sigma_data: float = 0.5,
) -> Tensor:
    """Convert a prediction of ``source`` into ``target`` exactly, at the point (x̃ = x, σ).

    Goes through the denoised estimate: D = c_skip x̃ + c_out F_source, F_target = (D − c_skip' x̃)/c_out'.
    ``source``/``target`` may be any of :data:`PARAMETERIZATIONS`; ``"x0"`` is D itself.
    """
    sig = pad_dims(sigma, x)
    a = coefficients(source, sig, process, sigma_data)
    d = a.c_skip * x + a.c_out * pred
    b = coefficients(target, sig, process, sigma_data)
    return (d - b.c_skip * x) / b.c_out


class Denoiser(nn.Module):
    """Wrap a network ``net(x_in, c_noise, cond)`` of any parameterization into ``D(x̃, σ, cond)``.

    Args:
        net: the backbone; called as ``net(c_in·x̃, c_noise, cond)`` with c_noise of shape (B,).
        process: the forward process the network was trained with (gives s(t), t(σ)).
        parameterization: one of :data:`PARAMETERIZATIONS`.
        sigma_data: σ_data of EDM's preconditioning.
        time_scale: multiplies the process time fed to the network; default 1000 for processes on t ∈ [0, 1]
            (as score-SDE and SD3 networks), 1 otherwise (DDPM's integer steps).
        check_range: refuse σ outside the process's range (the network never saw it). Checked for CPU tensors
            only: on a GPU the check would synchronise the host at every evaluation.
        consistency: a consistency model f(x̃, σ) = x̃ + (1 − σ_min/σ)(D(x̃, σ) − x̃), i.e. one Euler step of the
            PF-ODE from σ to the process's σ_min: f(x̃, σ_min) = x̃ exactly (the boundary condition of Song et al.
            2023, eq. 3) for any parameterization, and f ≈ D for σ ≫ σ_min, so a student starts at its teacher.
    """

    def __init__(
        self,
        net: nn.Module,
        process: Process,
        parameterization: str = "edm",
        sigma_data: float = 0.5,
        time_scale: float | None = None,
        check_range: bool = True,
        consistency: bool = False,
    ):
        super().__init__()
        self.consistency = consistency
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization '{parameterization}'; choose one of {PARAMETERIZATIONS}")
        self.net, self.process, self.parameterization = net, process, parameterization
        if time_scale is None:  # networks see 1000·t for processes on t ∈ [0, 1] (score SDE, SD3), else t
            time_scale = 1000.0 if process.t_max <= 1.0 else 1.0
        self.sigma_data, self.time_scale, self.check_range = sigma_data, time_scale, check_range

    def coefficients(self, sigma: Tensor) -> Coefficients:
        return coefficients(self.parameterization, sigma, self.process, self.sigma_data, self.time_scale)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or of shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        if self.check_range and self.parameterization != "edm" and sigma.device.type == "cpu":
            self.process.check_sigma(sigma)
        c = self.coefficients(sigma)
        f = self.net(pad_dims(c.c_in, x) * x, c.c_noise.to(x.dtype), cond)
        if f.shape != x.shape:
            raise ValueError(f"network output shape {tuple(f.shape)} does not match input {tuple(x.shape)}")
        out = pad_dims(c.c_skip, x) * x + pad_dims(c.c_out, x) * f.to(x.dtype)
        if self.consistency:
            out = x + pad_dims(1 - self.process.sigma_min / sigma, x) * (out - x)
        return out

    def target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """The network's regression target F* for x̃ = x0 + σ·noise (so that D(F*) = x0)."""
        c = self.coefficients(sigma)
        x = x0 + pad_dims(sigma, x0) * noise
        return (x0 - pad_dims(c.c_skip, x0) * x) / pad_dims(c.c_out, x0)
