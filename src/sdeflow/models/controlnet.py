"""ControlNet (Zhang et al. 2023): spatial control of a frozen base by a trainable copy of its first layers.

The copy reads the noisy input plus an encoded control image (a small convolutional "hint" encoder whose last
layer starts at zero) and returns one residual per skip connection and one after the middle blocks, each through a
1×1 convolution initialised to zero (the "zero convolutions", §3.1): before training the ControlNet adds exactly
nothing, so the base's output is unchanged bit for bit and training starts from the base's behaviour.

For a DiT, :class:`DiTControlNet` copies the first N blocks and adds one zero-initialised linear output per block
to the base's hidden states after the same block (PixArt-δ's ControlNet-Transformer, Chen et al. 2024; SD3's
ControlNets do the same).

:class:`ControlledNet` is what a denoiser wraps: a base with any number of ControlNets whose residuals are summed,
each scaled by its conditioning scale (Zhang et al. §3.4, "multiple conditions"); the control images travel in a
:class:`~sdeflow.core.condition.ControlCondition`, so samplers and guidance carry them unchanged.
"""

from __future__ import annotations

import copy
import math

from torch import Tensor, nn

from ..core.condition import ControlCondition
from .dit import DiT
from .unet import UNet

__all__ = ["ControlNet", "ControlledNet", "DiTControlNet"]


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(nn.Module):
    """A trainable copy of ``base``'s embeddings, encoder and middle blocks, started from its weights.

    Args:
        base: the UNet to control (copied, not shared).
        control_channels: channels of the control image (3 for RGB maps, 1 for edges or heat maps).
        hint_channels: widths of the hint encoder; ``downsample`` stride-2 steps among them bring a pixel-space
            control image to a latent model's resolution (8 for Stable Diffusion's VAE).
    """

    def __init__(self, base: UNet, control_channels: int = 3, hint_channels: tuple[int, ...] = (16, 32),
                 downsample: int = 1):  # fmt: skip
        super().__init__()
        steps = round(math.log2(downsample))
        if 2**steps != downsample or steps > len(hint_channels):
            raise ValueError(f"downsample must be a power of 2 up to 2^{len(hint_channels)}, got {downsample}")
        self.control_channels = control_channels
        self.copy = copy.deepcopy(base)
        keep = set(self.copy.middle)
        for name in [n for n in self.copy.dec if n not in keep]:  # the decoder is not copied, only the middle
            del self.copy.dec[name]
        del self.copy.out_norm, self.copy.out_conv
        self.copy.requires_grad_(True)
        layers: list[nn.Module] = []
        cin = control_channels
        for i, width in enumerate(hint_channels):
            layers += [nn.Conv2d(cin, width, 3, padding=1, stride=2 if i < steps else 1), nn.SiLU()]
            cin = width
        last = nn.Conv2d(cin, base.enc[next(iter(base.enc))].out_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.hint = nn.Sequential(*layers, last)
        widths = [m.out_channels if isinstance(m, nn.Conv2d) else m.conv1.out_channels for m in base.enc.values()]
        self.zero_skips = nn.ModuleList(_zero_conv(c) for c in widths)
        self.zero_middle = _zero_conv(widths[-1])

    def forward(self, x: Tensor, c_noise: Tensor, cond: object, image: Tensor) -> tuple[list[Tensor], Tensor]:
        """(one residual per skip connection of the base, one for the middle blocks' output)."""
        if image.ndim != 4 or image.shape[1] != self.control_channels or len(image) != len(x):
            raise ValueError(
                f"the control image must be (B, {self.control_channels}, H, W) with B = {len(x)}, got "
                f"{tuple(image.shape)}"
            )
        emb, text = self.copy.embed(x, c_noise, cond)
        hint = self.hint(image.to(x.dtype))
        if hint.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"the control image encodes to {tuple(hint.shape[-2:])}, the input is {tuple(x.shape[-2:])}"
            )
        skips = self.copy.encode(x, emb, text, hint)
        h = skips[-1]
        for name in self.copy.middle:
            h = self.copy.dec[name](h, emb, text)
        return [z(s) for z, s in zip(self.zero_skips, skips)], self.zero_middle(h)


