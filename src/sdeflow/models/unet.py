"""The DDPM++ / ADM UNet (Song et al. 2021, Dhariwal & Nichol 2021, as configured in Karras et al. 2022).

Residual blocks GroupNorm → SiLU → conv, with the noise(+label) embedding injected either additively
(DDPM++) or as a scale-shift of the second normalisation (ADM's "adaptive group norm"); self-attention at
chosen resolutions (with a text condition: Stable Diffusion's spatial transformer, self- and cross-attention to the
prompt's tokens, and the pooled prompt vector added to the noise embedding as SDXL does); 2× average-pool
downsampling and nearest upsampling (the [1, 1] resample filter); skip connections scaled by √½; dropout; a
zero-initialised output convolution.

Presets (``UNet.preset(name)``):

- ``ddpmpp_cifar10``: EDM's DDPM++ CIFAR-10 configuration (128 channels, multipliers 2-2-2, 4 blocks,
  attention at 16×16, one head, additive embedding): ≈ 56 M parameters.
- ``small``: a CPU-sized UNet for 8×8 / 28×28 / 32×32 data (≈ 0.5 M parameters).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.condition import TextCondition, check_text
from .cross_attention import SpatialTransformer
from .layers import GroupNorm, LabelEmbedding, NoiseEmbedding, attention

__all__ = ["UNet", "UNetBlock"]


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _groups(channels: int) -> int:
    return min(32, channels // 4) if channels >= 4 else 1


def _group_norm(channels: int, eps: float = 1e-6) -> GroupNorm:
    return GroupNorm(_groups(channels), channels, eps=eps)


class UNetBlock(nn.Module):
    """A residual block, optionally resampling (up/down) and followed by self-attention (with ``context_dim``: by
    a spatial transformer attending to the text)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        emb: int,
        *,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        channels_per_head: int = 0,
        num_heads: int = 1,
        dropout: float = 0.0,
        scale_shift: bool = False,
        skip_scale: float = math.sqrt(0.5),
        context_dim: int = 0,
        positions: int = 0,
    ):
        super().__init__()
        self.up, self.down, self.scale_shift, self.skip_scale = up, down, scale_shift, skip_scale
        self.norm0 = _group_norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, cout * (2 if scale_shift else 1))
        self.norm1 = _group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or up or down) else None
        self.num_heads, self.transformer = 0, None
        heads = cout // channels_per_head if channels_per_head else num_heads
        if attention and context_dim:
            self.transformer = SpatialTransformer(cout, heads, context_dim, _groups(cout), positions)
        elif attention:
            self.num_heads = heads
            self.norm2 = _group_norm(cout)
            self.qkv = nn.Conv2d(cout, cout * 3, 1)
            self.proj = _zero(nn.Conv2d(cout, cout, 1))

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor, text: TextCondition | None = None) -> Tensor:
        orig = x
        x = self.conv0(self._resample(self.norm0(x, act=True)))
        params = self.affine(emb).to(x.dtype)
        if self.scale_shift:
            scale, shift = params.chunk(2, dim=1)
            x = self.norm1(x, scale=scale, shift=shift, act=True)
        else:
            x = self.norm1(x, pre=params, act=True)
        x = self.conv1(self.dropout(x))
        skip = self._resample(orig)
        x = (x + (self.skip(skip) if self.skip is not None else skip)) * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
            a = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))  # (B, heads, HW, d)
            x = (self.proj(a.transpose(-1, -2).reshape(b, c, h, w)) + x) * self.skip_scale
        if self.transformer is not None:
            x = self.transformer(x, text.tokens, text.mask)  # type: ignore[union-attr]
        return x


