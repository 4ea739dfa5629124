"""A residual MLP with a noise embedding, for 2-D toys and tabular data (the toys' default backbone)."""

from __future__ import annotations

from torch import Tensor, nn

from .layers import LabelEmbedding, NoiseEmbedding

__all__ = ["MLP"]


class _Block(nn.Module):
    def __init__(self, width: int, emb: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb, width)
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        y = nn.functional.silu(self.fc1(self.norm(h)) + self.emb(e))
        return h + self.fc2(self.drop(y))


class MLP(nn.Module):
    """``net(x, c_noise, cond)`` for flat data of shape (B, dim): residual SiLU blocks, additive noise and
    label embeddings, zero-initialised output layer (so the untrained F is exactly 0)."""

    def __init__(
        self,
        dim: int = 2,
        width: int = 256,
        depth: int = 4,
        emb_channels: int = 128,
        num_classes: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.inp = nn.Linear(dim, width)
        self.noise = NoiseEmbedding(emb_channels, emb_channels)
        self.label = LabelEmbedding(num_classes, emb_channels) if num_classes > 0 else None
        self.blocks = nn.ModuleList(_Block(width, emb_channels, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        shape = x.shape
        h = self.inp(x.reshape(len(x), -1))
        e = self.noise(c_noise)
        if self.label is not None:
            e = e + self.label(cond, len(x), x.device)
        e = nn.functional.silu(e)
        for block in self.blocks:
            h = block(h, e)
        return self.out(nn.functional.silu(self.out_norm(h))).reshape(shape)
