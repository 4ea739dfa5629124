"""VQGAN's second stage (Esser et al. 2021, §3.2): a decoder-only Transformer over the raster-ordered code indices
of a VQ autoencoder, p(s) = ∏_i p(s_i | s_<i, c), trained by cross-entropy and sampled one token at a time.

The condition c (a class, or none) is the first input token, so the model predicts s_1 from c alone (as VQGAN's
class-conditional models prepend the class token). Attention is causal SDPA; sampling keeps every layer's keys
and values of the tokens so far (:class:`KVCache`) so that each new token costs one position, not the whole
prefix. Classifier-free guidance acts on the logits (:func:`~sdeflow.sampling.tokens.guided_logits`); the null
condition is an extra class index learned through label dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.condition import NULL_LABEL
from .autoregressive import at_least_fp32

__all__ = ["KVCache", "VQTransformer"]


class KVCache:
    """Each layer's keys and values of the first ``length`` positions, in (layers, B, heads, L_max, d) buffers."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int, like: Tensor):
        shape = (layers, batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new positions' k, v (B, heads, T, d) after the stored ones; return all of them."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class _Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) (GPT-2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU("tanh"), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        causal = True
        if cache is not None:
            causal = cache.length == 0  # later steps add one position, which may see every stored one
            k, v = cache.store(layer, k, v)
        drop = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=drop)
        x = x + F.dropout(self.proj(h.transpose(1, 2).reshape(b, t, -1)), drop, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), drop, self.training)


class VQTransformer(nn.Module):
    """Logits of each code given the codes before it and a class (sampled by
    :func:`sdeflow.sampling.tokens.sample_codes`).

    Args:
        vocab_size: the VQ autoencoder's codebook size.
        seq_len: codes per image (H·W of the latent grid).
        num_classes: 0 for an unconditional prior; else classes 0 … num_classes − 1 and a learned null class.
        width, depth, heads, mlp_ratio, dropout: the Transformer's.
    """

    def __init__(self, vocab_size: int, seq_len: int, num_classes: int = 0, width: int = 256, depth: int = 6,
                 heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0):  # fmt: skip
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.vocab_size, self.seq_len, self.num_classes = vocab_size, seq_len, num_classes
        self.width, self.heads = width, heads
        self.tokens = nn.Embedding(vocab_size, width)
        self.condition = nn.Embedding(num_classes + 1, width)  # index num_classes: the null / only condition
        self.positions = nn.Parameter(torch.zeros(seq_len, width))
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self.apply(self._init)
        nn.init.normal_(self.positions, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def condition_index(self, labels: Tensor | None, n: int, device: torch.device) -> Tensor:
        if labels is None or self.num_classes == 0:
            return torch.full((n,), self.num_classes, dtype=torch.long, device=device)
        return torch.where(labels == NULL_LABEL, self.num_classes, labels).long()

    def _run(self, h: Tensor, cache: KVCache | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            h = block(h, cache, i)
        if cache is not None:
            cache.length += h.shape[1]
        return self.head(self.norm(h))

    def forward(self, prefix: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits (B, T + 1, V) of codes 0 … T given ``prefix`` (B, T), the first T codes (T < seq_len)."""
        b, t = prefix.shape
        if t >= self.seq_len:
            raise ValueError(f"a prefix of {t} codes leaves nothing to predict (sequence length {self.seq_len})")
        start = self.condition(self.condition_index(labels, b, prefix.device))[:, None]
        h = torch.cat([start, self.tokens(prefix)], 1) + self.positions[: t + 1]
        return self._run(h)

    @staticmethod
    def log_prob_of(logits: Tensor, codes: Tensor) -> Tensor:
        """Σ_i log softmax(ℓ_i)[s_i] per sequence (nats) from logits (B, L, V) of codes (B, L)."""
        return -F.cross_entropy(at_least_fp32(logits).transpose(1, 2), codes, reduction="none").sum(1)

    def log_prob(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        """log p(codes | labels) = Σ_i log p(s_i | s_<i, c) per sequence (nats); codes (B, seq_len)."""
        return self.log_prob_of(self(codes[:, :-1], labels), codes)

    def step(self, last: Tensor | None, labels: Tensor | None, cache: KVCache) -> Tensor:
        """Logits (B, V) of the next code from the cache and the code drawn last (None at the first step)."""
        i = cache.length
        if last is None:
            h = self.condition(self.condition_index(labels, cache.k.shape[1], cache.k.device))
        else:
            h = self.tokens(last)
        return self._run((h + self.positions[i])[:, None], cache)[:, 0]
