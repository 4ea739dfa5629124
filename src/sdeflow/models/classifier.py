"""Noise-conditional classifiers p(y | x̃; σ) for classifier guidance (Dhariwal & Nichol 2021, §4).

Inputs are preconditioned as in EDM (c_in = 1/√(σ² + σ_d²), c_noise = ¼ ln σ), so one classifier serves every
process in σ-space. Images use the encoder half of the UNet (ADM's classifier); vectors a residual MLP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import NoiseEmbedding
from .unet import UNet

__all__ = ["NoisyClassifier"]


class NoisyClassifier(nn.Module):
    """``forward(x̃, σ) -> logits`` and ``log_probs(x̃, σ) -> log p(y | x̃; σ)``."""

    def __init__(
        self,
        shape: tuple[int, ...],
        num_classes: int,
        sigma_data: float = 0.5,
        width: int = 128,
        unet: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.shape, self.num_classes, self.sigma_data = tuple(shape), num_classes, sigma_data
        if len(shape) == 3:
            kw = {
                "model_channels": 32,
                "channel_mult": (1, 2),
                "num_blocks": 1,
                "attn_resolutions": (),
                "dropout": 0.0,
                "scale_shift": True,
                **(unet or {}),
            }
            body = UNet(img_resolution=shape[-1], in_channels=shape[0], **kw)
            self.noise_emb, self.enc = body.noise_emb, body.enc  # the encoder half only
            ch = body.enc[list(body.enc)[-1]].conv1.out_channels
            self.head = nn.Sequential(
                nn.GroupNorm(min(32, ch // 4), ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(ch, num_classes),
            )
        else:
            dim = int(torch.tensor(shape).prod())
            self.noise_emb = NoiseEmbedding(width, width)
            self.inp = nn.Linear(dim, width)
            self.mlp = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
            self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(len(x))
        c_in = torch.rsqrt(sigma**2 + self.sigma_data**2).reshape(-1, *([1] * (x.ndim - 1)))
        emb = self.noise_emb(torch.log(sigma) / 4)
        h = (c_in * x).to(emb.dtype)
        if hasattr(self, "enc"):
            e = F.silu(emb)
            for m in self.enc.values():
                h = m(h) if isinstance(m, nn.Conv2d) else m(h, e)
            return self.head(h)
        h = self.inp(h.reshape(len(x), -1)) + emb
        for layer in self.mlp:
            h = h + layer(F.silu(h))
        return self.head(F.silu(h))

    def log_probs(self, x: Tensor, sigma: Tensor) -> Tensor:
        return torch.log_softmax(self(x, sigma), dim=1)
