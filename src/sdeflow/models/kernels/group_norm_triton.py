"""Triton kernels for group normalisation fused with its neighbours, on channels-last (NHWC) activations.

One kernel computes, per sample n and channel c (groups of G consecutive channels, Wu & He 2018),

    u = x + p_nc                                   (optional per-sample bias: the UNet's additive embedding)
    a = (u − μ_ng) / √(σ²_ng + ε) · γ_c + β_c      (group normalisation; μ, σ² over the group's channels and H·W)
    z = a · (1 + s_nc) + t_nc                      (optional scale-shift modulation, Dhariwal & Nichol 2021)
    y = z · sigmoid(z)                             (optional SiLU)

and a second its gradients (the group-norm backward of Wu & He's eq. 1 with the chain through SiLU and
modulation). Why our own: PyTorch's GroupNorm reads NHWC memory out of order, and Inductor's decomposition
spends one kernel per reduction and per elementwise stage, forward and backward. Each program owns one sample
and a block of whole groups. Where the block's positions fit in registers (``ONE_PASS``: every UNet activation
up to 32×32), the forward reads x once and writes y once, the backward reads x and dy once and writes dx once;
larger images loop over tiles twice. Statistics are fp32: from the registers, or (looping) as per-channel sums
centred on the channel's first value (no cancellation for large means), merged into group statistics by the
law of total variance.

Triton decorates the kernels when this module is imported: for the GPU, or, with ``TRITON_INTERPRET=1`` set
before Triton's import (the CPU tests), for its interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _group_mean(v, GB: tl.constexpr, CPG: tl.constexpr, count):
    """Per-channel sums (BLOCK_C,) → each group's mean over ``count`` values, broadcast back to its channels."""
    g = tl.sum(tl.reshape(v, (GB, CPG)), 1) / count
    return tl.reshape(tl.broadcast_to(g[:, None], (GB, CPG)), (GB * CPG,))


@triton.jit
def _first_in_group(v, GB: tl.constexpr, CPG: tl.constexpr):
    """(BLOCK_C,) values equal within each group → (GB,), one a group."""
    return tl.max(tl.reshape(v, (GB, CPG)), 1)


@triton.jit
def _grad_z(X, DY, off, m, p, mean_b, rstd_b, w, bias, s, t, ACT: tl.constexpr):
    """(x̂, a, dz) of the tile at ``off`` (rows ``m`` valid; others give dz = 0): u = x + p, x̂ = (u − μ)·rstd,
    a = x̂γ + β, dz = dy·σ(z)(1 + z(1 − σ(z))) with z = a·s + t."""
    u = tl.load(X + off, mask=m[:, None], other=0.0).to(tl.float32) + p[None, :]
    dy = tl.load(DY + off, mask=m[:, None], other=0.0).to(tl.float32)
    xh = (u - mean_b[None, :]) * rstd_b[None, :]
    a = xh * w[None, :] + bias[None, :]
    dz = dy
    if ACT:
        z = a * s[None, :] + t[None, :]
        sg = tl.sigmoid(z)
        dz = dy * sg * (1.0 + z * (1.0 - sg))
    return xh, a, dz


@triton.jit
def _rows(base, start, rows, HW, C, c):
    """Offsets of the tile of positions ``start + rows`` and channels ``c``, and which of its rows lie in the image."""
    r = start + rows
    return base + r[:, None] * C + c[None, :], r < HW


@triton.jit
def _grad_u(dz, xh, m, s, w, rstd_b, m1_b, m2_b):
    """du = rstd·(dx̂ − mean_g(dx̂) − x̂·mean_g(dx̂·x̂)), dx̂ = dz·s·γ; zero on rows outside the image."""
    du = rstd_b[None, :] * (dz * (s * w)[None, :] - m1_b[None, :] - xh * m2_b[None, :])
    return tl.where(m[:, None], du, 0.0)


