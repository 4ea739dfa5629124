"""``sdeflow::ada_layer_norm``: the DiT's gated residual + layer normalisation + adaLN modulation as a PyTorch
custom operator with its own backward (eager, an opaque node under ``torch.compile``, CUDA graphs). The maths and
the kernels: :mod:`.adaln_triton`; the reference it must equal: ``x + g·p`` then ``F.layer_norm`` and
the modulation (the tests hold it there). :class:`sdeflow.models.layers.AdaLayerNorm` decides when to use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .runtime import check_device

__all__ = ["ada_layer_norm", "ada_supported"]

# Launch settings, from the sweep on an H100 (``python benchmarks/speed_adaln.py --sweep``, figures in
# benchmarks/results/adaln_sweep/): rows a step, tokens a program (a multiple of ROWS), warps a program; rows of up
# to MAX_D channels.
ROWS, TOKENS, WARPS, MAX_D = 2, 16, 4, 8192


def _consts(n: int, d: int) -> dict:
    block_d = 1 << max(d - 1, 0).bit_length()
    rows = max(1, min(ROWS, 8192 // block_d))
    tokens = min(max(TOKENS // rows, 1), -(-n // rows)) * rows  # whole steps, no more than the sample has
    return dict(BLOCK_T=rows, BLOCK_D=block_d, TOKENS=tokens, num_warps=WARPS)


def ada_supported(x: Tensor) -> bool:
    """Whether the kernels take this input: (B, N, D) floating point with D ≤ ``MAX_D``."""
    return x.ndim == 3 and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and 0 < x.shape[-1] <= MAX_D


def _rows_of(*mods: Tensor | None) -> tuple[list[Tensor | None], int]:
    """The (B, D) modulation inputs as the kernels index them, row b at b·stride: kept as given (chunks of one
    regression output share a stride) unless their strides differ or a row is not contiguous."""
    present = [m for m in mods if m is not None]
    if all(m.stride(1) == 1 and m.stride(0) == present[0].stride(0) for m in present):
        return list(mods), present[0].stride(0)
    return [None if m is None else m.contiguous() for m in mods], present[0].shape[1]


def _stream_dtype(x: Tensor, branch: Tensor | None, gate: Tensor | None) -> torch.dtype:
    return x.dtype if branch is None else torch.promote_types(torch.promote_types(x.dtype, branch.dtype), gate.dtype)


@torch.library.custom_op("sdeflow::ada_layer_norm", mutates_args=())
def _ada_layer_norm(
    x: Tensor, shift: Tensor, scale: Tensor, branch: Tensor | None, gate: Tensor | None, eps: float,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    from . import adaln_triton as k

    check_device(x, "adaLN")
    b, n, d = x.shape
    (shift, scale, gate), stride = _rows_of(shift, scale, gate)
    u = torch.empty_like(x, dtype=_stream_dtype(x, branch, gate)) if branch is not None else x.new_empty((0,))
    y = torch.empty_like(x, dtype=out_dtype)
    mean = x.new_empty((b, n), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    c = _consts(n, d)
    k.ada_layer_norm_forward[(-(-n // c["TOKENS"]), b)](
        x, branch if branch is not None else x, gate if gate is not None else shift, shift, scale,
        u if branch is not None else y, y, mean, rstd, n, d, stride, eps, HAS_BRANCH=branch is not None, **c,
    )  # fmt: skip
    return u, y, mean, rstd


@_ada_layer_norm.register_fake
def _(x, shift, scale, branch, gate, eps, out_dtype):
    u = torch.empty_like(x, dtype=_stream_dtype(x, branch, gate)) if branch is not None else x.new_empty((0,))
    mean = x.new_empty(x.shape[:2], dtype=torch.float32)
    return u, torch.empty_like(x, dtype=out_dtype), mean, torch.empty_like(mean)


_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor? du_out, Tensor x, Tensor scale, Tensor? branch, Tensor? gate, Tensor mean, Tensor rstd) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("sdeflow::ada_layer_norm_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _ada_layer_norm_backward(dy, du_out, x, scale, branch, gate, mean, rstd):
    """(du, dbranch, dgate, dshift, dscale): du in the stream's dtype; the (B, D) gradients fp32; dbranch and
    dgate zeros-shaped (0,) without a branch."""
    from . import adaln_triton as k

    b, n, d = x.shape
    (scale, gate), stride = _rows_of(scale, gate)
    c = _consts(n, d)
    programs = -(-n // c["TOKENS"])
    du = torch.empty_like(x, dtype=_stream_dtype(x, branch, gate))
    dp = torch.empty_like(branch) if branch is not None else x.new_empty((0,))
    part = [x.new_empty((b, programs, d), dtype=torch.float32) for _ in range(3)]  # dgate, dshift, dscale
    k.ada_layer_norm_backward[(programs, b)](
        x, branch if branch is not None else x, gate if gate is not None else scale, scale,
        dy.contiguous(), du_out.contiguous() if du_out is not None else dy, mean, rstd,
        du, dp if branch is not None else du, *part, n, d, stride,
        HAS_BRANCH=branch is not None, HAS_DU=du_out is not None, **c,
    )  # fmt: skip
    dg = part[0].sum(1) if branch is not None else x.new_empty((0,), dtype=torch.float32)
    return du, dp, dg, part[1].sum(1), part[2].sum(1)


@_ada_layer_norm_backward.register_fake
def _(dy, du_out, x, scale, branch, gate, mean, rstd):
    f32 = torch.float32
    dp = torch.empty_like(branch) if branch is not None else x.new_empty((0,))
    dg = x.new_empty((x.shape[0], x.shape[2]), dtype=f32) if branch is not None else x.new_empty((0,), dtype=f32)
    ds = x.new_empty((x.shape[0], x.shape[2]), dtype=f32)
    return torch.empty_like(x, dtype=_stream_dtype(x, branch, gate)), dp, dg, ds, torch.empty_like(ds)


def _setup_context(ctx, inputs, output) -> None:
    x, shift, scale, branch, gate, _eps, _out_dtype = inputs
    ctx.save_for_backward(x, scale, branch, gate, output[2], output[3])
    ctx.dtypes = x.dtype, shift.dtype


def _backward(ctx, du_out, dy, _dmean, _drstd):
    x, scale, branch, gate, mean, rstd = ctx.saved_tensors
    if branch is None or du_out is None or du_out.numel() == 0:
        du_out = None  # without a branch u is x itself: its other uses' gradients reach x through autograd
    du, dp, dg, dt, ds = _ada_layer_norm_backward(dy, du_out, x, scale, branch, gate, mean, rstd)
    x_dtype, mod_dtype = ctx.dtypes
    dg = None if gate is None else dg.to(gate.dtype)
    return du.to(x_dtype), dt.to(mod_dtype), ds.to(scale.dtype), (None if branch is None else dp), dg, None, None


_ada_layer_norm.register_autograd(_backward, setup_context=_setup_context)


def ada_layer_norm(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    eps: float = 1e-6,
    branch: Tensor | None = None,
    gate: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """(u, y) with u = x + gate·branch (x itself without a branch) and y = LN(u)·(1 + scale) + shift, for x,
    branch (B, N, D) and shift, scale, gate (B, D), by the fused operator; y in ``out_dtype`` (default: the
    promoted dtype of u, shift and scale). Shapes the kernels would misread are refused here, by name."""
    if (branch is None) != (gate is None):
        raise ValueError("ada_layer_norm: branch and gate come together")
    if not ada_supported(x):
        raise ValueError(f"ada_layer_norm: x must be (B, N, D) floating point with D <= {MAX_D}, got "
                         f"{tuple(x.shape)} {x.dtype}")  # fmt: skip
    b, _, d = x.shape
    for name, v, shape in (("shift", shift, (b, d)), ("scale", scale, (b, d)), ("gate", gate, (b, d)),
                           ("branch", branch, tuple(x.shape))):  # fmt: skip
        if v is not None and tuple(v.shape) != shape:
            raise ValueError(f"ada_layer_norm: {name} must have shape {shape}, got {tuple(v.shape)}")
    stream = _stream_dtype(x, branch, gate)
    out = out_dtype or torch.promote_types(torch.promote_types(stream, shift.dtype), scale.dtype)
    branch = None if branch is None else branch.contiguous()
    u, y, _, _ = _ada_layer_norm(x.contiguous(), shift, scale, branch, gate, float(eps), out)
    return (x if branch is None else u), y