class DiTControlNet(nn.Module):
    """A trainable copy of a DiT's or MM-DiT's embeddings and first ``blocks`` blocks; the control image is
    patchified by a zero-initialised convolution and added to the copy's image tokens (MM-DiT: the text stream runs
    through the copied blocks as in the base)."""

    def __init__(self, base: DiT, control_channels: int = 3, blocks: int = 0):
        super().__init__()
        blocks = blocks or max(1, len(base.blocks) // 2)
        if not 1 <= blocks <= len(base.blocks):
            raise ValueError(f"a ControlNet of {blocks} blocks does not fit a DiT of depth {len(base.blocks)}")
        self.control_channels = control_channels
        self.copy = copy.deepcopy(base)
        self.copy.blocks = self.copy.blocks[:blocks]
        del self.copy.final_norm, self.copy.final_ada, self.copy.final
        self.copy.requires_grad_(True)
        self.hint = nn.Conv2d(control_channels, base.hidden_size, base.patch, stride=base.patch)
        self.zero_out = nn.ModuleList(nn.Linear(base.hidden_size, base.hidden_size) for _ in range(blocks))
        for layer in (self.hint, *self.zero_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c_noise: Tensor, cond: object, image: Tensor) -> tuple[list[Tensor], None]:
        """(one residual per copied block, None: a DiT has no middle)."""
        if image.ndim != 4 or image.shape[1] != self.control_channels or image.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"the control image must be (B, {self.control_channels}, {x.shape[-2]}, {x.shape[-1]}), got "
                f"{tuple(image.shape)}"
            )
        h, c, carry = self.copy.start(x, c_noise, cond)
        h = h + self.hint(image.to(x.dtype)).flatten(2).transpose(1, 2)
        out = []
        for blk, zero in zip(self.copy.blocks, self.zero_out):
            h, carry = self.copy.step(blk, h, c, carry)
            out.append(zero(h))
        return out, None


class ControlledNet(nn.Module):
    """``base`` (a UNet or DiT) under ControlNets, called ``net(x, c_noise, ControlCondition(cond, images))``; a
    plain ``cond`` runs the base alone. ``scales``: one conditioning scale per ControlNet (0 switches one off)."""

    def __init__(self, base: nn.Module, controlnets: list[nn.Module], scales: list[float] | None = None):
        super().__init__()
        self.base, self.controlnets = base, nn.ModuleList(controlnets)
        self.scales = list(scales) if scales is not None else [1.0] * len(controlnets)
        if len(self.scales) != len(self.controlnets):
            raise ValueError(f"{len(self.scales)} conditioning scales for {len(self.controlnets)} ControlNets")
        self.in_channels = base.in_channels

    def forward(self, x: Tensor, c_noise: Tensor, cond: object = None) -> Tensor:
        if not isinstance(cond, ControlCondition):
            return self.base(x, c_noise, cond)
        if len(cond.images) != len(self.controlnets):
            raise ValueError(f"{len(cond.images)} control images for {len(self.controlnets)} ControlNets")
        skips, middle = None, None
        for net, scale, image in zip(self.controlnets, self.scales, cond.images):
            if scale == 0:
                continue
            s, m = net(x, c_noise, cond.cond, image)
            if skips is None:
                skips, middle = [scale * r for r in s], (None if m is None else scale * m)
            else:  # several ControlNets: residuals of the same layer add (a shorter DiT copy adds fewer)
                skips = (
                    [a + scale * r for a, r in zip(skips, s)] + skips[len(s) :] + [scale * r for r in s[len(skips) :]]
                )
                middle = None if m is None else middle + scale * m
        residuals = None if skips is None else (skips, middle)
        return self.base(x, c_noise, cond.cond, residuals)  # type: ignore[arg-type]
