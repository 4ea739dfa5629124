"""Where our Triton kernels may run: a CUDA device, or Triton's interpreter on the CPU (the tests)."""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

__all__ = ["check_device", "interpreted", "triton_available"]

_TRITON = importlib.util.find_spec("triton") is not None  # looked up once, without importing it


def triton_available() -> bool:
    return _TRITON


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter: ``TRITON_INTERPRET=1`` set before Triton's import (the CPU
    tests); only then do CPU tensors go to the kernels."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(x: Tensor, what: str) -> None:
    """Refuse, by name, a CPU tensor for the GPU kernels ``what`` outside the interpreter."""
    if x.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"the Triton {what} kernels take CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, set before "
            "Triton is imported, as the tests do)"
        )
