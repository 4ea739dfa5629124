"""Autoregressive density models: p(x) = ∏_i p(x_i | x_<i), exact log-likelihoods.

- :class:`MADE` (Germain et al. 2015): an MLP whose weight masks make output d depend only on inputs earlier in an
  ordering; hidden unit k gets a degree m(k) ∈ [1, D − 1] and connects to units of degree ≤ m(k) below it, outputs
  to hidden units of degree < m(d) (eq. 12–13). ``num_orders`` > 1 trains over several orderings and connectivities
  (order-agnostic training, §4); Bernoulli outputs for binarised images.
- :func:`discretized_logistic_mixture_log_prob`: PixelCNN++'s likelihood of 8-bit values (Salimans et al. 2017,
  eq. 2): a mixture of logistics integrated over each value's bin, the edge bins taking the tails.

- :class:`PixelCNN`: a single-resolution PixelCNN++ (Salimans et al. 2017): shifted causal convolutions in a
  vertical and a horizontal stack (no blind spot), gated residual blocks, the mixture above per pixel.

VQGAN's second stage, a Transformer over VQ codes, is :mod:`sdeflow.models.vq_transformer`; the objective that
trains all three through the loop is :mod:`sdeflow.training.autoregressive`.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MADE", "MaskedLinear", "PixelCNN", "at_least_fp32", "discretized_logistic_mixture_log_prob", "made_masks"]


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it is already: likelihoods summed over many terms need the precision."""
    return t if t.dtype == torch.float64 else t.float()


