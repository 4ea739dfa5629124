"""Text conditioning inside a UNet: Stable Diffusion's spatial transformer (Rombach et al. 2022, §3.3).

A feature map (B, C, H, W) becomes H·W tokens; one transformer block attends to itself, then to the text tokens
(cross-attention, Q from the image and K, V from the text, padded text tokens masked out), then applies a GEGLU
feed-forward (Shazeer 2020), each a pre-LayerNorm residual branch; a zero-initialised output projection makes
the whole block start as the identity, as LDM's ``SpatialTransformer`` does.

``positions`` (the feature map's side): add a fixed 2-D sine-cosine embedding (as DiT's) to the image tokens.
Convolutions and attention are (nearly) translation-equivariant, so without it the block cannot tell *where* a
prompt asks for something ("at the top left"): measured on captioned shapes, a UNet without it places objects at
chance (README).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .dit import sincos_pos_embed_2d
from .layers import GroupNorm, attention

__all__ = ["GEGLU", "CrossAttention", "SpatialTransformer"]


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (B, N, dim) to ``context`` (B, L, context_dim), or to itself when
    ``context`` is None; ``key_mask`` (B, L) False at padded context tokens."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"the attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        src = x if context is None else context.to(x.dtype)
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(src)), self._heads(self.to_v(src))
        a = attention(q, k, v, key_mask if context is not None else None)
        return self.to_out(a.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """FF(x) = W₂ (a ⊙ GELU(g)), [a, g] = W₁ x (Shazeer 2020), SD's feed-forward with ``mult``× inner width."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """x + proj_out(Block(proj_in(GroupNorm(x)))) with Block = self-attention, cross-attention to the text,
    GEGLU, each pre-LN and residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, positions: int = 0):
        super().__init__()
        if positions and channels % 4:
            raise ValueError(f"token positions need a width divisible by 4, got {channels}")
        self.positions = positions
        if positions:  # a buffer: moved with the module, no host work per call
            self.register_buffer("pos", sincos_pos_embed_2d(channels, positions)[None], persistent=False)
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(channels) for _ in range(3))
        self.attn1 = CrossAttention(channels, heads)
        self.attn2 = CrossAttention(channels, heads, context_dim)
        self.ff = GEGLU(channels)
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)  # starts as the identity (LDM's zero_module)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))  # NHWC memory: a free view
        if self.positions:
            if h != self.positions or w != self.positions:
                raise ValueError(f"token positions were built for {self.positions}² feature maps, got {h}×{w}")
            t = t + self.pos.to(t.dtype)
        t = t + self.attn1(self.norm1(t))
        t = t + self.attn2(self.norm2(t), context, key_mask)
        t = t + self.ff(self.norm3(t))
        out = self.proj_out(t).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + out
