"""Normalizing flows with exact likelihood: the invertible layers of NICE, RealNVP and Glow as options of one model.

A flow maps data x to a latent z = f(x) with a tractable Jacobian, so log p(x) = log N(f(x); 0, I) + log|det ∂f/∂x|
exactly (Dinh et al. 2014, eq. 1); :class:`~sdeflow.training.baselines.FlowObjective` trains it. The layers
here, each returning ``(y, logdet)`` per sample with an exact inverse:

- :class:`ActNorm`: y = (x + b)·e^s per channel, initialised from the first batch to zero mean, unit variance
  (Kingma & Dhariwal 2018, §3.1); log det = H·W·Σ s.
- :class:`InvConv1x1`: y = W x at every pixel, W initialised as a random rotation (Glow, §3.2);
  log det = H·W·log|det W|.
- :class:`Coupling`: half the channels (or a checkerboard) pass unchanged and condition the rest: additive
  y_b = x_b + t(x_a) (NICE, log det 0) or affine y_b = x_b·σ(h + 2) + t (RealNVP eq. 7, Glow's sigmoid scale).
- :func:`squeeze`: 2×2 space-to-depth (RealNVP §3.6), volume-preserving.

:class:`Flow` stacks them multi-scale (RealNVP §3.6): at each level squeeze, K steps of ActNorm → 1×1 conv →
coupling (Glow's step; ``kind="additive"`` and no ActNorm/1×1 conv give NICE-like steps), then factor half the
channels out to the prior. This is the flow family the probability-flow ODE's likelihood generalises.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ActNorm", "Coupling", "Flow", "InvConv1x1", "squeeze", "unsqueeze"]


def squeeze(x: Tensor) -> Tensor:
    """(B, C, H, W) → (B, 4C, H/2, W/2), each 2×2 block stacked into channels."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """The inverse of :func:`squeeze`."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, 2 * h, 2 * w)


