"""``sdeflow::group_norm_act``: fused group normalisation (+ per-sample bias, scale-shift, SiLU) as a PyTorch
custom operator with its own backward, so it runs in eager mode, under ``torch.compile`` (an opaque node) and
inside CUDA graphs. The maths and the kernels: :mod:`.group_norm_triton`; the reference it must equal:
PyTorch's operators (the tests hold it to ``F.group_norm``). :meth:`sdeflow.models.layers.GroupNorm.forward`
decides when to use it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .runtime import check_device

__all__ = ["group_norm_act", "supported"]

_CL = torch.channels_last


# Launch settings, from the sweep on an H100 (``python benchmarks/speed_norm.py --sweep``, figures in
# benchmarks/results/norm_sweep/): a block held in registers wins where positions are few (16×16 and below), tiles
# of 8192 elements looped over with 8 warps from 32×32 up.
REGISTER_TILE, LOOP_TILE = 4096, 8192
ONE_PASS = True  # False: always loop over tiles (the tests run both kernel shapes on small inputs)
WARPS = 0  # warps a program; 0: 4 for a block in registers, 8 looping


def _blocks(c: int, groups: int, hw: int) -> dict | None:
    """Launch constants: channels per group, channels per program, positions per tile, whether one tile holds all
    positions (``ONE_PASS``) and warps; None where the kernels need powers of two they do not get. In registers:
    at least two groups a program, as many as fill ``REGISTER_TILE`` (up to 64 channels). Looping: 64 channels (rows
    of 128 bytes in bf16) or one group if larger, ``LOOP_TILE`` elements a tile."""
    cpg = c // groups
    if c % groups or cpg & (cpg - 1):
        return None
    hw2 = 1 << max(hw - 1, 0).bit_length()
    if ONE_PASS and 2 * hw2 * cpg <= REGISTER_TILE and c % (2 * cpg) == 0:
        block_c = 2 * cpg
        while block_c * 2 <= min(c, 64) and hw2 * block_c * 2 <= REGISTER_TILE and c % (block_c * 2) == 0:
            block_c *= 2
        return dict(CPG=cpg, BLOCK_C=block_c, BLOCK_HW=hw2, ONE_PASS=True, num_warps=WARPS or 4)
    block_c = max(cpg, min(64, c))
    if c % block_c or block_c & (block_c - 1):
        return None
    return dict(CPG=cpg, BLOCK_C=block_c, BLOCK_HW=max(LOOP_TILE // block_c, 1), ONE_PASS=False, num_warps=WARPS or 8)


def supported(x: Tensor, groups: int) -> bool:
    """Whether the Triton kernels take this input: 4-D channels-last, float, group sizes powers of two."""
    return (
        x.ndim == 4
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.is_contiguous(memory_format=_CL)
        and _blocks(x.shape[1], groups, x.shape[2] * x.shape[3]) is not None
    )


def _launch(x: Tensor, backward: bool, groups: int, pre: Tensor | None, scale: Tensor | None, act: bool) -> tuple:
    """(kernel, grid, constants) for x's device: compiled for a GPU, or Triton's interpreter for CPU tensors."""
    from . import group_norm_triton as k

    check_device(x, "group-norm")
    n, c, h, w = x.shape
    consts = _blocks(c, groups, h * w)
    consts |= dict(HAS_P=pre is not None, HAS_MOD=scale is not None, ACT=act)  # type: ignore[operator]
    kernel = k.group_norm_act_backward if backward else k.group_norm_act_forward
    return kernel, (c // consts["BLOCK_C"], n), consts  # type: ignore[index]


@torch.library.custom_op("sdeflow::group_norm_act", mutates_args=())
def _group_norm_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    pre: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    groups: int,
    eps: float,
    act: bool,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    n, c, h, w = x.shape
    x = x.contiguous(memory_format=_CL)
    y = torch.empty_like(x, dtype=out_dtype, memory_format=_CL)
    mean = x.new_empty((n, groups), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    kernel, grid, consts = _launch(x, False, groups, pre, scale, act)
    dummy = mean  # stands in for absent optional inputs; never read
    kernel[grid](
        x, pre if pre is not None else dummy, weight, bias,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        y, mean, rstd, h * w, c, eps, **consts,
    )  # fmt: skip
    return y, mean, rstd


@_group_norm_act.register_fake
def _(x, weight, bias, pre, scale, shift, groups, eps, act, out_dtype):
    mean = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return torch.empty_like(x, dtype=out_dtype, memory_format=_CL), mean, torch.empty_like(mean)


_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor? pre, Tensor? scale, Tensor? shift, Tensor mean, "
    "Tensor rstd, SymInt groups, bool act) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("sdeflow::group_norm_act_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _group_norm_act_backward(dy, x, weight, bias, pre, scale, shift, mean, rstd, groups, act):
    """(dx, dpre, dγ, dβ, dscale, dshift); the optional gradients are fp32 (N, C), zeros-shaped (0,) when their
    input is absent."""
    n, c, h, w = x.shape
    x, dy = x.contiguous(memory_format=_CL), dy.contiguous(memory_format=_CL)
    dx = torch.empty_like(x, memory_format=_CL)
    part = [x.new_empty((n, c), dtype=torch.float32) for _ in range(5)]  # dpre, dγ, dβ, dscale, dshift per sample
    kernel, grid, consts = _launch(x, True, groups, pre, scale, act)
    kernel[grid](
        x, pre if pre is not None else mean, weight, bias,
        scale if scale is not None else mean, shift if shift is not None else mean,
        dy, mean, rstd, dx, *part, h * w, c, **consts,
    )  # fmt: skip

    def absent() -> Tensor:
        return x.new_empty((0,), dtype=torch.float32)

    dp = part[0] if pre is not None else absent()
    ds, dt = (part[3], part[4]) if scale is not None else (absent(), absent())
    return dx, dp, part[1].sum(0), part[2].sum(0), ds, dt


@_group_norm_act_backward.register_fake
def _(dy, x, weight, bias, pre, scale, shift, mean, rstd, groups, act):
    n, c = x.shape[:2]

    def f32(*shape: int) -> Tensor:
        return x.new_empty(shape, dtype=torch.float32)

    dp = f32(n, c) if pre is not None else f32(0)
    ds, dt = (f32(n, c), f32(n, c)) if scale is not None else (f32(0), f32(0))
    return torch.empty_like(x, memory_format=_CL), dp, f32(c), f32(c), ds, dt


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, pre, scale, shift, groups, _eps, act, _out_dtype = inputs
    ctx.save_for_backward(x, weight, bias, pre, scale, shift, output[1], output[2])
    ctx.groups, ctx.act = groups, act


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, pre, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dp, dw, db, ds, dt = _group_norm_act_backward(
        dy, x, weight, bias, pre, scale, shift, mean, rstd, ctx.groups, ctx.act
    )

    def cast(g: Tensor, like: Tensor | None) -> Tensor | None:
        return None if like is None else g.to(like.dtype)

    return dx, cast(dw, weight), cast(db, bias), cast(dp, pre), cast(ds, scale), cast(dt, shift), None, None, None, None


_group_norm_act.register_autograd(_backward, setup_context=_setup_context)


def group_norm_act(
    x: Tensor,
    groups: int,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    pre: Tensor | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    act: bool = True,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """silu((GN(x + pre)·γ + β)·(1 + scale) + shift), ``pre``, ``scale``, ``shift`` of shape (N, C), by the fused
    operator on a channels-last input (see :func:`supported`), written in ``out_dtype`` (default: x's and γ's
    promoted dtype). The kernels index the optional inputs as (N, C) rows and γ, β as (C,): other shapes are refused
    here, not read out of bounds."""
    n, c = x.shape[:2]
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift come together")
    for name, v, shape in (("weight", weight, (c,)), ("bias", bias, (c,)), ("pre", pre, (n, c)),
                           ("scale", scale, (n, c)), ("shift", shift, (n, c))):  # fmt: skip
        if v is not None and tuple(v.shape) != shape:
            raise ValueError(f"group_norm_act: {name} must have shape {shape}, got {tuple(v.shape)}")
    out = out_dtype or torch.promote_types(x.dtype, weight.dtype)
    pre, scale, shift = (None if v is None else v.contiguous() for v in (pre, scale, shift))  # rows of C, as indexed
    return _group_norm_act(x, weight, bias, pre, scale, shift, groups, float(eps), act, out)[0]
