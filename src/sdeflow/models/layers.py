"""Building blocks shared by the backbones: noise/label embeddings, group normalisation and attention.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention``, so PyTorch dispatches to
FlashAttention or memory-efficient kernels on a GPU; :func:`attention_reference` is the plain softmax
formula softmax(QKᵀ/√d)V (Vaswani et al. 2017) used to check it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import ada_layer_norm, ada_supported, group_norm_act, interpreted, supported, triton_available

__all__ = [
    "ATTENTION_BACKENDS",
    "NORM_BACKENDS",
    "AdaLayerNorm",
    "FourierEmbedding",
    "GroupNorm",
    "LabelEmbedding",
    "NoiseEmbedding",
    "PositionalEmbedding",
    "RMSNorm",
    "attention",
    "attention_reference",
    "group_norm_channels_last",
    "set_attention_backend",
    "set_norm_backend",
]

ATTENTION_BACKENDS = ("auto", "default", "cudnn", "flash", "efficient", "math")
try:  # PyTorch's own order (FlashAttention first), kept to restore it
    _DEFAULT_SDPA_ORDER: list[int] | None = list(torch._C._get_sdp_priority_order())
except AttributeError:  # PyTorch < 2.5 has no priority order
    _DEFAULT_SDPA_ORDER = None


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Multi-head attention on (B, heads, L, d) tensors through PyTorch's fused SDPA kernels.

    ``key_mask`` (B, L_k) bool, True at keys to attend to: padded text tokens get zero weight, so the output does
    not depend on how much padding a batch has (a mask routes SDPA to its memory-efficient or cuDNN kernels).

    The fused kernels (FlashAttention, cuDNN, memory-efficient) need the head dimension contiguous; given
    strided views (heads cut from an NCHW feature map) PyTorch silently falls back to the math path
    (``check_last_dim_stride_equals_1`` in ATen's sdp_utils), which under ``torch.compile`` became fp32
    CUDA-core GEMMs in our UNet's sampling profile. Such views are copied first."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def set_attention_backend(name: str = "auto", device: torch.device | str | None = None) -> str:
    """Put one family of fused attention kernels first in PyTorch's SDPA priority order.

    A preference, not a restriction: inputs the preferred kernels cannot serve (dtype, head dimension,
    layout) fall back in PyTorch's usual order. ``"auto"`` picks cuDNN on Hopper (compute
    capability 9.x), where its fused attention is the fastest on training shapes (figures in the README), and
    PyTorch's default order elsewhere; ``"default"`` restores that order. The order is process-wide and is read
    when a graph is traced, so call this before the first ``torch.compile`` run; Inductor's on-disk graph cache
    does not key on it, so a graph compiled under another order may be served from the cache.

    Returns the backend now first: one of ``flash``, ``efficient``, ``math``, ``cudnn`` or ``default``.
    """
    from torch.nn.attention import SDPBackend

    table = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; choose one of {ATTENTION_BACKENDS}")
    if _DEFAULT_SDPA_ORDER is None:
        return "default"
    if name == "auto":
        dev = torch.device(device) if device is not None else None
        cuda = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
        hopper = cuda and torch.cuda.get_device_capability(dev if dev is not None else None)[0] == 9
        name = "cudnn" if hopper else "default"
    if name == "default":
        torch._C._set_sdp_priority_order(list(_DEFAULT_SDPA_ORDER))
        return name
    first = int(table[name])
    if name == "cudnn":
        torch.backends.cuda.enable_cudnn_sdp(True)
    torch._C._set_sdp_priority_order([first] + [b for b in _DEFAULT_SDPA_ORDER if b != first])
    return name


def attention_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """softmax(Q Kᵀ / √d + M) V, computed plainly (for tests); M = −∞ at masked keys."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a scalar (DDPM++, ADM, DiT): [cos(c·f_i), sin(c·f_i)],
    f_i = (1/max_positions)^{i/(n/2)} (``endpoint`` divides by n/2 − 1, as EDM's DDPM++)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False, scale: float = 1.0):
        super().__init__()
        half = num_channels // 2
        denom = half - (1 if endpoint else 0)
        freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / max(denom, 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale

    def forward(self, c: Tensor) -> Tensor:
        x = (self.scale * c.float())[:, None] * self.freqs[None]
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++, Tancik et al. 2020): [cos(2π c f), sin(2π c f)], f ~ N(0, scale²)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c: Tensor) -> Tensor:
        x = c.float()[:, None] * (2 * math.pi * self.freqs[None])
        return torch.cat([x.cos(), x.sin()], dim=1)


