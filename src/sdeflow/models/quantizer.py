"""Vector quantisation with an EMA codebook (van den Oord et al. 2017, §3.2 and appendix A.1).

Each latent vector z is replaced by its nearest code e_k, k = argmin_j ‖z − e_j‖² (with ``cosine=True`` both are
l2-normalised first, as in ViT-VQGAN, Yu et al. 2022). Gradients pass straight through: z_q = z + sg(e_k − z), so
∂z_q/∂z = I. The codebook is not trained by gradients but by exponential moving averages of the assignments:

    N_k ← γ N_k + (1 − γ) n_k,   m_k ← γ m_k + (1 − γ) Σ_{i: k_i = k} z_i,   e_k = m_k / Ñ_k,

with Laplace smoothing Ñ_k = (N_k + ε) / (Σ_j N_j + Kε) · Σ_j N_j so an unused code never divides by zero. Codes
whose N_k falls below ``dead_threshold`` are restarted on random latents of the batch (Dhariwal et al. 2020,
Jukebox §2.3 "random restarts"). The encoder is pulled towards its codes by the commitment loss ‖z − sg(e)‖²,
which the objective weights by β.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Quantized", "VectorQuantizer", "perplexity"]


class Quantized(NamedTuple):
    quantized: Tensor  # z + sg(e − z): the codes forward, the identity backward
    codes: Tensor  # (B, H, W) indices
    commitment: Tensor  # mean ‖z − sg(e)‖² per element
    perplexity: Tensor  # exp(entropy of the batch's code frequencies): 1 … K codes in use


def perplexity(codes: Tensor, num_codes: int) -> Tensor:
    """exp(−Σ_k p_k log p_k) of the code frequencies p_k in ``codes``."""
    p = torch.bincount(codes.flatten(), minlength=num_codes).double() / codes.numel()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation of (B, D, H, W) latents over a K × D codebook updated by EMA."""

    def __init__(
        self, num_codes: int, dim: int, decay: float = 0.99, eps: float = 1e-5, cosine: bool = False,
        dead_threshold: float = 1e-2,
    ):  # fmt: skip
        super().__init__()
        if num_codes < 1:
            raise ValueError(f"the codebook needs at least one code, got codebook_size = {num_codes}")
        self.num_codes, self.dim, self.decay, self.eps = num_codes, dim, decay, eps
        self.cosine, self.dead_threshold = cosine, dead_threshold
        self.register_buffer("codebook", torch.randn(num_codes, dim))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", torch.zeros(num_codes, dim))
        self.register_buffer("initialised", torch.tensor(False))

    def _norm(self, v: Tensor) -> Tensor:
        return F.normalize(v, dim=-1) if self.cosine else v

    def nearest(self, flat: Tensor) -> Tensor:
        """argmin_k ‖z − e_k‖² = argmin_k (‖e_k‖² − 2 z·e_k) for each row of ``flat`` (N, D)."""
        e = self._norm(self.codebook)
        return torch.argmin(e.square().sum(1) - 2 * flat @ e.T, dim=1)

    def embed(self, codes: Tensor) -> Tensor:
        """The (B, D, H, W) code vectors of (B, H, W) indices."""
        return self._norm(self.codebook)[codes].permute(0, 3, 1, 2)

    def forward(self, z: Tensor, generator: torch.Generator | None = None, update: bool = True) -> Quantized:
        """Quantise ``z``; in training mode (and ``update``) also take one EMA step of the codebook."""
        b, d, h, w = z.shape
        flat = self._norm(z.float().permute(0, 2, 3, 1).reshape(-1, d))
        update = update and self.training
        if update and not bool(self.initialised):  # codes start on latents of the first batch
            self._restart(flat, torch.ones(self.num_codes, dtype=torch.bool, device=z.device), generator)
            self.initialised.fill_(True)
        codes = self.nearest(flat)
        if update:
            self.ema_update(flat, codes, generator)
        e = self._norm(self.codebook)[codes]
        commitment = (flat - e.detach()).square().mean()
        quantized = (flat + (e - flat).detach()).reshape(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        return Quantized(quantized, codes.reshape(b, h, w), commitment, perplexity(codes, self.num_codes))

    @torch.no_grad()
    def ema_update(self, flat: Tensor, codes: Tensor, generator: torch.Generator | None = None) -> None:
        """One EMA step of the counts N and sums m, the codebook e = m / Ñ, then restarts of dead codes."""
        one_hot = F.one_hot(codes, self.num_codes).to(flat.dtype)
        self.cluster_size.mul_(self.decay).add_(one_hot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(one_hot.T @ flat, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        self._restart(flat, self.cluster_size < self.dead_threshold, generator)

    def _restart(self, flat: Tensor, dead: Tensor, generator: torch.Generator | None) -> None:
        """Move the ``dead`` codes onto random rows of ``flat`` with count 1."""
        n = int(dead.sum())
        if n == 0:
            return
        pick = torch.randint(len(flat), (n,), generator=generator, device=generator.device if generator else None)
        new = flat.detach()[pick.to(flat.device)]
        self.codebook[dead] = new
        self.embed_sum[dead] = new
        self.cluster_size[dead] = 1.0
