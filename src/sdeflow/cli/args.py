"""Argument types for the command line: each checks its value where it is read and names the flag's rule, so a
bad argument is an argparse error (usage and one line, exit 2) rather than a failure deep in a run."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

__all__ = ["device", "float_pair", "listed", "positive_float", "positive_int", "quantisation_levels"]


def _number(text: str, cast: Callable[[str], float], rule: str, ok: Callable[[float], bool]):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {rule}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a whole number >= 1", lambda v: v >= 1)


def positive_float(text: str) -> float:
    return _number(text, float, "a finite number > 0", lambda v: 0 < v < float("inf"))


def quantisation_levels(text: str) -> int:
    """0 (continuous data) or L >= 2 levels."""
    return _number(text, int, "0 (continuous) or >= 2 levels", lambda v: v == 0 or v >= 2)


def float_pair(text: str) -> tuple[float, float]:
    """'a,b' with 0 <= a < b: a σ interval."""
    parts = text.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'a,b' (two numbers), got {text!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= a < b, got {lo}, {hi}")
    return lo, hi


def listed(item: Callable[[str], object], allowed: list[str] | None = None) -> Callable[[str], list]:
    """A comma-separated list of ``item`` values (each one of ``allowed`` when given)."""

    def parse(text: str) -> list:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        if allowed is not None:
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return [item(v) for v in values]

    return parse


def device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N or mps."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA device on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("mps: not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (cpu, cuda, cuda:N, mps)")
    return text
