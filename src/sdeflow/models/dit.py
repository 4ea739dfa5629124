"""Diffusion Transformer (Peebles & Xie 2023), with SD3's RMS QK-normalisation as an option.

Patchify (a p×p strided convolution) → fixed 2-D sine-cosine positional embedding → N transformer blocks
conditioned by adaLN-Zero: each block regresses (shift, scale, gate) for its attention and MLP branches
from the summed noise and class embeddings; the regression layers are zero-initialised so every block
starts as the identity → a final adaLN layer and a zero-initialised linear unpatchify.

Presets (Peebles & Xie 2023, Table 1): S (384 wide, 12 deep, 6 heads), B (768, 12, 12), L (1024, 24, 16),
XL (1152, 28, 16), each with patch size 2, 4 or 8: ``DiT.preset("DiT-B/2", input_size=32, in_channels=4)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .layers import AdaLayerNorm, LabelEmbedding, PositionalEmbedding, RMSNorm, attention

__all__ = ["DiT", "sincos_pos_embed_2d"]


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """(grid², dim) fixed 2-D sine-cosine embedding: half the channels encode the row, half the column
    (MAE / DiT), with frequencies 1/10000^{2i/(dim/2)}."""
    if dim % 4:
        raise ValueError(f"the embedding width must be divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def emb(pos: Tensor) -> Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([emb(xx), emb(yy)], dim=1).float()


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        self.norm1 = AdaLayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.norm2 = AdaLayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.reset_modulation()

    def reset_modulation(self) -> None:
        nn.init.zeros_(self.ada[-1].weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x, sh1, sc1)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d_head)
        a = attention(self.q_norm(q), self.k_norm(k), v).transpose(1, 2).reshape(b, n, d)
        x, h = self.norm2.residual(x, self.proj(a), g1, sh2, sc2)  # x + g₁·proj(a), and adaLN of it
        return x + g2[:, None] * self.mlp(h)


class DiT(nn.Module):
    """``net(x, c_noise, cond)`` on images/latents (B, C, H, W) with H = W = input_size."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        qk_norm: bool = False,
        noise_scale: float = 1.0,
        freq_channels: int = 256,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.input_size, self.patch, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.num_heads, self.mlp_ratio, self.qk_norm = hidden_size, num_heads, mlp_ratio, qk_norm
        self.out_channels = out_channels or in_channels
        self.grid = input_size // patch_size
        self.patchify = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.t_freq = PositionalEmbedding(freq_channels, scale=noise_scale)
        self.t_mlp = nn.Sequential(
            nn.Linear(freq_channels, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.y_emb = LabelEmbedding(num_classes, hidden_size) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_norm = AdaLayerNorm(hidden_size)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():  # DiT: xavier-uniform linear layers, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patchify.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patchify.bias)
        for m in self.t_mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        if self.y_emb is not None:
            nn.init.normal_(self.y_emb.table.weight, std=0.02)
        for blk in self.blocks:
            blk.reset_modulation()
        for layer in (self.final_ada[-1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def start(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> tuple[Tensor, Tensor, Any]:
        """(patch tokens, conditioning vector, what the blocks carry besides: nothing here; MM-DiT's text stream)."""
        h, c = self.embed(x, c_noise)
        if self.y_emb is not None:
            c = c + self.y_emb(cond, len(x), x.device)
        return h, c, None

    def step(self, block: nn.Module, h: Tensor, c: Tensor, carry: Any) -> tuple[Tensor, Any]:
        """One block on the tokens (and on what the blocks carry)."""
        return block(h, c), carry

    def forward(self, x: Tensor, c_noise: Tensor, cond: Any = None, residuals: tuple[list[Tensor], None] | None = None
                ) -> Tensor:  # fmt: skip
        """``residuals``: a ControlNet's, one per leading block, added to the image tokens after that block (the
        ControlNet-Transformer of PixArt-δ, Chen et al. 2024, §3; SD3's ControlNets alike)."""
        h, c, carry = self.start(x, c_noise, cond)
        extra = residuals[0] if residuals is not None else []
        for i, blk in enumerate(self.blocks):
            h, carry = self.step(blk, h, c, carry)
            if i < len(extra):
                h = h + extra[i]
        return self.unpatchify(h, c)

    def embed(self, x: Tensor, c_noise: Tensor) -> tuple[Tensor, Tensor]:
        """(patch tokens + positions (B, N, D), noise embedding (B, D))."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__} expects (B, {self.in_channels}, {self.input_size}, {self.input_size}) input, "
                f"got {tuple(x.shape)}"
            )
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        return h, self.t_mlp(self.t_freq(c_noise))

    def unpatchify(self, h: Tensor, c: Tensor) -> Tensor:
        """The final adaLN layer and linear map of tokens (B, N, D) back to an image (B, C, H, W)."""
        b = len(h)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        h = self.final(self.final_norm(h, shift, scale))  # (B, N, p*p*C)
        p, g, co = self.patch, self.grid, self.out_channels
        h = h.reshape(b, g, g, p, p, co).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, co, g * p, g * p)

    SIZES: dict[str, tuple[int, int, int]] = {  # noqa: RUF012
        "S": (384, 12, 6),
        "B": (768, 12, 12),
        "L": (1024, 24, 16),
        "XL": (1152, 28, 16),
    }

    @classmethod
    def preset(cls, name: str, **kwargs: Any) -> DiT:
        """``DiT-{S,B,L,XL}/{2,4,8}`` (Peebles & Xie 2023, Table 1); ``MMDiT-…`` for :class:`MMDiT`."""
        prefix = cls.__name__
        try:
            size, patch = name.removeprefix(f"{prefix}-").split("/")
            hidden, depth, heads = cls.SIZES[size]
            patch_size = int(patch)
        except (ValueError, KeyError):
            raise ValueError(f"unknown {prefix} preset '{name}'; use {prefix}-{{S,B,L,XL}}/{{2,4,8}}") from None
        return cls(patch_size=patch_size, hidden_size=hidden, depth=depth, num_heads=heads, **kwargs)
