"""Sampling from prompts: strings → encoded condition → (guided) sampling, in one call.

Classifier-free guidance on text (Ho & Salimans 2022; as in GLIDE, Imagen and Stable Diffusion) uses the
encoded empty prompt as ∅; a negative prompt takes its place, so guidance pushes samples away from it:
D_w = D(x; neg) + w (D(x; prompt) − D(x; neg)).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..core.condition import TextCondition
from ..core.preconditioning import DenoiserFn
from ..core.process import Process
from ..models.text_encoder import TextEncoder
from .generate import SampleResult, sample
from .guidance import ClassifierFreeGuidance

__all__ = ["encode_prompts", "sample_prompts"]


def encode_prompts(encoder: TextEncoder, prompts: list[str], device: torch.device | str = "cpu") -> TextCondition:
    """The prompts encoded on ``device``; an empty prompt is allowed (it asks for an unconditional sample) and
    said so, since it is more often a mistake than a wish."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    if any(not p.strip() for p in prompts):
        warnings.warn("an empty prompt samples unconditionally (the model's null condition)", stacklevel=3)
    return encoder.encode(prompts).to(device)


def sample_prompts(
    model: DenoiserFn,
    encoder: TextEncoder,
    prompts: list[str],
    data_shape: tuple[int, ...],
    process: Process,
    guidance: float = 1.0,
    negative_prompt: str = "",
    interval: tuple[float, float] | None = None,
    device: torch.device | str = "cpu",
    **options: Any,
) -> SampleResult:
    """One sample per prompt from a text-conditioned denoiser, guided with weight ``guidance`` (1: none).

    ``options`` go to :func:`~sdeflow.sampling.sample` (sampler, steps, schedule, seed, progress, ...)."""
    cond = encode_prompts(encoder, prompts, device)
    den = model
    if guidance != 1.0:
        null = encoder.encode([negative_prompt]).to(device)
        den = ClassifierFreeGuidance(model, guidance, interval, null=null)
    return sample(den, (len(cond), *data_shape), process, cond=cond, device=device, **options)
