"""Triton kernels for the DiT's adaLN: a gated residual, layer normalisation and per-sample modulation in one pass.

Per sample b, token n and channel d (rows of D contiguous channels, Ba et al. 2016; adaLN-Zero, Peebles & Xie
2023, §3.2):

    u = x + g_bd · p                             (optional gated residual: the previous branch's output p)
    x̂ = (u − μ_bn) / √(σ²_bn + ε)                (layer normalisation over the D channels, no affine)
    y = x̂ · (1 + s_bd) + t_bd                    (adaLN modulation: scale s, shift t regressed from the condition)

and a second kernel the gradients: with dŷ = dy·(1 + s),

    du = rstd·(dŷ − mean_d(dŷ) − x̂·mean_d(dŷ·x̂)) + du_out      (du_out: the gradient reaching u from later)
    dx = du,  dp = du·g,  dg = Σ_n du·p,  dt = Σ_n dy,  ds = Σ_n dy·x̂.

Why our own: Inductor turns the residual, the statistics and the modulation into one reduction kernel forward but
several backward (the row gradient, then the per-sample sums over tokens in another pass, then the adds of the
residual stream's gradients); here each pass reads its inputs once. Each program owns one sample and a run of
``TOKENS`` tokens, ``BLOCK_T`` rows at a time, whole rows of D channels (padded to ``BLOCK_D``) in registers.
u is rounded to its stored dtype before the statistics, so the normalised value is that of the stored stream and
the backward recomputes u exactly. The per-sample sums leave as one partial a program (the caller adds them).

Triton decorates the kernels when this module is imported: for the GPU, or, with ``TRITON_INTERPRET=1`` set
before Triton's import (the CPU tests), for its interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(b, start, rows, N, D, cols):
    """Offsets of the rows ``start + rows`` of sample b, and the mask of valid (row, channel) pairs."""
    r = start + rows
    off = (b.to(tl.int64) * N + r)[:, None] * D + cols[None, :]
    return off, (r < N)[:, None] & (cols < D)[None, :], r


@triton.jit
def _stream(X, P, g, off, m, HAS_BRANCH: tl.constexpr, U_TYPE: tl.constexpr):
    """u = x + g·p (fp32), rounded through the stream's stored dtype; and p (zeros without a branch)."""
    u = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    p = tl.zeros_like(u)
    if HAS_BRANCH:
        p = tl.load(P + off, mask=m, other=0.0).to(tl.float32)
        u = (u + g[None, :] * p).to(U_TYPE).to(tl.float32)
    return u, p


@triton.jit
def _modulation(SCALE, G, b, mod_stride, D, HAS_BRANCH: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sample b's channels, their mask, the offsets of its modulation row, 1 + s and g (zeros without a branch)."""
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    mod = b * mod_stride + cols
    s = 1.0 + tl.load(SCALE + mod, mask=cm, other=0.0).to(tl.float32)
    g = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BRANCH:
        g = tl.load(G + mod, mask=cm, other=0.0).to(tl.float32)
    return cols, cm, mod, s, g


@triton.jit
def ada_layer_norm_forward(
    X, P, G, SHIFT, SCALE, U, Y, MEAN, RSTD, N, D, mod_stride, eps,
    HAS_BRANCH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, TOKENS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1)
    rows = tl.arange(0, BLOCK_T)
    cols, cm, mod, s, g = _modulation(SCALE, G, b, mod_stride, D, HAS_BRANCH, BLOCK_D)
    t = tl.load(SHIFT + mod, mask=cm, other=0.0).to(tl.float32)
    for start in range(tl.program_id(0) * TOKENS, tl.program_id(0) * TOKENS + TOKENS, BLOCK_T):
        off, m, r = _tile(b, start, rows, N, D, cols)
        u, _p = _stream(X, P, g, off, m, HAS_BRANCH, U.dtype.element_ty)
        if HAS_BRANCH:
            tl.store(U + off, u.to(U.dtype.element_ty), mask=m)
        mean = tl.sum(u, 1) / D
        xc = tl.where(m, u - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        y = xc * rstd[:, None] * s[None, :] + t[None, :]
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)
        tl.store(MEAN + b * N + r, mean, mask=r < N)
        tl.store(RSTD + b * N + r, rstd, mask=r < N)


@triton.jit
def ada_layer_norm_backward(
    X, P, G, SCALE, DY, DU_OUT, MEAN, RSTD, DX, DP, DG, DSHIFT, DSCALE, N, D, mod_stride,
    HAS_BRANCH: tl.constexpr, HAS_DU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, TOKENS: tl.constexpr,
):  # fmt: skip
    """The module docstring's gradients; DG, DSHIFT, DSCALE get this program's partial sums over its tokens, at
    row (b · programs a sample + program). DX has the stream's dtype (u's, rounded as the forward did)."""
    b = tl.program_id(1)
    rows = tl.arange(0, BLOCK_T)
    cols, cm, _mod, s, g = _modulation(SCALE, G, b, mod_stride, D, HAS_BRANCH, BLOCK_D)
    acc_dt = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)  # summed over rows once, after the loop
    acc_ds = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    acc_dg = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for start in range(tl.program_id(0) * TOKENS, tl.program_id(0) * TOKENS + TOKENS, BLOCK_T):
        off, m, r = _tile(b, start, rows, N, D, cols)
        u, p = _stream(X, P, g, off, m, HAS_BRANCH, DX.dtype.element_ty)
        mean = tl.load(MEAN + b * N + r, mask=r < N, other=0.0)
        rstd = tl.load(RSTD + b * N + r, mask=r < N, other=0.0)
        xh = tl.where(m, (u - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
        dyh = dy * s[None, :]
        c1 = tl.sum(dyh * xh, 1) / D
        c2 = tl.sum(dyh, 1) / D
        du = tl.where(m, rstd[:, None] * (dyh - c2[:, None] - xh * c1[:, None]), 0.0)
        if HAS_DU:
            du += tl.load(DU_OUT + off, mask=m, other=0.0).to(tl.float32)
        tl.store(DX + off, du.to(DX.dtype.element_ty), mask=m)
        if HAS_BRANCH:
            tl.store(DP + off, (du * g[None, :]).to(DP.dtype.element_ty), mask=m)
            acc_dg += du * p
        acc_dt += dy
        acc_ds += dy * xh
    part = (b * tl.num_programs(0) + tl.program_id(0)) * D + cols
    tl.store(DSHIFT + part, tl.sum(acc_dt, 0), mask=cm)
    tl.store(DSCALE + part, tl.sum(acc_ds, 0), mask=cm)
    if HAS_BRANCH:
        tl.store(DG + part, tl.sum(acc_dg, 0), mask=cm)
