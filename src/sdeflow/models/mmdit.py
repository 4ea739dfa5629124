"""MM-DiT, the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024, §4 and Fig. 2).

Image patches and text tokens are two token streams with their own weights (adaLN modulation, QKV projection,
RMS QK-normalisation, output projection, MLP) that meet in one *joint* attention over the concatenated sequence:

    [Q_x; Q_c], [K_x; K_c], [V_x; V_c]  →  softmax(Q Kᵀ/√d + M) V  →  split back into x and c,

with M masking padded text tokens as keys. The conditioning vector of adaLN-Zero is the noise embedding plus an
MLP of the pooled text vector (SD3's ``time_text_embed``); the last block updates only the image stream
("context pre-only"), as its text output would be discarded. Patchify, positions and the final layer are DiT's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.condition import check_text
from .dit import DiT
from .layers import AdaLayerNorm, RMSNorm, attention

__all__ = ["MMDiT", "MMDiTBlock"]


class _Stream(nn.Module):
    """One modality's weights in an MM-DiT block; ``pre_only``: only its attention inputs (no outputs)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        self.norm1 = AdaLayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = AdaLayerNorm(dim)
            hidden = int(dim * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def qkv_heads(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """Q, K, V (B, heads, N, d) of the modulated, normalised stream, and the remaining modulation."""
        params = list(self.ada(c).chunk(2 if self.pre_only else 6, dim=1))
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x, params[0], params[1])).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v, params[2:]

    def finish(self, x: Tensor, a: Tensor, params: list[Tensor]) -> Tensor:
        """x + g₁·proj(attention) then x + g₂·MLP(adaLN(x)): the stream's residual branches."""
        gate1, shift2, scale2, gate2 = params
        x, h = self.norm2.residual(x, self.proj(a), gate1, shift2, scale2)
        return x + gate2[:, None] * self.mlp(h)


class MMDiTBlock(nn.Module):
    """One MM-DiT block: image stream ``x`` (B, N, D) and text stream ``ctx`` (B, L, D) under one attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.x = _Stream(dim, heads, mlp_ratio, qk_norm)
        self.ctx = _Stream(dim, heads, mlp_ratio, qk_norm, pre_only)

    def reset_modulation(self) -> None:
        for s in (self.x, self.ctx):  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(s.ada[-1].weight)
            nn.init.zeros_(s.ada[-1].bias)

    def forward(self, x: Tensor, ctx: Tensor, c: Tensor, ctx_mask: Tensor) -> tuple[Tensor, Tensor]:
        qx, kx, vx, px = self.x.qkv_heads(x, c)
        qc, kc, vc, pc = self.ctx.qkv_heads(ctx, c)
        n = x.shape[1]
        keys = torch.cat([torch.ones_like(ctx_mask[:, :1]).expand(-1, n), ctx_mask], dim=1)  # image keys all valid
        a = attention(torch.cat([qx, qc], 2), torch.cat([kx, kc], 2), torch.cat([vx, vc], 2), keys)
        a = a.transpose(1, 2).flatten(2)  # (B, N + L, D)
        x = self.x.finish(x, a[:, :n], px)
        if not self.ctx.pre_only:
            ctx = self.ctx.finish(ctx, a[:, n:], pc)
        return x, ctx


class MMDiT(DiT):
    """``net(x, c_noise, cond)`` with ``cond`` a :class:`~sdeflow.core.condition.TextCondition` of token width
    ``context_dim`` (pooled width ``pooled_dim``, default the same); ``dit``: :class:`DiT`'s other arguments
    (input_size, patch_size, in_channels, hidden_size, num_heads, mlp_ratio, ...)."""

    def __init__(self, context_dim: int = 384, pooled_dim: int = 0, depth: int = 12, qk_norm: bool = True, **dit: Any):
        if dit.get("num_classes"):
            raise ValueError("MM-DiT is conditioned on text, not class labels (num_classes)")
        super().__init__(depth=0, qk_norm=qk_norm, **dit)  # patchify, positions, noise embedding, final layer
        if context_dim < 1:
            raise ValueError(f"MM-DiT needs the text encoder's width context_dim >= 1, got {context_dim}")
        hidden_size = self.hidden_size
        self.context_dim = context_dim
        self.context_embed = nn.Linear(context_dim, hidden_size)
        self.pooled_embed = nn.Sequential(
            nn.Linear(pooled_dim or context_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.blocks = nn.ModuleList(
            MMDiTBlock(hidden_size, self.num_heads, self.mlp_ratio, qk_norm, pre_only=i == depth - 1)
            for i in range(depth)
        )
        self._init_weights()

    def start(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> tuple[Tensor, Tensor, Any]:
        """(image tokens, noise + pooled-prompt vector, (text tokens, their key mask))."""
        text = check_text(cond, self.context_dim, len(x))
        assert text is not None
        h, c = self.embed(x, c_noise)
        c = c + self.pooled_embed(text.pooled.to(c.dtype))
        return h, c, (self.context_embed(text.tokens.to(h.dtype)), text.mask)

    def step(self, block: nn.Module, h: Tensor, c: Tensor, carry: Any) -> tuple[Tensor, Any]:
        ctx, mask = carry
        h, ctx = block(h, ctx, c, mask)
        return h, (ctx, mask)