class MaskedLinear(nn.Linear):
    """y = (W ⊙ M) x + b with a fixed 0/1 mask M (a buffer, replaced by :meth:`set_mask`)."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__(fan_in, fan_out)
        self.register_buffer("mask", torch.ones(fan_out, fan_in))

    def set_mask(self, mask: Tensor) -> None:
        self.mask.copy_(mask.to(self.mask.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def made_masks(order: np.ndarray, hidden: list[int], rng: np.random.Generator) -> list[Tensor]:
    """The masks of a MADE with input ordering ``order`` (order[d] = position of input d, 1..D) and hidden widths
    ``hidden``: hidden degrees drawn uniformly in [min degree below, D − 1]; M = [m_l(k) ≥ m_{l−1}(j)] between
    hidden layers, M = [m_out(d) > m_L(k)] into the outputs (strict: output d never sees input d)."""
    d = len(order)
    degrees = [np.asarray(order)]
    for width in hidden:
        low = min(int(degrees[-1].min()), d - 1)
        degrees.append(rng.integers(low, d, size=width))  # in [low, D − 1]
    masks = [torch.from_numpy((degrees[i + 1][:, None] >= degrees[i][None, :]).astype(np.float32))
             for i in range(len(hidden))]  # fmt: skip
    masks.append(torch.from_numpy((degrees[0][:, None] > degrees[-1][None, :]).astype(np.float32)))
    return masks


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation over D binary (or real) inputs: logits of p(x_d = 1 | x_<d).

    Args:
        dim: D.
        hidden: hidden layer widths.
        num_orders: orderings / connectivities cycled by :meth:`next_order` (1: the natural order only).
        seed: of the orderings and degrees.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (500,), num_orders: int = 1, seed: int = 0):
        super().__init__()
        if dim < 2 or not hidden:
            raise ValueError(f"MADE needs dim >= 2 and at least one hidden layer, got dim={dim}, hidden={hidden}")
        self.dim, self.hidden = dim, list(hidden)
        widths = [dim, *hidden, dim]
        self.layers = nn.ModuleList(MaskedLinear(a, b) for a, b in itertools.pairwise(widths))
        rng = np.random.default_rng(seed)
        self.orders = [np.arange(1, dim + 1)] + [rng.permutation(dim) + 1 for _ in range(num_orders - 1)]
        self._masks = [made_masks(o, self.hidden, rng) for o in self.orders]
        # a buffer, so that an EMA copy (buffers copied) and a checkpoint keep the ordering of the masks they hold
        self.register_buffer("current", torch.tensor(-1))
        self.next_order()

    def next_order(self) -> int:
        """Switch to the next ordering (order-agnostic training); returns its index."""
        k = (int(self.current) + 1) % len(self.orders)
        self.current.fill_(k)
        for layer, mask in zip(self.layers, self._masks[k]):
            layer.set_mask(mask)
        return k

    @property
    def order(self) -> np.ndarray:
        """order[d]: the position (1..D) of input d in the current ordering."""
        return self.orders[int(self.current)]

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = F.relu(layer(h))
        return self.layers[-1](h).view_as(x)

    @staticmethod
    def log_prob_of(logits: Tensor, x: Tensor) -> Tensor:
        """log p(x) = Σ_d log Bernoulli(x_d; σ(logit_d)) of binary x, per sample (nats), from the logits."""
        nll = F.binary_cross_entropy_with_logits(at_least_fp32(logits), at_least_fp32(x), reduction="none")
        return -nll.flatten(1).sum(1)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.log_prob_of(self(x), x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
        """n binary samples, one input position at a time in the current order (D network evaluations)."""
        device = self.layers[0].weight.device
        x = torch.zeros(n, self.dim, device=device)
        steps = np.argsort(self.order)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="MADE", leave=False)
        for d in steps:
            u = torch.rand(n, generator=generator, device=generator.device if generator is not None else device)
            x[:, d] = (u.to(device) < torch.sigmoid(self(x)[:, d])).to(x.dtype)
        return x


def discretized_logistic_mixture_log_prob(
    x: Tensor, logit_pi: Tensor, mean: Tensor, log_scale: Tensor, levels: int = 256
) -> Tensor:
    """log P(x) of values x ∈ [−1, 1] on ``levels`` equally spaced points under a mixture of K logistics
    (Salimans et al. 2017, eq. 2): P(x) = Σ_k π_k [σ((x + δ − μ_k)/s_k) − σ((x − δ − μ_k)/s_k)], δ = 1/(levels − 1);
    the lowest value takes the whole left tail (σ(·) − 0), the highest the right tail (1 − σ(·)), so the
    probabilities of all levels sum to one.

    Shapes: x (...,), the mixture parameters (..., K). Computed in log space with softplus for stability.
    """
    delta = 1.0 / (levels - 1)
    xc = x.unsqueeze(-1) - mean
    inv_s = torch.exp(-log_scale)
    plus, minus, centre = inv_s * (xc + delta), inv_s * (xc - delta), inv_s * xc
    log_cdf_plus = plus - F.softplus(plus)  # log σ(plus): the lowest bin
    log_one_minus_cdf_minus = -F.softplus(minus)  # log (1 − σ(minus)): the highest bin
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    # a bin too narrow for the difference of two CDFs in float: its density at the centre times its width
    log_pdf_centre = centre - log_scale - 2 * F.softplus(centre) + np.log(2 * delta)
    mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_centre)
    xe = x.unsqueeze(-1)
    log_bin = torch.where(xe < -1 + delta / 2, log_cdf_plus, torch.where(xe > 1 - delta / 2, log_one_minus_cdf_minus,
                                                                           mid))  # fmt: skip
    return torch.logsumexp(log_bin + F.log_softmax(logit_pi, dim=-1), dim=-1)


def _shift_down(x: Tensor) -> Tensor:
    return F.pad(x, (0, 0, 1, 0))[..., :-1, :]


def _shift_right(x: Tensor) -> Tensor:
    return F.pad(x, (1, 0, 0, 0))[..., :-1]


class _ShiftedConv(nn.Conv2d):
    """PixelCNN++'s causal convolutions: ``down`` sees the rows above and the kernel's row (2×3 kernel padded
    on top and both sides); ``down_right`` sees the rows above and the pixels to the left (2×2 kernel padded on top
    and left). Neither sees anything below, or to the right on its own row."""

    def __init__(self, cin: int, cout: int, kind: str):
        super().__init__(cin, cout, (2, 3) if kind == "down" else (2, 2))
        self.pads = (1, 1, 1, 0) if kind == "down" else (1, 0, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.pads))


class _GatedResnet(nn.Module):
    """x + a ⊙ σ(b), [a, b] = conv(ELU(conv(ELU(x)) [+ conv of the other stream])) (PixelCNN++, §2.1 and 2.4)."""

    def __init__(self, channels: int, kind: str, skip: bool):
        super().__init__()
        self.conv_in = _ShiftedConv(2 * channels, channels, kind)
        self.skip = nn.Conv2d(2 * channels, channels, 1) if skip else None
        self.conv_out = _ShiftedConv(2 * channels, 2 * channels, kind)

    def forward(self, x: Tensor, other: Tensor | None = None) -> Tensor:
        h = self.conv_in(F.elu(torch.cat([x, -x], 1)))  # concat_elu
        if self.skip is not None and other is not None:
            h = h + self.skip(F.elu(torch.cat([other, -other], 1)))
        a, b = self.conv_out(F.elu(torch.cat([h, -h], 1))).chunk(2, 1)
        return x + a * torch.sigmoid(b)


class PixelCNN(nn.Module):
    """A PixelCNN++-style model (Salimans et al. 2017) at one resolution for single-channel 8-bit images in
    [−1, 1]: a vertical stack u (rows above) and a horizontal stack ul (rows above and pixels to the left), both
    started shifted so a pixel never sees itself, gated residual blocks, and a discretized logistic mixture of
    ``mixtures`` components per pixel. The multi-resolution U-Net of the paper is not reproduced."""

    def __init__(self, channels: int = 64, blocks: int = 5, mixtures: int = 5):
        super().__init__()
        self.mixtures = mixtures
        self.u_in = _ShiftedConv(2, channels, "down")
        self.ul_in_v = _ShiftedConv(2, channels, "down")
        self.ul_in_h = _ShiftedConv(2, channels, "down_right")
        self.u_blocks = nn.ModuleList(_GatedResnet(channels, "down", False) for _ in range(blocks))
        self.ul_blocks = nn.ModuleList(_GatedResnet(channels, "down_right", True) for _ in range(blocks))
        self.out = nn.Conv2d(channels, 3 * mixtures, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logit π, μ, log s), each (B, K, H, W), of every pixel given the pixels before it in raster order."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"PixelCNN models single-channel images (B, 1, H, W), got {tuple(x.shape)}")
        h = torch.cat([x, torch.ones_like(x)], 1)  # a constant channel: padding is told apart from black
        u = _shift_down(self.u_in(h))
        ul = _shift_down(self.ul_in_v(h)) + _shift_right(self.ul_in_h(h))
        for ub, ulb in zip(self.u_blocks, self.ul_blocks):
            u = ub(u)
            ul = ulb(ul, u)
        logit_pi, mean, log_scale = self.out(F.elu(ul)).chunk(3, 1)
        return logit_pi, torch.tanh(mean), log_scale.clamp(min=-7.0)

    @staticmethod
    def log_prob_of(params: tuple[Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
        """log p(x) in nats per image, x on the 256 levels of [−1, 1], from the mixture parameters."""
        logit_pi, mean, log_scale = (at_least_fp32(t).movedim(1, -1) for t in params)
        lp = discretized_logistic_mixture_log_prob(at_least_fp32(x[:, 0]), logit_pi, mean, log_scale)
        return lp.flatten(1).sum(1)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.log_prob_of(self(x), x)

    @torch.no_grad()
    def sample(self, n: int, size: int, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
        """n images, one pixel at a time in raster order (size² network evaluations), on the 256 levels."""
        device = self.out.weight.device
        x = torch.zeros(n, 1, size, size, device=device)
        cells = [(i, j) for i in range(size) for j in range(size)]
        if progress:
            from tqdm.auto import tqdm

            cells = tqdm(cells, desc="PixelCNN", leave=False)
        gdev = generator.device if generator is not None else device
        for i, j in cells:
            logit_pi, mean, log_scale = (t[:, :, i, j] for t in self(x))
            k = torch.multinomial(torch.softmax(logit_pi, -1).to(gdev), 1, generator=generator).to(device)
            u = torch.rand(n, 1, generator=generator, device=gdev).to(device).clamp(1e-5, 1 - 1e-5)
            v = mean.gather(1, k) + log_scale.gather(1, k).exp() * (u.log() - (-u).log1p())  # logistic inverse CDF
            x[:, 0, i, j] = ((v[:, 0].clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
        return x