class ActNorm(nn.Module):
    """Per-channel affine y = (x + b)·e^s, data-initialised on the first forward pass (Glow, §3.1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def _initialise(self, x: Tensor) -> None:
        mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialised.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not bool(self.initialised) and self.training:
            self._initialise(x)
        logdet = x.shape[2] * x.shape[3] * self.log_scale.sum()
        return (x + self.bias) * torch.exp(self.log_scale), logdet.expand(len(x))

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvConv1x1(nn.Module):
    """y = W x at each pixel with W invertible, initialised as a random rotation (Glow, §3.2)."""

    def __init__(self, channels: int, generator: torch.Generator | None = None):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        self.weight = nn.Parameter(q)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.shape[2] * x.shape[3] * torch.linalg.slogdet(self.weight)[1]
        return torch.einsum("ij,bjhw->bihw", self.weight, x), logdet.expand(len(x))

    def inverse(self, y: Tensor) -> Tensor:
        return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.weight), y)


class Coupling(nn.Module):
    """Affine or additive coupling: x = (x_a, x_b) by ``mask`` ('channel' halves or a spatial 'checkerboard');
    y_a = x_a, y_b = x_b·scale(x_a) + t(x_a) with scale = σ(h + 2) (affine) or 1 (additive)."""

    def __init__(self, channels: int, hidden: int = 64, kind: str = "affine", mask: str = "channel"):
        super().__init__()
        if kind not in ("affine", "additive"):
            raise ValueError(f"coupling kind must be 'affine' or 'additive', got '{kind}'")
        if mask not in ("channel", "checkerboard"):
            raise ValueError(f"coupling mask must be 'channel' or 'checkerboard', got '{mask}'")
        if mask == "channel" and channels % 2:
            raise ValueError(f"a channel mask needs an even number of channels, got {channels}")
        self.kind, self.mask = kind, mask
        c_in = channels // 2 if mask == "channel" else channels
        c_out = (channels - c_in if mask == "channel" else channels) * (2 if kind == "affine" else 1)
        self.net = nn.Sequential(
            nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, c_out, 3, padding=1),
        )  # fmt: skip
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity map (Glow, §3.3)
        nn.init.zeros_(self.net[-1].bias)

    def _cond(self, x: Tensor) -> Tensor:
        """The part that passes unchanged and conditions the rest."""
        return x[:, : x.shape[1] // 2] if self.mask == "channel" else x * (1 - self._board(x))

    @staticmethod
    def _board(x: Tensor) -> Tensor:
        """1 on the checkerboard squares the coupling transforms, 0 on those it passes."""
        h, w = x.shape[2:]
        return ((torch.arange(h, device=x.device)[:, None] + torch.arange(w, device=x.device)[None]) % 2).to(x)

    def _scale_shift(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(cond)
        if self.kind == "additive":
            return torch.zeros_like(out), out
        h, t = out.chunk(2, 1)
        return nn.functional.logsigmoid(h + 2.0), t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_s, t = self._scale_shift(self._cond(x))
        if self.mask == "channel":
            a, b = x.chunk(2, 1)
            return torch.cat([a, b * torch.exp(log_s) + t], 1), log_s.flatten(1).sum(1)
        m = self._board(x)
        return x * (1 - m) + m * (x * torch.exp(log_s) + t), (m * log_s).flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        log_s, t = self._scale_shift(self._cond(y))
        if self.mask == "channel":
            a, b = y.chunk(2, 1)
            return torch.cat([a, (b - t) * torch.exp(-log_s)], 1)
        m = self._board(y)
        return y * (1 - m) + m * (y - t) * torch.exp(-log_s)


class Flow(nn.Module):
    """A multi-scale flow over images (C, H, W): ``levels`` × (squeeze, ``steps`` flow steps, factor out half).

    Args:
        glow: each step is ActNorm → invertible 1×1 conv → coupling (Glow); else a coupling alone, with the
            halves swapped between steps by reversing the channel order (RealNVP / NICE).
        kind, mask: the coupling (see :class:`Coupling`).
    """

    def __init__(self, shape: tuple[int, int, int], levels: int = 2, steps: int = 4, hidden: int = 64,
                 kind: str = "affine", mask: str = "channel", glow: bool = True):  # fmt: skip
        super().__init__()
        c, h, w = shape
        if h % 2**levels or w % 2**levels:
            raise ValueError(f"image size {h}×{w} must be divisible by 2^levels = {2**levels}")
        self.shape, self.glow = tuple(shape), glow
        self.levels = nn.ModuleList()
        for level in range(levels):
            c *= 4
            layers: list[nn.Module] = []
            for _ in range(steps):
                layers += [ActNorm(c), InvConv1x1(c)] if glow else []
                layers.append(Coupling(c, hidden, kind, mask))
            self.levels.append(nn.ModuleList(layers))
            c = c // 2 if level < levels - 1 else c

    def _step(self, layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        y, logdet = layer(x)
        return (y if self.glow or not isinstance(layer, Coupling) else y.flip(1)), logdet

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """The latents (one per level) and log|det ∂z/∂x| per sample."""
        zs, logdet = [], x.new_zeros(len(x))
        for i, level in enumerate(self.levels):
            x = squeeze(x)
            for layer in level:
                x, ld = self._step(layer, x)
                logdet = logdet + ld
            if i < len(self.levels) - 1:
                x, z = x.chunk(2, 1)
                zs.append(z)
        return [*zs, x], logdet

    def inverse(self, zs: list[Tensor]) -> Tensor:
        x = zs[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                x = torch.cat([x, zs[i]], 1)
            for layer in reversed(self.levels[i]):
                if not self.glow and isinstance(layer, Coupling):
                    x = x.flip(1)
                x = layer.inverse(x)
            x = unsqueeze(x)
        return x

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) in nats: Σ log N(z; 0, I) + log|det ∂z/∂x| (Dinh et al. 2014, eq. 1)."""
        return self.log_prob_of(*self(x))

    @staticmethod
    def log_prob_of(zs: list[Tensor], logdet: Tensor) -> Tensor:
        """log p(x) from the output ``(zs, logdet)`` of :meth:`forward` (lets a wrapped forward be used)."""
        log_2pi = torch.log(torch.tensor(2 * torch.pi, dtype=zs[0].dtype))
        prior = sum((-0.5 * (z**2 + log_2pi)).flatten(1).sum(1) for z in zs)
        return prior + logdet

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """x = f⁻¹(z) with z ~ N(0, T² I): temperature T < 1 trades diversity for quality (Glow, §5)."""
        shapes, (c, h, w) = [], self.shape
        for i in range(len(self.levels)):
            c, h, w = c * 4, h // 2, w // 2
            if i < len(self.levels) - 1:
                shapes.append((c // 2, h, w))
                c //= 2
        shapes.append((c, h, w))
        p = next(self.parameters())
        where = generator.device if generator is not None else "cpu"
        zs = [temperature * torch.randn((n, *s), generator=generator, dtype=p.dtype, device=where).to(p.device)
              for s in shapes]  # fmt: skip
        return self.inverse(zs)
