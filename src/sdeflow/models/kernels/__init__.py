"""Kernels of our own where the profile says PyTorch's and Inductor's leave time on the table (Triton)."""

from .group_norm import (
    group_norm_act,
    interpreted,
    supported,
    triton_available,
)

__all__ = [
    "group_norm_act",
    "interpreted",
    "supported",
    "triton_available",
]
