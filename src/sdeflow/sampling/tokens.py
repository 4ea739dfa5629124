"""Drawing discrete tokens from a model's logits: temperature, top-k, nucleus (top-p) and classifier-free guidance.

- temperature T: p ∝ exp(ℓ / T); T < 1 sharpens, T > 1 flattens (T → 0 is greedy decoding).
- top-k (Fan et al. 2018): only the k most likely tokens keep their mass.
- top-p (Holtzman et al. 2020, §3.1): the smallest set of most likely tokens whose mass reaches p keeps it.
- guidance on logits (the autoregressive form of Ho & Salimans 2022, as in Parti / MUSE): ℓ = ℓ_∅ + w (ℓ_c − ℓ_∅).

Draws are an inverse CDF of one uniform per row, so a generator on any device repeats them exactly.
:func:`sample_codes` draws whole sequences from a :class:`~sdeflow.models.vq_transformer.VQTransformer`, one code
at a time, from its KV cache.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models.vq_transformer import KVCache, VQTransformer

__all__ = ["check_token_sampling", "draw_tokens", "filter_logits", "guided_logits", "sample_codes"]


def check_token_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab: int | None = None) -> None:
    """One clear message for a temperature ≤ 0, a top-p outside (0, 1] or a top-k < 1 (or above the vocabulary)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r} (for greedy decoding use top_k=1)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if top_k is not None and (top_k < 1 or (vocab is not None and top_k > vocab)):
        raise ValueError(f"top_k must lie in [1, {vocab or 'vocabulary size'}], got {top_k!r}")


def guided_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """ℓ_∅ + w (ℓ_c − ℓ_∅): w = 1 is the conditional model, w = 0 the unconditional one."""
    return uncond + scale * (cond - uncond)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """``logits`` (..., V) with the tokens outside the top-k and outside the nucleus of mass top-p set to −∞.
    The most likely token always stays."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        ordered, index = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # the mass of the more likely tokens
        drop = (before >= top_p).scatter(-1, index, before >= top_p)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def draw_tokens(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row of ``logits`` (B, V) from softmax(filter(ℓ) / T)."""
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    gdev = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape[0], 1, generator=generator, device=gdev).to(logits.device)
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return token.squeeze(1).clamp_max(logits.shape[-1] - 1)


@torch.no_grad()
def sample_codes(
    prior: VQTransformer,
    n: int,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Tensor:
    """n code sequences (n, seq_len) from ``prior``. ``cfg_scale``: guide the logits of ``labels`` against the null
    class (both run, in one batch; 1 gives the conditional model); None: the conditional (or unconditional) model
    alone. ``use_cache=False`` recomputes the whole prefix at every step (the reference the cache is tested against)."""
    check_token_sampling(temperature, top_k, top_p, prior.vocab_size)
    device = prior.head.weight.device
    guided = cfg_scale is not None and prior.num_classes > 0
    if guided and labels is None:
        raise ValueError("classifier-free guidance needs labels to guide towards")
    cond = prior.condition_index(labels, n, device)
    if guided:
        cond = torch.cat([cond, torch.full_like(cond, prior.num_classes)])
    copies = len(cond) // n
    cache = None
    if use_cache:
        cache = KVCache(len(prior.blocks), len(cond), prior.heads, prior.seq_len, prior.width // prior.heads,
                        prior.head.weight)  # fmt: skip
    codes = torch.zeros(n, 0, dtype=torch.long, device=device)
    steps = range(prior.seq_len)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="VQ-Transformer", leave=False)
    for i in steps:
        if cache is not None:
            logits = prior.step(None if i == 0 else codes[:, -1].repeat(copies), cond, cache)
        else:
            logits = prior(codes.repeat(copies, 1), cond)[:, -1]
        if guided:
            logits = guided_logits(*logits.float().chunk(2), cfg_scale)  # type: ignore[arg-type]
        codes = torch.cat([codes, draw_tokens(logits, temperature, top_k, top_p, generator)[:, None]], 1)
    return codes
