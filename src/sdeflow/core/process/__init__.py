"""Forward processes x_t = s(t)·(x0 + σ(t)·ε) (Karras et al. 2022, eq. 10), and their registry by name.

===================  ===========================================  ===============================
name                 s(t), σ(t)                                    reference
===================  ===========================================  ===============================
``vp_discrete``      s = √ᾱ_t, σ = √(1/ᾱ_t − 1), ᾱ from betas       Ho et al. 2020 (DDPM)
``vp_linear``        β(t) = β_min + t(β_max − β_min), t ∈ (0, 1]    Song et al. 2021 (score SDE)
``sub_vp``           s = e^{−B/2}, σ = 2 sinh(B/2), B = ∫₀ᵗ β        Song et al. 2021, eq. 29
``vp_cosine``        ᾱ(t) = cos²(φ(t)) / cos²(φ(0))                 Nichol & Dhariwal 2021
``ve``               s = 1, σ = σ_min (σ_max/σ_min)^t               Song & Ermon 2019; Song 2021
``edm``              s = 1, σ = t                                   Karras et al. 2022
``flow``             s = 1 − t, σ = t / (1 − t)                     Liu 2022; Lipman 2022; SD3
===================  ===========================================  ===============================
"""

from __future__ import annotations

from typing import Any

from .base import Process, shift_time
from .flow import FlowProcess
from .ve import EDMProcess, VEProcess
from .vp import SubVPProcess, VPCosineProcess, VPDiscreteProcess, VPLinearProcess, cosine_betas, linear_betas

__all__ = [
    "PROCESSES",
    "EDMProcess",
    "FlowProcess",
    "Process",
    "SubVPProcess",
    "VEProcess",
    "VPCosineProcess",
    "VPDiscreteProcess",
    "VPLinearProcess",
    "cosine_betas",
    "get_process",
    "linear_betas",
    "shift_time",
]

PROCESSES: dict[str, type[Process]] = {
    "vp_discrete": VPDiscreteProcess,
    "ddpm": VPDiscreteProcess,
    "vp_linear": VPLinearProcess,
    "vp": VPLinearProcess,
    "sub_vp": SubVPProcess,
    "vp_cosine": VPCosineProcess,
    "ve": VEProcess,
    "smld": VEProcess,
    "edm": EDMProcess,
    "flow": FlowProcess,
    "rectified_flow": FlowProcess,
}


def get_process(name: str | Process, **kwargs: Any) -> Process:
    """Build a process by name (a key of :data:`PROCESSES`); a process passes through unchanged."""
    if isinstance(name, Process):
        return name
    try:
        cls = PROCESSES[name]
    except KeyError:
        raise ValueError(f"unknown process '{name}'; choose one of {sorted(PROCESSES)}") from None
    return cls(**kwargs)
