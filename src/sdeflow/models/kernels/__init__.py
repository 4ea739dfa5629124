"""Kernels of our own where the profile says PyTorch's and Inductor's leave time on the table (Triton)."""

from .adaln import ada_layer_norm, ada_supported
from .group_norm import group_norm_act, supported
from .runtime import interpreted, triton_available

__all__ = [
    "ada_layer_norm",
    "ada_supported",
    "group_norm_act",
    "interpreted",
    "supported",
    "triton_available",
]
