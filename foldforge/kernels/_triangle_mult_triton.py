"""Triton triangle multiplicative update (AF2 Suppl. Alg. 11/12), forward and backward.

Notation: rows r = (b, i, j) of the pair tensor z ``[B, L, L, c_z]`` (M = B L^2 rows, addressed in place
through :func:`_launch.row_layout`), K = c_z, C = c_hidden. "act" is z's dtype.

Forward, three steps:

1. ``_proj_fwd_kernel`` (one pass over z): LayerNorm in fp32 registers, then the five input projections
   against the weights as one concatenated GEMM, tile by tile of C, with the gated epilogue
   ``a = mask * sigmoid(x W_ag) * (x W_ap)`` (same for b) written straight into the channel-major
   layout ``[B, C, L, L]``, and the output gate ``sigmoid(x W_g)`` ``[M, c_z]``. x itself is not stored.
2. the contraction over k as one batched GEMM per (batch, channel) with fp32 output (cuBLAS):
   outgoing ``T_c = A_c B_c^T``, incoming ``T_c = A_c^T B_c`` -- the transposes are GEMM flags, so neither
   direction copies a transposed pair tensor.
3. ``_out_fwd_kernel``: LayerNorm over C of the channel-major T (fp32), output projection, bias and gate.

Saved for backward: z, the input LayerNorm statistics, A and B (act), the gate (act), T (fp32) and its
LayerNorm statistics. The normalised x and LayerNorm(T) are recomputed.

Backward:

1. ``_out_bwd_kernel``: per row tile, recompute u = LayerNorm(T) and the output projection; write
   ``dY * gate`` and u (operands of dW_z), the gate pre-activation gradient, and dT (channel-major) after
   the LayerNorm backward; per-tile partial sums of the LayerNorm weight/bias gradients.
2. dA, dB as batched GEMMs (outgoing: ``dA = dT B``, ``dB = dT^T A``; incoming: ``dA = B dT^T``,
   ``dB = A dT``).
3. ``_proj_bwd_kernel``: recompute x and the four a/b pre-activations, form their gradients, accumulate
   dx over all five projections in registers, run the LayerNorm backward into dz, and write the
   pre-activation gradients ``[M, 4C + c_z]`` and x (act) for the weight gradients.
4. weight gradients as plain GEMMs over rows (``dW = dPre^T x`` with fp32 output) and bias gradients as
   column sums; LayerNorm parameter gradients as fixed-order sums of per-tile partials. No atomics: every
   gradient is bitwise reproducible on a given GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from foldforge.kernels import _launch
from foldforge.kernels._layer_norm_triton import _bound, _cv, _load_rows, _xhat_saved

MAX_C = 256      # c_z and c_hidden are each held as one register tile per row


@triton.jit
def _cm_rows(r0, rows, LL, C, EVEN_LL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Offsets (int64) of channel 0 of the tile's rows r = (b, p) in a channel-major ``[B, C, L, L]`` tensor,
    and the stride between channel planes (``LL``).

    With ``EVEN_LL`` (``LL % BLOCK_M == 0``; the tile is rows ``r0 + arange(BLOCK_M)``) the tile lies in one
    batch entry: its offsets are one run of BLOCK_M consecutive elements starting at a multiple of BLOCK_M,
    and the plane stride is a multiple of BLOCK_M. Both are written so that Triton's alignment analysis
    derives them (LL itself is not specialised; ``(LL // BLOCK_M) * BLOCK_M == LL`` here), so accesses along
    the rows are vectorised and coalesced. Otherwise every row's batch entry is found separately."""
    if EVEN_LL:
        plane = (LL // BLOCK_M) * BLOCK_M
        r = r0.to(tl.int64)
        b = r // plane
        cm = b * (C * plane) + (r - b * plane) + tl.arange(0, BLOCK_M)
    else:
        plane = LL
        r = rows.to(tl.int64)
        b = r // LL
        cm = b * (C * LL) + (r - b * LL)
    return cm, plane


@triton.jit
def _sigmoid(x):
    """``1 / (1 + exp(-x))`` in fp32 to ~1 ulp on the GPU, where ``tl.exp``/``tl.sigmoid`` are
    ``ex2.approx`` of the rounded product ``-x log2(e)`` (its rounding error grows with |x|) and ``/`` is an
    approximate division: the product's rounding error is restored to first order (fma residual plus
    the low part of log2(e)) and the division is IEEE."""
    nx = -x
    t = nx * 1.4426950408889634
    d = tl.fma(nx, 1.4426950408889634, -t) + nx * 1.925963033500912e-08
    e = tl.exp2(t) * (1.0 + d * 0.6931471805599453)
    return tl.div_rn(tl.zeros_like(e) + 1.0, 1.0 + e)


@triton.jit
def _div(x, n):
    """``x / n`` (fp32 tensor by a scalar) correctly rounded: ``/`` is an approximate division on the GPU."""
    return tl.div_rn(x, tl.zeros_like(x) + n)


@triton.jit
def _rstd(sum_sq, n, eps):
    """``1 / sqrt(sum_sq / n + eps)`` correctly rounded in each step (``tl.sqrt`` is the approximate square
    root), as the fp32 reference computes its LayerNorm statistics."""
    return _div(tl.zeros_like(sum_sq) + 1.0, tl.sqrt_rn(_div(sum_sq, n) + eps))


@triton.jit
def _proj(x, W, Bias, cs, c_ok, ks, k_ok, K, ACT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """``x W[cs]^T + b[cs]`` for one tile of output channels: ``[BLOCK_M, BLOCK_C]`` fp32, plus the
    weight tile (act dtype, for the backward dx product)."""
    w = _cv(tl.load(W + cs[:, None] * K + ks[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0), ACT, DOT_F32)
    if DOT_F32:
        w = w.to(tl.float32)
    y = tl.dot(x, tl.trans(w), input_precision=PREC)
    y += _cv(tl.load(Bias + cs, mask=c_ok, other=0.0), ACT, DOT_F32).to(tl.float32)[None, :]
    return y, w


# EVEN_LL (every kernel below): L*L % BLOCK_M == 0, so row tiles are full and stay in one batch entry.
@triton.jit(do_not_specialize=["M", "LL"])
def _proj_fwd_kernel(Z, MASK, LNW, LNB, WAP, BAP, WAG, BAG, WBP, BBP, WBG, BBG, WG, BG,
                     A, B, G, Mean, Rstd, M, K, C, LL, D1, D2, s0, s1, s2, eps,
                     HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, EVEN_LL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    ACT: tl.constexpr = A.dtype.element_ty
    r0 = tl.program_id(0) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = _bound(rows, M, EVEN_LL)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    mk2 = row_ok[:, None] & k_ok[None, :]
    z = _load_rows(Z, rows, ks, mk2, D1, D2, s0, s1, s2)
    mean = _div(tl.sum(z, axis=1), K)
    zc = tl.where(mk2, z - mean[:, None], 0.0)
    rstd = _rstd(tl.sum(zc * zc, axis=1), K, eps)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    x = zc * rstd[:, None] * tl.load(LNW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :] \
        + tl.load(LNB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    # rounded to act exactly where the reference rounds its LayerNorm output
    x = _cv(tl.where(mk2, x, 0.0), ACT, DOT_F32)
    if DOT_F32:
        x = x.to(tl.float32)
    if HAS_MASK:
        m = tl.load(MASK + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        m = tl.where(row_ok, 1.0, 0.0)
    cm, plane = _cm_rows(r0, rows, LL, C, EVEN_LL, BLOCK_M)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        st_ok = row_ok[:, None] & c_ok[None, :]
        off = cm[:, None] + cs[None, :].to(tl.int64) * plane
        p, _w = _proj(x, WAP, BAP, cs, c_ok, ks, k_ok, K, ACT, DOT_F32, PREC)
        g, _w = _proj(x, WAG, BAG, cs, c_ok, ks, k_ok, K, ACT, DOT_F32, PREC)
        tl.store(A + off, _cv(m[:, None] * _sigmoid(g) * p, ACT, DOT_F32), mask=st_ok)
        p, _w = _proj(x, WBP, BBP, cs, c_ok, ks, k_ok, K, ACT, DOT_F32, PREC)
        g, _w = _proj(x, WBG, BBG, cs, c_ok, ks, k_ok, K, ACT, DOT_F32, PREC)
        tl.store(B + off, _cv(m[:, None] * _sigmoid(g) * p, ACT, DOT_F32), mask=st_ok)
    g_row = rows.to(tl.int64) * K
    for n0 in range(0, K, BLOCK_C):
        ns = n0 + tl.arange(0, BLOCK_C)
        n_ok = ns < K
        g, _w = _proj(x, WG, BG, ns, n_ok, ks, k_ok, K, ACT, DOT_F32, PREC)
        tl.store(G + g_row[:, None] + ns[None, :], _cv(_sigmoid(g), ACT, DOT_F32), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _load_t_norm(T, LNW, LNB, r0, rows, row_ok, C, LL, eps, LOAD_STATS: tl.constexpr, Mean, Rstd,
                 EVEN_LL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows of the channel-major T as a ``[BLOCK_M, BLOCK_C]`` fp32 tile and its LayerNorm over C; also the
    tile's channel-major offsets (``[BLOCK_M, BLOCK_C]``, int64)."""
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    mk = row_ok[:, None] & c_ok[None, :]
    cm, plane = _cm_rows(r0, rows, LL, C, EVEN_LL, BLOCK_M)
    cm_off = cm[:, None] + cs[None, :].to(tl.int64) * plane
    t = tl.load(T + cm_off, mask=mk, other=0.0)
    if LOAD_STATS:
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        tc = tl.where(mk, t - mean[:, None], 0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    else:
        mean = _div(tl.sum(t, axis=1), C)
        tc = tl.where(mk, t - mean[:, None], 0.0)
        rstd = _rstd(tl.sum(tc * tc, axis=1), C, eps)
    that = tc * rstd[:, None]
    lw = tl.load(LNW + cs, mask=c_ok, other=0.0).to(tl.float32)
    u = that * lw[None, :] + tl.load(LNB + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return cs, c_ok, mk, cm_off, mean, rstd, that, lw, tl.where(mk, u, 0.0)


@triton.jit(do_not_specialize=["M", "LL"])
def _out_fwd_kernel(T, LNW, LNB, WZ, BZ, G, Out, Mean, Rstd, M, C, NZ, LL, eps,
                    DOT_F32: tl.constexpr, PREC: tl.constexpr, EVEN_LL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    ACT: tl.constexpr = Out.dtype.element_ty
    r0 = tl.program_id(0) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = _bound(rows, M, EVEN_LL)
    cs, c_ok, mk, cm_off, mean, rstd, that, lw, u = _load_t_norm(
        T, LNW, LNB, r0, rows, row_ok, C, LL, eps, False, Mean, Rstd, EVEN_LL, BLOCK_M, BLOCK_C)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    u = _cv(u, ACT, DOT_F32)
    if DOT_F32:
        u = u.to(tl.float32)
    o_row = rows.to(tl.int64) * NZ
    for n0 in range(0, NZ, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < NZ
        y, _w = _proj(u, WZ, BZ, ns, n_ok, cs, c_ok, C, ACT, DOT_F32, PREC)
        o_ok = row_ok[:, None] & n_ok[None, :]
        g = tl.load(G + o_row[:, None] + ns[None, :], mask=o_ok, other=0.0).to(tl.float32)
        tl.store(Out + o_row[:, None] + ns[None, :], _cv(y * g, ACT, DOT_F32), mask=o_ok)


@triton.jit(do_not_specialize=["M", "LL"])
def _out_bwd_kernel(DY, T, LNW, LNB, WZ, BZ, G, Mean, Rstd, DT, DYL, U, DPRE, DLWp, DLBp, DBp,
                    M, C, NZ, NP, LL, DOT_F32: tl.constexpr, PREC: tl.constexpr, EVEN_LL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = (u W_z^T + b_z) * g, u = LayerNorm(T): writes dY*g, u, dT, and the gate pre-activation
    gradient dY * y * g (1 - g) into columns [4C, 4C + c_z) of DPRE."""
    ACT: tl.constexpr = DT.dtype.element_ty
    pid = tl.program_id(0)
    r0 = pid * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = _bound(rows, M, EVEN_LL)
    cs, c_ok, mk, cm_off, mean, rstd, that, lw, u = _load_t_norm(
        T, LNW, LNB, r0, rows, row_ok, C, LL, 0.0, True, Mean, Rstd, EVEN_LL, BLOCK_M, BLOCK_C)
    u = _cv(u, ACT, DOT_F32)
    tl.store(U + rows.to(tl.int64)[:, None] * C + cs[None, :], u, mask=mk)
    if DOT_F32:
        u = u.to(tl.float32)
    o_row = rows.to(tl.int64) * NZ
    p_row = rows.to(tl.int64) * NP + 4 * C
    du = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for n0 in range(0, NZ, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < NZ
        o_ok = row_ok[:, None] & n_ok[None, :]
        y, w = _proj(u, WZ, BZ, ns, n_ok, cs, c_ok, C, ACT, DOT_F32, PREC)
        dy = tl.load(DY + o_row[:, None] + ns[None, :], mask=o_ok, other=0.0).to(tl.float32)
        g = tl.load(G + o_row[:, None] + ns[None, :], mask=o_ok, other=0.0).to(tl.float32)
        dgp = dy * y * g * (1.0 - g)
        tl.store(DPRE + p_row[:, None] + ns[None, :], _cv(dgp, ACT, DOT_F32), mask=o_ok)
        dyl = dy * g
        # bias gradients from the fp32 values (partials per tile: [b_z | b_g])
        tl.store(DBp + pid * 2 * NZ + ns, tl.sum(dyl, axis=0), mask=n_ok)
        tl.store(DBp + pid * 2 * NZ + NZ + ns, tl.sum(dgp, axis=0), mask=n_ok)
        dyl = _cv(dyl, ACT, DOT_F32)
        tl.store(DYL + o_row[:, None] + ns[None, :], dyl, mask=o_ok)
        if DOT_F32:
            dyl = dyl.to(tl.float32)
        du = tl.dot(dyl, w, du, input_precision=PREC)
    gw = du * lw[None, :]
    c1 = _div(tl.sum(that * gw, axis=1), C)
    c2 = _div(tl.sum(gw, axis=1), C)
    dt = (gw - that * c1[:, None] - c2[:, None]) * rstd[:, None]
    tl.store(DT + cm_off, _cv(dt, ACT, DOT_F32), mask=mk)
    tl.store(DLWp + pid * C + cs, tl.sum(du * that, axis=0), mask=c_ok)
    tl.store(DLBp + pid * C + cs, tl.sum(du, axis=0), mask=c_ok)


@triton.jit(do_not_specialize=["M", "LL"])
def _proj_bwd_kernel(Z, MASK, LNW, LNB, WAP, BAP, WAG, BAG, WBP, BBP, WBG, BBG, WG, Mean, Rstd,
                     DA, DB, DPRE, X, DZ, DLWp, DLBp, DBp, M, K, C, NP, LL, D1, D2, s0, s1, s2,
                     HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, EVEN_LL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    ACT: tl.constexpr = X.dtype.element_ty
    pid = tl.program_id(0)
    r0 = pid * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = _bound(rows, M, EVEN_LL)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    mk2 = row_ok[:, None] & k_ok[None, :]
    xhat, rstd = _xhat_saved(_load_rows(Z, rows, ks, mk2, D1, D2, s0, s1, s2), Mean, Rstd, rows, row_ok, mk2)
    lw = tl.load(LNW + ks, mask=k_ok, other=0.0).to(tl.float32)
    x = tl.where(mk2, xhat * lw[None, :] + tl.load(LNB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :],
                 0.0)
    x = _cv(x, ACT, DOT_F32)
    x_row = rows.to(tl.int64) * K
    tl.store(X + x_row[:, None] + ks[None, :], x, mask=mk2)
    if DOT_F32:
        x = x.to(tl.float32)
    if HAS_MASK:
        m = tl.load(MASK + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        m = tl.where(row_ok, 1.0, 0.0)
    cm, plane = _cm_rows(r0, rows, LL, C, EVEN_LL, BLOCK_M)
    p_row = rows.to(tl.int64) * NP
    dxn = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        st_ok = row_ok[:, None] & c_ok[None, :]
        off = cm[:, None] + cs[None, :].to(tl.int64) * plane
        for side in tl.static_range(2):
            if side == 0:
                p, wp = _proj(x, WAP, BAP, cs, c_ok, ks, k_ok, K, ACT, DOT_F32, PREC)
                g, wg = _proj(x, WAG, BAG, cs, c_ok, ks, k_ok, K, ACT, DOT_F32, PREC)
                d = tl.load(DA + off, mask=st_ok, other=0.0).to(tl.float32)
            else:
                p, wp = _proj(x, WBP, BBP, cs, c_ok, ks, k_ok, K, ACT, DOT_F32, PREC)
                g, wg = _proj(x, WBG, BBG, cs, c_ok, ks, k_ok, K, ACT, DOT_F32, PREC)
                d = tl.load(DB + off, mask=st_ok, other=0.0).to(tl.float32)
            s = _sigmoid(g)
            d = d * m[:, None]
            dp = d * s
            dg = d * p * s * (1.0 - s)
            tl.store(DBp + pid * 4 * C + side * 2 * C + cs, tl.sum(dp, axis=0), mask=c_ok)
            tl.store(DBp + pid * 4 * C + side * 2 * C + C + cs, tl.sum(dg, axis=0), mask=c_ok)
            dp = _cv(dp, ACT, DOT_F32)
            dg = _cv(dg, ACT, DOT_F32)
            col = p_row[:, None] + side * 2 * C + cs[None, :]
            tl.store(DPRE + col, dp, mask=st_ok)
            tl.store(DPRE + col + C, dg, mask=st_ok)
            if DOT_F32:
                dp = dp.to(tl.float32)
                dg = dg.to(tl.float32)
            dxn = tl.dot(dp, wp, dxn, input_precision=PREC)
            dxn = tl.dot(dg, wg, dxn, input_precision=PREC)
    for n0 in range(0, K, BLOCK_C):
        ns = n0 + tl.arange(0, BLOCK_C)
        n_ok = ns < K
        dgp = tl.load(DPRE + p_row[:, None] + 4 * C + ns[None, :], mask=row_ok[:, None] & n_ok[None, :],
                      other=0.0)
        w = _cv(tl.load(WG + ns[:, None] * K + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0), ACT, DOT_F32)
        if DOT_F32:
            dgp = dgp.to(tl.float32)
            w = w.to(tl.float32)
        dxn = tl.dot(dgp, w, dxn, input_precision=PREC)
    gw = dxn * lw[None, :]
    c1 = _div(tl.sum(xhat * gw, axis=1), K)
    c2 = _div(tl.sum(gw, axis=1), K)
    dz = (gw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    tl.store(DZ + x_row[:, None] + ks[None, :], _cv(dz, DZ.dtype.element_ty, DOT_F32), mask=mk2)
    tl.store(DLWp + pid * K + ks, tl.sum(dxn * xhat, axis=0), mask=k_ok)
    tl.store(DLBp + pid * K + ks, tl.sum(dxn, axis=0), mask=k_ok)


# ---------------------------------------------------------------- launch parameters
def bucket(k: int, c: int) -> str:
    return f"{_launch.next_pow2(k)}x{_launch.next_pow2(c)}"


def default_config(k: int, c: int) -> dict:
    """Heuristic launch parameters when the GPU has no committed entry for this bucket: 64-row tiles
    (one 128-byte segment of j per channel in the channel-major stores), 32 rows from c_z = 256."""
    wide = max(k, c) > 128
    bm = 32 if wide else 64
    return {
        "proj_fwd": {"BLOCK_M": bm, "BLOCK_C": 32, "num_warps": 4, "num_stages": 2},
        "out_fwd": {"BLOCK_M": bm, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
        "out_bwd": {"BLOCK_M": bm, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
        "proj_bwd": {"BLOCK_M": bm, "BLOCK_C": 32, "num_warps": 8 if wide else 4, "num_stages": 2},
    }


def config(device: torch.device, k: int, c: int) -> dict:
    return _launch.tuned(device, "triangle_mult", bucket(k, c)) or default_config(k, c)


class _IEEEMatmul:
    """cuBLAS in full precision for the duration: TF32 off for fp32 GEMMs, and no reduced-precision
    (16-bit) split-K reductions in the 16-bit GEMMs. The flags are only written when one is on, so the
    default settings cost two attribute reads."""
    _FLAGS = ("allow_tf32", "allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")

    def __enter__(self):
        m = torch.backends.cuda.matmul
        self.saved = {f: getattr(m, f) for f in self._FLAGS if getattr(m, f, False)}
        for f in self.saved:
            setattr(m, f, False)

    def __exit__(self, *exc):
        for f, v in self.saved.items():
            setattr(torch.backends.cuda.matmul, f, v)
        return False


def _launch_args(c: dict, **blocks) -> dict:
    return {**blocks, "num_warps": c["num_warps"], "num_stages": c["num_stages"]}


def _bmm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Batched ``a @ b`` accumulated in fp32 (IEEE products) and rounded once to ``out_dtype`` (cuBLAS;
    on the CPU through fp32 operands, which gives the same exact products)."""
    if a.is_cuda:
        with _IEEEMatmul():
            if a.dtype == out_dtype:
                return torch.bmm(a, b)
            return torch.bmm(a, b, out_dtype=out_dtype)
    return torch.bmm(a.float(), b.float()).to(out_dtype)


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with an fp32 result (IEEE products): weight gradients sum M = B L^2 rows."""
    if a.is_cuda:
        with _IEEEMatmul():
            if a.dtype == torch.float32:
                return a @ b
            return torch.mm(a, b, out_dtype=torch.float32)
    if a.dtype == torch.float32:
        return a @ b
    return a.float() @ b.float()


def _contract(a: Tensor, b: Tensor, outgoing: bool, out_dtype: torch.dtype) -> Tensor:
    """Per (batch, channel): outgoing ``a b^T``, incoming ``a^T b``; ``[B C, L, L]`` operands."""
    if outgoing:
        return _bmm(a, b.transpose(1, 2), out_dtype)
    return _bmm(a.transpose(1, 2), b, out_dtype)


def _dims(z: Tensor, params) -> tuple[int, int, int, int, int]:
    length, k = z.shape[-2], z.shape[-1]
    c = params[2].shape[0]
    nb = z.numel() // (length * length * k)
    return nb, length, k, c, nb * length * length


def _even_ll(length: int, c: dict) -> bool:
    """Row tiles of ``c["BLOCK_M"]`` rows never straddle two pair matrices (any crop that is a multiple of 8
    at the default 64-row tiles): the channel-major accesses vectorise along the rows."""
    return (length * length) % c["BLOCK_M"] == 0


def _mask_rows(mask: Tensor | None, m: int, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    return mask.reshape(m).to(dtype).contiguous()


# ---------------------------------------------------------------- forward / backward
def forward(z: Tensor, mask: Tensor | None, params: list[Tensor], outgoing: bool, eps: float,
            cfg: dict | None = None) -> tuple[Tensor, ...]:
    """``out`` (z's shape and dtype) and what backward needs: input LayerNorm mean/rstd ``[M]``, A and B
    ``[B C, L, L]`` (act), gate ``[M, c_z]`` (act), T ``[B C, L, L]`` (fp32), its mean/rstd ``[M]``."""
    lnw, lnb, wap, bap, wag, bag, wbp, bbp, wbg, bbg, wg, bg, lnwo, lnbo, wz, bz = params
    nb, length, k, c, m = _dims(z, params)
    act, dev = z.dtype, z.device
    cfg = cfg or config(dev, k, c)
    f32 = dict(dtype=torch.float32, device=dev)
    a = torch.empty((nb * c, length, length), dtype=act, device=dev)
    b = torch.empty_like(a)
    gate = torch.empty((m, k), dtype=act, device=dev)
    mean, rstd = torch.empty(m, **f32), torch.empty(m, **f32)
    maskf = _mask_rows(mask, m, act)
    zz, (d1, d2), (s0, s1, s2) = _launch.rows_2d(z)
    bk = max(16, _launch.next_pow2(k))
    bc = max(16, _launch.next_pow2(c))
    dot = _launch.dot_args(act, follow_torch_tf32=False)
    wap, wag, wbp, wbg, wg, wz = (_launch.gemm_weight(w, act) for w in (wap, wag, wbp, wbg, wg, wz))
    cp = cfg["proj_fwd"]
    _proj_fwd_kernel[(triton.cdiv(m, cp["BLOCK_M"]),)](
        zz, maskf if maskf is not None else a, lnw, lnb, wap, bap, wag, bag, wbp, bbp, wbg, bbg, wg, bg,
        a, b, gate, mean, rstd, m, k, c, length * length, d1, d2, s0, s1, s2, eps, HAS_MASK=maskf is not None,
        EVEN_LL=_even_ll(length, cp), **dot,
        **_launch_args(cp, BLOCK_M=cp["BLOCK_M"], BLOCK_K=bk, BLOCK_C=min(cp["BLOCK_C"], bc)))
    t = _contract(a, b, outgoing, torch.float32)                  # [B C, L, L] fp32
    out = torch.empty(z.shape, dtype=act, device=dev)
    mean_t, rstd_t = torch.empty(m, **f32), torch.empty(m, **f32)
    co = cfg["out_fwd"]
    _out_fwd_kernel[(triton.cdiv(m, co["BLOCK_M"]),)](
        t, lnwo, lnbo, wz, bz, gate, out, mean_t, rstd_t, m, c, k, length * length, eps,
        EVEN_LL=_even_ll(length, co), **dot,
        **_launch_args(co, BLOCK_M=co["BLOCK_M"], BLOCK_C=bc, BLOCK_N=min(co["BLOCK_N"], bk)))
    return out, mean, rstd, a, b, gate, t, mean_t, rstd_t


def backward(dy: Tensor, z: Tensor, mask: Tensor | None, params: list[Tensor], mean: Tensor, rstd: Tensor,
             a: Tensor, b: Tensor, gate: Tensor, t: Tensor, mean_t: Tensor, rstd_t: Tensor, outgoing: bool,
             cfg: dict | None = None) -> tuple[Tensor, list[Tensor]]:
    """``dz`` (z's dtype, contiguous) and the 16 parameter gradients in :class:`TriMulParams` order (fp32)."""
    lnw, lnb, wap, bap, wag, bag, wbp, bbp, wbg, bbg, wg, bg, lnwo, lnbo, wz, bz = params
    nb, length, k, c, m = _dims(z, params)
    act, dev = z.dtype, z.device
    cfg = cfg or config(dev, k, c)
    f32 = dict(dtype=torch.float32, device=dev)
    bk = max(16, _launch.next_pow2(k))
    bc = max(16, _launch.next_pow2(c))
    dot = _launch.dot_args(act, follow_torch_tf32=False)
    wap, wag, wbp, wbg, wg, wz = (_launch.gemm_weight(w, act) for w in (wap, wag, wbp, wbg, wg, wz))
    dy = dy.reshape(m, k)
    if not dy.is_contiguous():
        dy = dy.contiguous()
    n_pre = 4 * c + k
    dpre = torch.empty((m, n_pre), dtype=act, device=dev)   # pre-activation grads: a_p a_g b_p b_g g
    dyl = torch.empty((m, k), dtype=act, device=dev)
    u = torch.empty((m, c), dtype=act, device=dev)
    dt = torch.empty_like(a)
    co = cfg["out_bwd"]
    tiles = triton.cdiv(m, co["BLOCK_M"])
    dlwo_p, dlbo_p = torch.empty((tiles, c), **f32), torch.empty((tiles, c), **f32)
    dbo_p = torch.empty((tiles, 2 * k), **f32)                # [b_z | b_g] partials
    _out_bwd_kernel[(tiles,)](
        dy, t, lnwo, lnbo, wz, bz, gate, mean_t, rstd_t, dt, dyl, u, dpre, dlwo_p, dlbo_p, dbo_p,
        m, c, k, n_pre, length * length, EVEN_LL=_even_ll(length, co), **dot,
        **_launch_args(co, BLOCK_M=co["BLOCK_M"], BLOCK_C=bc, BLOCK_N=min(co["BLOCK_N"], bk)))
    dwz = _mm_f32(dyl.t(), u)
    dbo = dbo_p.sum(0)
    del dyl, u
    # dA, dB kept in fp32 (not rounded before the gating backward): one rounding fewer than the
    # reference, whose bf16 a/b gradients put the a/b-side bias gradients at up to 2x its error otherwise
    f = torch.float32
    if outgoing:        # t = a b^T
        da, db = _bmm(dt, b, f), _bmm(dt.transpose(1, 2), a, f)
    else:               # t = a^T b
        da, db = _bmm(b, dt.transpose(1, 2), f), _bmm(a, dt, f)
    del dt
    x = torch.empty((m, k), dtype=act, device=dev)
    dz = torch.empty(z.shape, dtype=z.dtype, device=dev)
    maskf = _mask_rows(mask, m, act)
    zz, (d1, d2), (s0, s1, s2) = _launch.rows_2d(z)
    cp = cfg["proj_bwd"]
    tiles = triton.cdiv(m, cp["BLOCK_M"])
    dlw_p, dlb_p = torch.empty((tiles, k), **f32), torch.empty((tiles, k), **f32)
    dbi_p = torch.empty((tiles, 4 * c), **f32)                # [a_p | a_g | b_p | b_g] bias partials
    _proj_bwd_kernel[(tiles,)](
        zz, maskf if maskf is not None else x, lnw, lnb, wap, bap, wag, bag, wbp, bbp, wbg, bbg, wg, mean, rstd,
        da, db, dpre, x, dz, dlw_p, dlb_p, dbi_p, m, k, c, n_pre, length * length, d1, d2, s0, s1, s2,
        HAS_MASK=maskf is not None, EVEN_LL=_even_ll(length, cp), **dot,
        **_launch_args(cp, BLOCK_M=cp["BLOCK_M"], BLOCK_K=bk, BLOCK_C=min(cp["BLOCK_C"], bc)))
    del da, db
    dw = _mm_f32(dpre.t(), x)                                       # [4C + c_z, c_z]
    dbias = dbi_p.sum(0)
    grads = [dlw_p.sum(0), dlb_p.sum(0)]
    for i in range(4):
        grads += [dw[i * c:(i + 1) * c], dbias[i * c:(i + 1) * c]]
    grads += [dw[4 * c:], dbo[k:], dlwo_p.sum(0), dlbo_p.sum(0), dwz, dbo[:k]]
    return dz, grads
