"""Kernels of our own where the profile says PyTorch's and Inductor's leave time on the table (Triton)."""

from .group_norm import (
    group_norm_act_reference,
    group_norm_act_triton,
    interpreted,
    supported,
    triton_available,
)

__all__ = [
    "group_norm_act_reference",
    "group_norm_act_triton",
    "interpreted",
    "supported",
    "triton_available",
]