class UNet(nn.Module):
    """``net(x, c_noise, cond)`` on images (B, C, H, W); ``cond`` is a class label (B,) or None / -1 (null), or
    with ``context_dim`` > 0 a :class:`~sdeflow.core.condition.TextCondition` of that token width."""

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        num_classes: int = 0,
        embedding: str = "positional",
        scale_shift: bool = False,
        channels_per_head: int = 0,
        num_heads: int = 1,
        noise_scale: float = 1.0,
        context_dim: int = 0,
        pooled_dim: int = 0,
        token_positions: bool = False,  # fixed 2-D positions in the spatial transformers (cross_attention.py)
    ):
        super().__init__()
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        out_channels = out_channels or in_channels
        self.img_resolution, self.in_channels = img_resolution, in_channels
        emb = model_channels * 4
        self.noise_emb = NoiseEmbedding(model_channels, emb, embedding, scale=noise_scale)
        self.label_emb = LabelEmbedding(num_classes, emb) if num_classes > 0 else None
        self.context_dim = context_dim
        self.pooled_emb = nn.Linear(pooled_dim or context_dim, emb) if context_dim else None
        kw: dict[str, Any] = dict(
            emb=emb, dropout=dropout, scale_shift=scale_shift, channels_per_head=channels_per_head,
            num_heads=num_heads, context_dim=context_dim,
        )  # fmt: skip
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}_conv"] = nn.Conv2d(cout, model_channels, 3, padding=1)
                cout = model_channels
            else:
                self.enc[f"{res}_down"] = UNetBlock(cout, cout, down=True, **kw)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                        positions=res * token_positions, **kw)  # fmt: skip
        skips = [m.out_channels if isinstance(m, nn.Conv2d) else m.conv1.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}_in0"] = UNetBlock(cout, cout, attention=True, positions=res * token_positions, **kw)
                self.dec[f"{res}_in1"] = UNetBlock(cout, cout, **kw)
            else:
                self.dec[f"{res}_up"] = UNetBlock(cout, cout, up=True, **kw)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}_block{i}"] = UNetBlock(
                    cin, cout, attention=attn, positions=res * token_positions, **kw
                )
        self.out_norm = _group_norm(cout)
        self.out_conv = _zero(nn.Conv2d(cout, out_channels, 3, padding=1))

    def embed(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> tuple[Tensor, TextCondition | None]:
        """SiLU(noise + label or pooled-prompt embedding), and the text condition checked against the network."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        emb = self.noise_emb(c_noise)
        text = check_text(cond, self.context_dim, len(x))
        if self.label_emb is not None:
            emb = emb + self.label_emb(cond, len(x), x.device)
        if text is not None:
            emb = emb + self.pooled_emb(text.pooled.to(emb.dtype))  # type: ignore[misc]
        return F.silu(emb), text

    def encode(self, x: Tensor, emb: Tensor, text: TextCondition | None, hint: Tensor | None = None) -> list[Tensor]:
        """The encoder's outputs, one per skip connection (the last feeds the middle blocks); ``hint`` (a
        ControlNet's encoded control image) is added after the first convolution."""
        skips = []
        for m in self.enc.values():
            x = m(x) if isinstance(m, nn.Conv2d) else m(x, emb, text)
            if hint is not None and not skips:
                x = x + hint
            skips.append(x)
        return skips

    @property
    def middle(self) -> list[str]:
        """The names of the middle blocks (the decoder's first two, at the lowest resolution)."""
        return [n for n in self.dec if n.endswith(("_in0", "_in1"))]

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Any = None, residuals: tuple[list[Tensor], Tensor] | None = None
    ) -> Tensor:
        """``residuals``: a ControlNet's (one per skip connection, one after the middle blocks), added as in Zhang
        et al. 2023, Fig. 3."""
        emb, text = self.embed(x, c_noise, cond)
        skips = self.encode(x, emb, text)
        x = skips[-1]
        if residuals is not None:
            skips = [s + r for s, r in zip(skips, residuals[0], strict=True)]
        last_middle = self.middle[-1]
        for name, m in self.dec.items():
            if "block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = m(x, emb, text)
            if residuals is not None and name == last_middle:
                x = x + residuals[1]
        return self.out_conv(self.out_norm(x, act=True))

    PRESETS: dict[str, dict[str, Any]] = {  # noqa: RUF012
        "ddpmpp_cifar10": dict(
            img_resolution=32,
            in_channels=3,
            model_channels=128,
            channel_mult=(2, 2, 2),
            num_blocks=4,
            attn_resolutions=(16,),
            dropout=0.13,
        ),
        "adm_cifar10": dict(
            img_resolution=32,
            in_channels=3,
            model_channels=128,
            channel_mult=(1, 2, 2, 2),
            num_blocks=3,
            attn_resolutions=(16, 8),
            dropout=0.1,
            scale_shift=True,
            channels_per_head=64,
        ),
        "small": dict(
            model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0, scale_shift=True
        ),
        "small_attn": dict(
            model_channels=32,
            channel_mult=(1, 2, 2),
            num_blocks=1,
            attn_resolutions=(8,),
            dropout=0.0,
            scale_shift=True,
            channels_per_head=32,
        ),
    }

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UNet:
        """Build a named preset (see module docstring); keyword overrides replace preset values."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown UNet preset '{name}'; choose one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})
