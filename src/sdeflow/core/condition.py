"""Conditions a denoiser takes besides x and σ: class labels (a (B,) tensor, -1 for none) or encoded text.

Samplers pass ``cond`` through untouched; only guidance needs to batch two conditions together and to know the
"no condition" of a batch. :func:`cat_conditions` and :func:`null_condition` do that for both kinds, so
classifier-free guidance is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["NULL_LABEL", "ControlCondition", "TextCondition", "cat_conditions", "check_text", "null_condition"]

NULL_LABEL = -1  # the "no label" of class-conditional models (classifier-free guidance, label dropout)


@dataclass
class TextCondition:
    """Encoded prompts: ``tokens`` (B, L, D) per-token embeddings, ``mask`` (B, L) True at real tokens (False
    at padding, which attention must ignore), ``pooled`` (B, P) one vector per prompt.

    Prompts of different lengths are padded to the longest; a network's output must not depend on how much
    padding there is (key padding masks), which is what lets prompts of any length share a batch."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __post_init__(self) -> None:
        b, length = self.tokens.shape[:2]
        if self.tokens.ndim != 3 or self.mask.shape != (b, length) or self.pooled.ndim != 2 or len(self.pooled) != b:
            raise ValueError(
                f"a TextCondition needs tokens (B, L, D), mask (B, L) and pooled (B, P); got {tuple(self.tokens.shape)}"
                f", {tuple(self.mask.shape)}, {tuple(self.pooled.shape)}"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def shape(self) -> torch.Size:
        """The token tensor's shape (B, L, D): with the dtype, what a CUDA graph of this condition is keyed by."""
        return self.tokens.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.dtype

    def clone(self) -> TextCondition:
        return TextCondition(self.tokens.clone(), self.mask.clone(), self.pooled.clone())

    def copy_(self, other: TextCondition) -> TextCondition:
        """In place, as ``Tensor.copy_`` (the static inputs of a CUDA graph)."""
        self.tokens.copy_(other.tokens)
        self.mask.copy_(other.mask)
        self.pooled.copy_(other.pooled)
        return self

    def __getitem__(self, rows: slice | Tensor | int) -> TextCondition:
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return TextCondition(self.tokens[rows], self.mask[rows], self.pooled[rows])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextCondition:
        return TextCondition(self.tokens.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype))

    def expand(self, n: int) -> TextCondition:
        """A batch of one repeated n times (the null prompt of a whole batch)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a batch of {len(self)} prompts to {n}")
        return TextCondition(self.tokens.expand(n, -1, -1), self.mask.expand(n, -1), self.pooled.expand(n, -1))

    @staticmethod
    def cat(parts: list[TextCondition]) -> TextCondition:
        """Rows of several conditions in one batch, padded (mask False) to the longest."""
        length = max(p.tokens.shape[1] for p in parts)

        def pad(p: TextCondition) -> tuple[Tensor, Tensor]:
            extra = length - p.tokens.shape[1]
            if not extra:
                return p.tokens, p.mask
            t = torch.nn.functional.pad(p.tokens, (0, 0, 0, extra))
            return t, torch.nn.functional.pad(p.mask, (0, extra), value=False)

        padded = [pad(p) for p in parts]
        return TextCondition(
            torch.cat([t for t, _ in padded]), torch.cat([m for _, m in padded]), torch.cat([p.pooled for p in parts])
        )


@dataclass
class ControlCondition:
    """A network's own condition ``cond`` (labels, text or None) and the control images of its ControlNets
    (one (B, C, H, W) tensor each). Guidance keeps the control images in both branches: only ``cond`` has a null."""

    cond: Tensor | TextCondition | None
    images: tuple[Tensor, ...]

    def __len__(self) -> int:
        return len(self.images[0])


def cat_conditions(a: Any, b: Any) -> Any:
    """The rows of ``a`` then those of ``b``, for one batched network call."""
    if isinstance(a, ControlCondition) and isinstance(b, ControlCondition):
        inner = None if a.cond is None else cat_conditions(a.cond, b.cond)
        return ControlCondition(inner, tuple(torch.cat([p, q]) for p, q in zip(a.images, b.images, strict=True)))
    if isinstance(a, TextCondition) and isinstance(b, TextCondition):
        return TextCondition.cat([a, b])
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b.to(a.device)])
    raise TypeError(f"cannot batch a {type(a).__name__} condition with a {type(b).__name__} one")


def null_condition(cond: Any, null: Tensor | TextCondition | None, batch: int):
    """The "no condition" for a batch conditioned on ``cond``: ``null`` (one row or ``batch`` rows) when given,
    else the null label for class labels. Text has no intrinsic null: pass the encoded empty (or negative)
    prompt. A control condition keeps its images."""
    if isinstance(cond, ControlCondition):
        if cond.cond is None:
            raise ValueError("classifier-free guidance needs a conditional model; this one takes control images only")
        return ControlCondition(null_condition(cond.cond, null, batch), cond.images)
    if null is not None:
        if isinstance(null, TextCondition):
            return null.expand(batch)
        return null.expand(batch) if null.numel() == 1 else null
    if isinstance(cond, TextCondition):
        raise ValueError(
            "classifier-free guidance on text needs the null prompt: pass null=encoder.encode(['']) (or a negative "
            "prompt)"
        )
    return torch.full_like(cond, NULL_LABEL)


def check_text(cond: object, context_dim: int, batch: int) -> TextCondition | None:
    """``cond`` as the text condition of a network with token width ``context_dim`` (0: no text), refused with
    the mismatch named where it does not fit."""
    if not context_dim:
        if isinstance(cond, TextCondition):
            raise ValueError("this network is not text-conditioned (context_dim = 0): it takes class labels or None")
        return None
    if not isinstance(cond, TextCondition):
        raise ValueError(
            "this network is text-conditioned: cond must be a TextCondition (encode the prompts with the run's "
            f"text encoder), got {type(cond).__name__}"
        )
    if cond.tokens.shape[-1] != context_dim or len(cond) != batch:
        raise ValueError(
            f"the text condition has {len(cond)} prompts of width {cond.tokens.shape[-1]}; the network takes "
            f"{batch} of width {context_dim}"
        )
    return cond