@triton.jit
def group_norm_act_forward(
    X, P, W, B, S, T, Y, MEAN, RSTD, HW, C, eps,
    HAS_P: tl.constexpr, HAS_MOD: tl.constexpr, ACT: tl.constexpr,
    CPG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ONE_PASS: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_HW)
    GB: tl.constexpr = BLOCK_C // CPG
    base = n.to(tl.int64) * HW * C
    p = tl.zeros([BLOCK_C], tl.float32)
    if HAS_P:
        p = tl.load(P + n * C + c).to(tl.float32)
    if ONE_PASS:  # the block's whole slice in registers
        m = rows < HW
        u = tl.load(X + base + rows[:, None] * C + c[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        u = tl.where(m[:, None], u + p[None, :], 0.0)
        mean_b = _group_mean(tl.sum(u, 0), GB, CPG, CPG * HW)
        d = tl.where(m[:, None], u - mean_b[None, :], 0.0)
        var_b = _group_mean(tl.sum(d * d, 0), GB, CPG, CPG * HW)
    else:  # per-channel sums centred on each channel's first value, over tiles
        k = tl.load(X + base + c).to(tl.float32) + p
        s1 = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)  # summed over rows once, after the loop
        s2 = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
        for start in range(0, HW, BLOCK_HW):
            off, m = _rows(base, start, rows, HW, C, c)
            v = tl.load(X + off, mask=m[:, None], other=0.0).to(tl.float32)
            d = tl.where(m[:, None], v + p[None, :] - k[None, :], 0.0)
            s1 += d
            s2 += d * d
        mean_c = tl.sum(s1, 0) / HW
        s2 = tl.sum(s2, 0)
        var_c = tl.maximum(s2 / HW - mean_c * mean_c, 0.0)
        mean_c += k
        mean_b = _group_mean(mean_c, GB, CPG, CPG)
        dev = mean_c - mean_b
        var_b = _group_mean(var_c + dev * dev, GB, CPG, CPG)  # law of total variance
    rstd_b = 1.0 / tl.sqrt(var_b + eps)
    g = tl.program_id(0) * GB + tl.arange(0, GB)
    tl.store(MEAN + n * (C // CPG) + g, _first_in_group(mean_b, GB, CPG))
    tl.store(RSTD + n * (C // CPG) + g, _first_in_group(rstd_b, GB, CPG))
    a1 = rstd_b * tl.load(W + c).to(tl.float32)  # z = u·a1 + a0
    a0 = tl.load(B + c).to(tl.float32) - mean_b * a1
    if HAS_MOD:
        s = 1.0 + tl.load(S + n * C + c).to(tl.float32)
        a1 = a1 * s
        a0 = a0 * s + tl.load(T + n * C + c).to(tl.float32)
    if ONE_PASS:
        z = u * a1[None, :] + a0[None, :]
        if ACT:
            z = z * tl.sigmoid(z)
        tl.store(Y + base + rows[:, None] * C + c[None, :], z.to(Y.dtype.element_ty), mask=m[:, None])
    else:
        for start in range(0, HW, BLOCK_HW):
            off, m = _rows(base, start, rows, HW, C, c)
            v = tl.load(X + off, mask=m[:, None], other=0.0).to(tl.float32) + p[None, :]
            z = v * a1[None, :] + a0[None, :]
            if ACT:
                z = z * tl.sigmoid(z)
            tl.store(Y + off, z.to(Y.dtype.element_ty), mask=m[:, None])


@triton.jit
def group_norm_act_backward(
    X, P, W, B, S, T, DY, MEAN, RSTD, DX, DP, DW, DB, DS, DT, HW, C,
    HAS_P: tl.constexpr, HAS_MOD: tl.constexpr, ACT: tl.constexpr,
    CPG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ONE_PASS: tl.constexpr,
):  # fmt: skip
    """dt = Σ dz, ds = Σ dz·a, da = dz(1 + s); dβ = Σ da, dγ = Σ da·x̂; dx̂ = da·γ;
    du = rstd·(dx̂ − mean_g(dx̂) − x̂·mean_g(dx̂·x̂)); dp = Σ du. Sums over H·W (dγ, dβ per sample: the caller adds
    the samples)."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_HW)
    GB: tl.constexpr = BLOCK_C // CPG
    base = n.to(tl.int64) * HW * C
    g = tl.program_id(0) * GB + tl.arange(0, GB)
    mean_b = tl.reshape(tl.broadcast_to(tl.load(MEAN + n * (C // CPG) + g)[:, None], (GB, CPG)), (BLOCK_C,))
    rstd_b = tl.reshape(tl.broadcast_to(tl.load(RSTD + n * (C // CPG) + g)[:, None], (GB, CPG)), (BLOCK_C,))
    w = tl.load(W + c).to(tl.float32)
    bias = tl.load(B + c).to(tl.float32)
    p = tl.zeros([BLOCK_C], tl.float32)
    if HAS_P:
        p = tl.load(P + n * C + c).to(tl.float32)
    s = tl.full([BLOCK_C], 1.0, tl.float32)
    t = tl.zeros([BLOCK_C], tl.float32)
    if HAS_MOD:
        s += tl.load(S + n * C + c).to(tl.float32)
        t = tl.load(T + n * C + c).to(tl.float32)
    if ONE_PASS:
        m = rows < HW
        off = base + rows[:, None] * C + c[None, :]
        xh, a, dz = _grad_z(X, DY, off, m, p, mean_b, rstd_b, w, bias, s, t, ACT)
        sum_dz = tl.sum(dz, 0)
        sum_dz_a = tl.sum(dz * a, 0)
        sum_da = sum_dz * s
        sum_da_xh = tl.sum(dz * xh, 0) * s
    else:
        acc_dz = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)  # summed over rows once, after the loop
        acc_dz_a = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
        acc_dz_xh = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
        for start in range(0, HW, BLOCK_HW):
            off, m = _rows(base, start, rows, HW, C, c)
            xh, a, dz = _grad_z(X, DY, off, m, p, mean_b, rstd_b, w, bias, s, t, ACT)
            acc_dz += dz
            acc_dz_a += dz * a
            acc_dz_xh += dz * xh
        sum_dz = tl.sum(acc_dz, 0)
        sum_dz_a = tl.sum(acc_dz_a, 0)
        sum_dz_xh = tl.sum(acc_dz_xh, 0)
        sum_da = sum_dz * s
        sum_da_xh = sum_dz_xh * s
    # each group's mean, over its channels and positions, of dx̂ = da·γ and of dx̂·x̂
    m1_b = _group_mean(sum_da * w, GB, CPG, CPG * HW)
    m2_b = _group_mean(sum_da_xh * w, GB, CPG, CPG * HW)
    if ONE_PASS:
        du = _grad_u(dz, xh, m, s, w, rstd_b, m1_b, m2_b)
        tl.store(DX + off, du.to(DX.dtype.element_ty), mask=m[:, None])
        sum_du = tl.sum(du, 0)
    else:
        acc_du = tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
        for start in range(0, HW, BLOCK_HW):
            off, m = _rows(base, start, rows, HW, C, c)
            xh, a, dz = _grad_z(X, DY, off, m, p, mean_b, rstd_b, w, bias, s, t, ACT)
            du = _grad_u(dz, xh, m, s, w, rstd_b, m1_b, m2_b)
            tl.store(DX + off, du.to(DX.dtype.element_ty), mask=m[:, None])
            acc_du += du
        sum_du = tl.sum(acc_du, 0)
    tl.store(DW + n * C + c, sum_da_xh)
    tl.store(DB + n * C + c, sum_da)
    if HAS_P:
        tl.store(DP + n * C + c, sum_du)
    if HAS_MOD:
        tl.store(DS + n * C + c, sum_dz_a)
        tl.store(DT + n * C + c, sum_dz)