class NoiseEmbedding(nn.Module):
    """c_noise → embedding: sinusoidal (``positional``) or ``fourier`` features, then a 2-layer SiLU MLP."""

    def __init__(self, channels: int, emb_channels: int, kind: str = "positional", scale: float = 1.0):
        super().__init__()
        if kind == "positional":
            self.features: nn.Module = PositionalEmbedding(channels, endpoint=True, scale=scale)
        elif kind == "fourier":
            self.features = FourierEmbedding(channels, scale=16.0 * scale)
        else:
            raise ValueError(f"unknown noise embedding '{kind}'; choose 'positional' or 'fourier'")
        self.mlp = nn.Sequential(nn.Linear(channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

    def forward(self, c_noise: Tensor) -> Tensor:
        return self.mlp(self.features(c_noise))


class LabelEmbedding(nn.Module):
    """Class-label embedding with an extra learned *null* label (index ``num_classes``) used when the label
    is missing or equals -1 (classifier-free guidance, Ho & Salimans 2022)."""

    def __init__(self, num_classes: int, emb_channels: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, emb_channels)

    def forward(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if labels is None:
            labels = torch.full((batch,), -1, device=device, dtype=torch.long)
        labels = labels.long()
        if labels.shape != (batch,):
            raise ValueError(f"class labels must have shape ({batch},), got {tuple(labels.shape)}")
        # validated on CPU only: on a GPU the check would sync the host every step (an out-of-range index still
        # trips the embedding's device-side assert there)
        if (
            not torch.compiler.is_compiling()
            and labels.device.type == "cpu"
            and bool(((labels < -1) | (labels >= self.num_classes)).any())
        ):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}) or be -1 (null)")
        return self.table(torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels))


