"""Backbones. Every model is called as ``net(x, c_noise, cond)`` and wrapped by :class:`sdeflow.Denoiser`."""

from typing import Any

from torch import nn

from .autoregressive import MADE, PixelCNN
from .dit import DiT
from .layers import GroupNorm, attention, attention_reference
from .mlp import MLP
from .mmdit import MMDiT
from .unet import UNet
from .vq_transformer import VQTransformer

__all__ = [
    "MADE",
    "MLP",
    "DiT",
    "GroupNorm",
    "MMDiT",
    "PixelCNN",
    "UNet",
    "VQTransformer",
    "attention",
    "attention_reference",
    "build_model",
]


def build_model(kind: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by kind: ``mlp``, ``unet``, ``dit`` or ``mmdit`` (``preset=`` optional but for mlp)."""
    preset = kwargs.pop("preset", None)
    if kind == "mlp":
        return MLP(**kwargs)
    if kind == "unet":
        return UNet.preset(preset, **kwargs) if preset else UNet(**kwargs)
    if kind == "dit":
        return DiT.preset(preset, **kwargs) if preset else DiT(**kwargs)
    if kind == "mmdit":
        return MMDiT.preset(preset, **kwargs) if preset else MMDiT(**kwargs)
    raise ValueError(f"unknown model kind '{kind}'; choose 'mlp', 'unet', 'dit' or 'mmdit'")