def group_norm_channels_last(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5
) -> Tensor:
    """Group normalisation (Wu & He 2018) of an (N, C, H, W) tensor, written so that a channels-last (NHWC)
    input stays channels-last, in eager mode and under ``torch.compile``.

    y = (x − μ_g) / √(σ²_g + ε) · γ_c + β_c, the mean and variance taken over each group's C/G channels and all
    positions. PyTorch's GroupNorm (and Inductor's decomposition of it) views the input as (N, G, C/G·H·W),
    which an NHWC tensor cannot give without a transposing copy; here statistics are taken per channel over
    H·W (a reduction that reads NHWC memory in order) and merged into group statistics by the law of total
    variance, σ²_g = mean_c(σ²_c) + mean_c((μ_c − μ_g)²) (equal counts per channel, no cancellation), before
    one fused multiply-add. Computed in fp32; the result has the promoted dtype of ``x`` and ``weight``
    (fp32 under autocast with fp32 weights, as ``F.group_norm``'s autocast policy gives)."""
    n, c = x.shape[:2]
    g = num_groups
    xf = x.float()
    var_c, mean_c = torch.var_mean(xf, dim=tuple(range(2, x.ndim)), correction=0)  # (N, C)
    mean_c, var_c = mean_c.view(n, g, c // g), var_c.view(n, g, c // g)
    mean_g = mean_c.mean(-1, keepdim=True)
    var_g = (var_c + (mean_c - mean_g).square()).mean(-1, keepdim=True)
    scale = torch.rsqrt(var_g + eps).expand(n, g, c // g)
    if weight is not None:
        scale = scale * weight.float().view(g, c // g)
    shift = -mean_g * scale
    if bias is not None:
        shift = shift + bias.float().view(g, c // g)
    extra = (1,) * (x.ndim - 2)
    y = torch.addcmul(shift.reshape(n, c, *extra), xf, scale.reshape(n, c, *extra))
    dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    return y.to(dtype)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state dict) that keeps channels-last activations channels-last and
    takes its neighbours in the UNet along: ``norm(x, pre, scale, shift, act)`` is

        silu((GN(x + pre)·γ + β)·(1 + scale) + shift),   ``pre``, ``scale``, ``shift`` of shape (N, C),

    each part optional (``act=False``: no SiLU). On CUDA channels-last inputs it runs as one fused Triton
    operator (:mod:`sdeflow.models.kernels`, :func:`set_norm_backend`); elsewhere channels-last 4-D inputs go
    through :func:`group_norm_channels_last` and others through ``F.group_norm``. Why: PyTorch's GroupNorm views
    NHWC activations as (N, G, C/G·H·W), which reads memory out of order and hands cuDNN's convolution backward
    gradients in the wrong layout (``benchmarks/speed_norm.py``). Under autocast the fused operator writes the
    autocast dtype, which every convolution that reads it would cast to anyway."""

    def forward(
        self,
        x: Tensor,
        pre: Tensor | None = None,
        scale: Tensor | None = None,
        shift: Tensor | None = None,
        act: bool = False,
    ) -> Tensor:
        if (scale is None) != (shift is None):
            raise ValueError("GroupNorm: scale and shift come together")
        if self._fused(x):
            fast = torch.is_autocast_enabled(x.device.type) and x.dtype == torch.get_autocast_dtype(x.device.type)
            out = x.dtype if fast else torch.promote_types(x.dtype, self.weight.dtype)
            return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, pre, scale, shift, act, out)
        if pre is not None:
            x = x + pre[:, :, None, None]
        if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            y = group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            y = super().forward(x)
        if scale is not None:
            y = torch.addcmul(shift[:, :, None, None], y, scale[:, :, None, None] + 1)  # type: ignore[index]
        return F.silu(y) if act else y

    def _fused(self, x: Tensor) -> bool:
        return self.weight is not None and _triton_norms(x) and supported(x, self.num_groups)


class AdaLayerNorm(nn.Module):
    """Layer normalisation without its own affine, modulated per sample: adaLN (Peebles & Xie 2023, §3.2),

        y = LN(x)·(1 + scale) + shift,        and with :meth:`residual`, first  x ← x + gate·branch,

    scale, shift, gate (B, D) regressed from the condition, x and branch (B, N, D) token streams. On CUDA it runs
    as one fused Triton operator, forward and backward (:func:`sdeflow.models.kernels.ada_layer_norm`,
    :func:`set_norm_backend`); elsewhere as PyTorch's ``F.layer_norm`` and elementwise operators. Why fused: the
    residual add, the statistics, the modulation and the per-sample gradient sums of scale, shift and gate read
    the token stream once a pass instead of once a stage. Under autocast the fused operator writes the autocast
    dtype whatever the stream's (DiT's residual stream is fp32, its positional embedding being fp32): the linear
    layer that reads y would cast to it anyway. No parameters, no state."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        if self._fused(x):
            return ada_layer_norm(x, shift, scale, self.eps, out_dtype=self._out_dtype(x))[1]
        y = F.layer_norm(x, (self.dim,), eps=self.eps)
        return y * (1 + scale[:, None]) + shift[:, None]

    def residual(self, x: Tensor, branch: Tensor, gate: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """(x + gate·branch, the normalised, modulated sum): adaLN-Zero's gated residual and the next norm."""
        if self._fused(x):
            return ada_layer_norm(x, shift, scale, self.eps, branch, gate, self._out_dtype(x))
        x = x + gate[:, None] * branch
        return x, self(x, shift, scale)

    def _fused(self, x: Tensor) -> bool:
        return _triton_norms(x) and ada_supported(x)

    @staticmethod
    def _out_dtype(x: Tensor) -> torch.dtype | None:
        on = torch.is_autocast_enabled(x.device.type)
        return torch.get_autocast_dtype(x.device.type) if on else None

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def _triton_norms(x: Tensor) -> bool:
    """Whether the norm backend sends x to our Triton operators (shape support aside)."""
    if _NORM_BACKEND == "torch" or not triton_available():
        return False
    return x.device.type == "cuda" or (_NORM_BACKEND == "triton" and interpreted())


NORM_BACKENDS = ("auto", "triton", "torch")
_NORM_BACKEND = "auto"


def set_norm_backend(name: str = "auto") -> str:
    """Which normalisation :class:`GroupNorm` and :class:`AdaLayerNorm` run: ``"auto"`` (the fused Triton operators
    on CUDA inputs they support, channels-last for GroupNorm; PyTorch's elsewhere), ``"torch"`` (always PyTorch's),
    or ``"triton"`` (the Triton operators wherever they support the input, CPU tensors included under Triton's
    interpreter: for tests).
    Process-wide; read when a graph is traced. Returns the previous setting."""
    global _NORM_BACKEND
    if name not in NORM_BACKENDS:
        raise ValueError(f"unknown norm backend '{name}'; choose one of {NORM_BACKENDS}")
    old, _NORM_BACKEND = _NORM_BACKEND, name
    return old


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned gain (Zhang & Sennrich 2019); SD3's QK-norm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)  # one dtype: the fused kernel
