"""Triton transition LayerNorm -> Linear(C -> H) -> ReLU | SwiGLU -> Linear(H -> C), forward and backward,
without ever writing the ``[M, H]`` hidden activation (H = n C; 64 MiB in bf16 for the AF2 pair stack).

Notation: x ``[M, C]`` (rows addressed in place through :func:`_launch.row_layout`), z = LN(x) in the GEMM
dtype, W1 ``[H, C]`` (ReLU) or ``[2H, C]`` (SwiGLU: rows ``[0, H)`` the swish half a, ``[H, 2H)`` the linear
half b), W2 ``[C, H]``; h = act(z W1^T + b1) ``[M, H]``, y = h W2^T + b2.

* forward: one program owns ``BLOCK_M`` full rows: LayerNorm in registers (fp32 two-pass statistics),
  then for each ``BLOCK_H`` slice of the hidden width: the up-projection slice, the activation, and its
  contribution to y accumulated in a ``[BLOCK_M, C]`` fp32 tile. Saved: x, mean and rstd (8 bytes a row).
* backward dx (persistent programs over row tiles): z recomputed; per hidden slice the up-projection is
  recomputed, dh = act'(.) * (dY W2[:, slice]), dz += dh W1[slice]; the LayerNorm backward runs on the
  ``[BLOCK_M, C]`` dz tile in the epilogue; dgamma/dbeta partial sums per program.
* backward dW1, dW2, db1, db2: grid (hidden slices x row splits); each program recomputes z, the hidden
  slice and dh for its rows and accumulates dW1[slice] += dh^T z, dW2[:, slice]^T += h^T dY in registers,
  writing one fp32 partial per split; partials are summed in a second pass. No atomics: bitwise-reproducible
  weight gradients.

Cost: 2 GEMM passes forward, 3 (dx) + 4 (weights) backward, against 2 + 4 for an implementation that
saves the hidden -- traded for the 2 x ``[M, H]`` activations it would keep (ReLU: h; SwiGLU: a, b).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from foldforge.kernels import _launch
from foldforge.kernels._layer_norm_triton import _cv, _load_rows, _xhat_saved
from foldforge.kernels._ln_linear_triton import _grid_split


@triton.jit
def to_dtype(x, REF, RNE: tl.constexpr):
    """fp32 ``x`` in the element dtype of pointer ``REF``, rounded to nearest even also under the
    interpreter (``RNE``): see :func:`_layer_norm_triton._cv`."""
    return _cv(x, REF.dtype.element_ty, RNE)


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """``acc + a b`` for one K tile. IEEE fp32 (``PREC == "ieee"``: FMA instructions, no tensor cores)
    sums this tile's products from zero and then adds them to ``acc``: ``tl.dot(a, b, acc)`` would run
    one sequential FMA chain over the whole reduction, measured (H200) at 4-7x the error of cuBLAS's fp32
    GEMM at K = 384-768, against ~1-2x with chains one tile long. Tensor-core paths accumulate in place."""
    if PREC == "ieee":
        acc = acc + tl.dot(a, b, input_precision=PREC)
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _ln_tile(X, LW, LB, Mean, Rstd, rows, cs, M, C, D1, D2, s0, s1, s2, eps,
             HAS_LW: tl.constexpr, HAS_LB: tl.constexpr, LOAD_STATS: tl.constexpr, REF,
             RNE: tl.constexpr):
    """x_hat (fp32) and z = x_hat * gamma + beta rounded to the GEMM dtype for one row tile; statistics
    computed and stored, or loaded (backward)."""
    row_ok = rows < M
    c_ok = cs < C
    mask = row_ok[:, None] & c_ok[None, :]
    x = _load_rows(X, rows, cs, mask, D1, D2, s0, s1, s2)
    if LOAD_STATS:
        xhat, _ = _xhat_saved(x, Mean, Rstd, rows, row_ok, mask)
    else:
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)
        xhat = xc * rstd[:, None]
    z = xhat
    if HAS_LW:
        z = z * tl.load(LW + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LB:
        z = z + tl.load(LB + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    z = to_dtype(tl.where(mask, z, 0.0), REF, RNE)
    return xhat, z


@triton.jit
def _up(z, W1, B1, hs, cs, H, C, sw1h, sw1c, HAS_B1: tl.constexpr, DOT_F32: tl.constexpr,
        PREC: tl.constexpr, REF, RNE: tl.constexpr):
    """One slice of the up-projection z W1[hs]^T + b1[hs] ([BLOCK_M, BLOCK_H], fp32) and the W1 slice
    ([BLOCK_H, BLOCK_C], as the dot operand) for reuse in backward."""
    h_ok = hs < H
    w = to_dtype(tl.load(W1 + hs[:, None] * sw1h + cs[None, :] * sw1c, mask=h_ok[:, None] & (cs < C)[None, :],
                         other=0.0).to(tl.float32), REF, RNE)
    if DOT_F32:
        w = w.to(tl.float32)
        z = z.to(tl.float32)
    a = tl.dot(z, tl.trans(w), input_precision=PREC)
    if HAS_B1:
        a += to_dtype(tl.load(B1 + hs, mask=h_ok, other=0.0).to(tl.float32), REF, RNE).to(tl.float32)[None, :]
    return a, w


@triton.jit
def _w2_slice(W2, cs, hs, C, H, sw2c, sw2h, DOT_F32: tl.constexpr, REF, RNE: tl.constexpr):
    """W2[:, hs] as a [BLOCK_C, BLOCK_H] dot operand."""
    w = to_dtype(tl.load(W2 + cs[:, None] * sw2c + hs[None, :] * sw2h, mask=(cs < C)[:, None] & (hs < H)[None, :],
                         other=0.0).to(tl.float32), REF, RNE)
    if DOT_F32:
        w = w.to(tl.float32)
    return w


@triton.jit(do_not_specialize=["M"])
def _fwd_kernel(X, LW, LB, W1, B1, W2, B2, Y, Mean, Rstd, M, C, H, D1, D2, s0, s1, s2,
                sw1h, sw1c, sw2c, sw2h, eps,
                HAS_LW: tl.constexpr, HAS_LB: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                SWIGLU: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, RNE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cs = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    c_ok = cs < C
    # every name assigned in a loop body below is new to the loop or keeps its type and shape (Triton
    # requires it of loop-carried values; the interpreter does not check): no shared throwaway names
    xhat_unused, z = _ln_tile(X, LW, LB, Mean, Rstd, rows, cs, M, C, D1, D2, s0, s1, s2, eps,
                              HAS_LW, HAS_LB, False, Y, RNE)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        a, w1a_unused = _up(z, W1, B1, hs, cs, H, C, sw1h, sw1c, HAS_B1, DOT_F32, PREC, Y, RNE)
        if SWIGLU:
            b, w1b_unused = _up(z, W1, B1, hs + H, cs, 2 * H, C, sw1h, sw1c, HAS_B1, DOT_F32, PREC, Y, RNE)
            h = a / (1.0 + tl.exp(-a)) * b
        else:
            h = tl.maximum(a, 0.0)
        hq = to_dtype(h, Y, RNE)
        if DOT_F32:
            hq = hq.to(tl.float32)
        acc = mma(hq, tl.trans(_w2_slice(W2, cs, hs, C, H, sw2c, sw2h, DOT_F32, Y, RNE)), acc, PREC)
    if HAS_B2:
        acc += to_dtype(tl.load(B2 + cs, mask=c_ok, other=0.0).to(tl.float32), Y, RNE).to(tl.float32)[None, :]
    y_row = rows.to(tl.int64) * C
    tl.store(Y + y_row[:, None] + cs[None, :], to_dtype(acc, Y, RNE), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _dhidden(z, dy, W1, B1, W2, hs, cs, H, C, sw1h, sw1c, sw2c, sw2h, HAS_B1: tl.constexpr,
             SWIGLU: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, REF, RNE: tl.constexpr):
    """For one hidden slice: the activation h, the gradients of the pre-activations (dh_a; dh_b for SwiGLU,
    else a copy of dh_a), and the W1 slices (dot operands). dY W2[:, slice] is the gradient of h."""
    a, w1a = _up(z, W1, B1, hs, cs, H, C, sw1h, sw1c, HAS_B1, DOT_F32, PREC, REF, RNE)
    dyc = dy
    if DOT_F32:
        dyc = dy.to(tl.float32)
    dh = tl.dot(dyc, _w2_slice(W2, cs, hs, C, H, sw2c, sw2h, DOT_F32, REF, RNE), input_precision=PREC)
    if SWIGLU:
        b, w1b = _up(z, W1, B1, hs + H, cs, 2 * H, C, sw1h, sw1c, HAS_B1, DOT_F32, PREC, REF, RNE)
        s = 1.0 / (1.0 + tl.exp(-a))
        silu = a * s
        h = silu * b
        dh_a = dh * b * s * (1.0 + a * (1.0 - s))
        dh_b = dh * silu
    else:
        w1b = w1a
        h = tl.maximum(a, 0.0)
        dh_a = tl.where(a > 0.0, dh, 0.0)
        dh_b = dh_a
    return h, dh_a, dh_b, w1a, w1b


@triton.jit(do_not_specialize=["M", "tiles_per_prog"])
def _bwd_dx_kernel(DY, X, LW, LB, W1, B1, W2, Mean, Rstd, DX, DLWp, DLBp, M, C, H, D1, D2, s0, s1, s2,
                   sw1h, sw1c, sw2c, sw2h, tiles_per_prog,
                   HAS_LW: tl.constexpr, HAS_LB: tl.constexpr, HAS_B1: tl.constexpr, HAS_DLW: tl.constexpr,
                   HAS_DLB: tl.constexpr, SWIGLU: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
                   RNE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    if HAS_LW:
        lw = tl.load(LW + cs, mask=c_ok, other=0.0).to(tl.float32)
    dlw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    dlb_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, tiles_per_prog):
        rows = (pid * tiles_per_prog + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & c_ok[None, :]
        y_row = rows.to(tl.int64) * C
        xhat, z = _ln_tile(X, LW, LB, Mean, Rstd, rows, cs, M, C, D1, D2, s0, s1, s2, 0.0,
                           HAS_LW, HAS_LB, True, DY, RNE)
        dy = tl.load(DY + y_row[:, None] + cs[None, :], mask=mask, other=0.0)
        dz = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_unused, dh_a, dh_b, w1a, w1b = _dhidden(z, dy, W1, B1, W2, hs, cs, H, C, sw1h, sw1c, sw2c, sw2h,
                                                      HAS_B1, SWIGLU, DOT_F32, PREC, DY, RNE)
            dh_aq = to_dtype(dh_a, DY, RNE)
            if DOT_F32:
                dh_aq = dh_aq.to(tl.float32)
            dz = mma(dh_aq, w1a, dz, PREC)
            if SWIGLU:
                dh_bq = to_dtype(dh_b, DY, RNE)
                if DOT_F32:
                    dh_bq = dh_bq.to(tl.float32)
                dz = mma(dh_bq, w1b, dz, PREC)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        if HAS_LW:
            g = dz * lw[None, :]
        else:
            g = dz
        c1 = tl.sum(xhat * g, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + y_row[:, None] + cs[None, :], to_dtype(dx, DX, RNE), mask=mask)
        if HAS_DLW:
            dlw_acc += tl.sum(dz * xhat, axis=0)
        if HAS_DLB:
            dlb_acc += tl.sum(dz, axis=0)
    if HAS_DLW:
        tl.store(DLWp + pid.to(tl.int64) * C + cs, dlw_acc, mask=c_ok)
    if HAS_DLB:
        tl.store(DLBp + pid.to(tl.int64) * C + cs, dlb_acc, mask=c_ok)


@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _bwd_dw_kernel(DY, X, LW, LB, W1, B1, W2, Mean, Rstd, DW1p, DW2p, DB1p, DB2p, M, C, H, D1, D2, s0, s1, s2,
                   sw1h, sw1c, sw2c, sw2h, tiles_per_split,
                   HAS_LW: tl.constexpr, HAS_LB: tl.constexpr, HAS_B1: tl.constexpr, HAS_DB1: tl.constexpr,
                   HAS_DB2: tl.constexpr, SWIGLU: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
                   RNE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """Partials over this split's rows, for hidden slice ``pid_h``: dW1[slice] (and dW1[H + slice] for
    SwiGLU) = dh^T z, dW2[:, slice]^T = h^T dY, db1[slice] = sum dh; db2 = sum dY (first slice only).
    Partial layouts: DW1p ``[splits, H1, C]`` (H1 = H or 2H), DW2p ``[splits, H, C]`` (transposed)."""
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cs = tl.arange(0, BLOCK_C)
    h_ok = hs < H
    c_ok = cs < C
    acc_w1a = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    acc_w1b = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    acc_w2 = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    db1a = tl.zeros([BLOCK_H], dtype=tl.float32)
    db1b = tl.zeros([BLOCK_H], dtype=tl.float32)
    db2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        rows = (pid_s * tiles_per_split + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & c_ok[None, :]
        y_row = rows.to(tl.int64) * C
        xhat_unused, z = _ln_tile(X, LW, LB, Mean, Rstd, rows, cs, M, C, D1, D2, s0, s1, s2, 0.0,
                                  HAS_LW, HAS_LB, True, DY, RNE)
        dy = tl.load(DY + y_row[:, None] + cs[None, :], mask=mask, other=0.0)
        h, dh_a, dh_b, w1a_unused, w1b_unused = _dhidden(z, dy, W1, B1, W2, hs, cs, H, C, sw1h, sw1c, sw2c,
                                                         sw2h, HAS_B1, SWIGLU, DOT_F32, PREC, DY, RNE)
        # padded rows: z = 0 and dY = 0 there, so h = act(b1) contributes nothing to dW2 (times dY = 0)
        # and dh = 0; masking keeps db1 exact as well
        dh_a = tl.where(row_ok[:, None], dh_a, 0.0)
        if HAS_DB1:
            db1a += tl.sum(dh_a, axis=0)
        if HAS_DB2:
            db2 += tl.sum(dy.to(tl.float32), axis=0)
        hq = to_dtype(h, DY, RNE)
        dh_aq = to_dtype(dh_a, DY, RNE)
        dyq = dy
        zq = z
        if DOT_F32:
            hq = hq.to(tl.float32)
            dh_aq = dh_aq.to(tl.float32)
            dyq = dyq.to(tl.float32)
            zq = zq.to(tl.float32)
        acc_w2 = mma(tl.trans(hq), dyq, acc_w2, PREC)
        acc_w1a = mma(tl.trans(dh_aq), zq, acc_w1a, PREC)
        if SWIGLU:
            dh_b = tl.where(row_ok[:, None], dh_b, 0.0)
            if HAS_DB1:
                db1b += tl.sum(dh_b, axis=0)
            dh_bq = to_dtype(dh_b, DY, RNE)
            if DOT_F32:
                dh_bq = dh_bq.to(tl.float32)
            acc_w1b = mma(tl.trans(dh_bq), zq, acc_w1b, PREC)
    wmask = h_ok[:, None] & c_ok[None, :]
    h1 = 2 * H if SWIGLU else H
    base1 = DW1p + pid_s.to(tl.int64) * h1 * C
    tl.store(base1 + hs[:, None] * C + cs[None, :], acc_w1a, mask=wmask)
    base2 = DW2p + pid_s.to(tl.int64) * H * C
    tl.store(base2 + hs[:, None] * C + cs[None, :], acc_w2, mask=wmask)
    if HAS_DB1:
        tl.store(DB1p + pid_s.to(tl.int64) * h1 + hs, db1a, mask=h_ok)
    if SWIGLU:
        tl.store(base1 + (hs[:, None] + H) * C + cs[None, :], acc_w1b, mask=wmask)
        if HAS_DB1:
            tl.store(DB1p + pid_s.to(tl.int64) * h1 + H + hs, db1b, mask=h_ok)
    if HAS_DB2:
        if pid_h == 0:
            tl.store(DB2p + pid_s.to(tl.int64) * C + cs, db2, mask=c_ok)


# ---------------------------------------------------------------- launch parameters
def bucket(c: int, h: int, swiglu: bool) -> str:
    return f"{'swiglu' if swiglu else 'relu'}:{_launch.next_pow2(c)}x{min(_launch.next_pow2(h), 4096)}"


def default_config(c: int, h: int, swiglu: bool) -> dict:
    """Heuristic tiles when the GPU has no committed entry. The [BLOCK_M, C] fp32 output / dz tile and the
    z tile stay in registers, so BLOCK_M shrinks as C grows; SwiGLU carries two up-projection slices.
    bwd_dw at C > 512 uses 16 x 16 tiles: compiled for sm_90, 32 x 32 needs 260-330 KB of shared memory
    (layout conversions of the [*, BLOCK_C] operands; more than the 227 KB a block may have) against
    130-165 KB."""
    bc = max(16, _launch.next_pow2(c))
    bh_full = max(16, _launch.next_pow2(h))
    bm = 64 if bc <= 128 else 32 if bc <= 256 else 16
    # bc = 1024 (c in 513..1024): 16-row hidden slices; 32 needed 263 KB of shared memory for SwiGLU's dx
    # kernel under Triton 3.6 on sm_90 (four [32, 1024] W1 operand copies), 16 halves it
    bh = min(bh_full, 16 if bc >= 1024 else 32 if swiglu or bc >= 256 else 64)
    warps = 4 if bc <= 64 else 8
    return {
        "fwd": {"BLOCK_M": bm, "BLOCK_H": bh, "num_warps": warps, "num_stages": 2},
        "bwd_dx": {"BLOCK_M": bm, "BLOCK_H": bh, "num_warps": warps, "num_stages": 2, "programs_per_sm": 2},
        "bwd_dw": {"BLOCK_M": 64 if bc <= 128 else 32 if bc <= 512 else 16,
                   "BLOCK_H": min(bh_full, 64 if bc <= 128 else 32 if bc <= 512 else 16),
                   "num_warps": warps, "num_stages": 2, "programs_per_sm": 2},
    }


def config(device: torch.device, c: int, h: int, swiglu: bool) -> dict:
    return _launch.tuned(device, "transition", bucket(c, h, swiglu)) or default_config(c, h, swiglu)


# ---------------------------------------------------------------- forward / backward
def _gemm_weights(w1: Tensor, w2: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """W1, W2 in the GEMM dtype. fp32 master weights are rounded once here (round to nearest, as the kernels
    would): loaded as fp32 tiles, their software-pipelined buffers doubled the kernels' shared memory
    (Triton on sm_90: 230 KB for SwiGLU dx at c = 384, 460 KB at c = 1024) and made a second binary per
    kernel. Weights are small (2 n c^2 elements); the cast is one short copy."""
    return (w1 if w1.dtype == dtype else w1.to(dtype)), (w2 if w2.dtype == dtype else w2.to(dtype))


def _hidden(w1: Tensor, swiglu: bool) -> int:
    return w1.shape[0] // 2 if swiglu else w1.shape[0]


def forward(x: Tensor, lw: Tensor | None, lb: Tensor | None, w1: Tensor, b1: Tensor | None, w2: Tensor,
            b2: Tensor | None, eps: float, swiglu: bool, gemm_dtype: torch.dtype,
            cfg: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``y [*, C]`` in ``gemm_dtype``, ``mean``/``rstd`` ``[M]`` fp32."""
    c = x.shape[-1]
    h = _hidden(w1, swiglu)
    m = x.numel() // c
    y = torch.empty(x.shape, dtype=gemm_dtype, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if m == 0:
        return y, mean, rstd
    k = (cfg or config(x.device, c, h, swiglu))["fwd"]
    w1, w2 = _gemm_weights(w1, w2, gemm_dtype)
    x, (d1, d2), (s0, s1, s2) = _launch.rows_2d(x)
    _fwd_kernel[(triton.cdiv(m, k["BLOCK_M"]),)](
        x, lw if lw is not None else y, lb if lb is not None else y, w1, b1 if b1 is not None else y, w2,
        b2 if b2 is not None else y, y, mean, rstd, m, c, h, d1, d2, s0, s1, s2,
        w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), eps,
        HAS_LW=lw is not None, HAS_LB=lb is not None, HAS_B1=b1 is not None, HAS_B2=b2 is not None,
        SWIGLU=swiglu, RNE=_launch.interpreting(), **_launch.dot_args(gemm_dtype, follow_torch_tf32=False),
        BLOCK_M=k["BLOCK_M"], BLOCK_C=max(16, _launch.next_pow2(c)), BLOCK_H=k["BLOCK_H"],
        num_warps=k["num_warps"], num_stages=k["num_stages"])
    return y, mean, rstd


def backward(dy: Tensor, x: Tensor, lw: Tensor | None, lb: Tensor | None, w1: Tensor, b1: Tensor | None,
             w2: Tensor, mean: Tensor, rstd: Tensor, swiglu: bool, *, need_dlw: bool, need_dlb: bool,
             need_db1: bool, need_db2: bool, cfg: dict | None = None):
    """``dx`` (x's dtype), then fp32 ``dlw, dlb, dw1, db1, dw2, db2`` (None where not needed)."""
    c = x.shape[-1]
    h = _hidden(w1, swiglu)
    m = x.numel() // c
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if m == 0:
        z = lambda *s: torch.zeros(*s, **f32)   # noqa: E731
        return (dx, z(c) if need_dlw else None, z(c) if need_dlb else None, z(w1.shape),
                z(w1.shape[0]) if need_db1 else None, z(w2.shape), z(c) if need_db2 else None)
    dy2 = dy.reshape(m, c)
    if not dy2.is_contiguous():
        dy2 = dy2.contiguous()
    cfg = cfg or config(x.device, c, h, swiglu)
    w1, w2 = _gemm_weights(w1, w2, dy2.dtype)
    x, (d1, d2), (s0, s1, s2) = _launch.rows_2d(x)
    common = dict(HAS_LW=lw is not None, HAS_LB=lb is not None, HAS_B1=b1 is not None, SWIGLU=swiglu,
                  RNE=_launch.interpreting(),
                  BLOCK_C=max(16, _launch.next_pow2(c)), **_launch.dot_args(dy2.dtype, follow_torch_tf32=False))
    ptrs = (dy2, x, lw if lw is not None else dx, lb if lb is not None else dx, w1, b1 if b1 is not None else dx,
            w2, mean, rstd)
    strides = (w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1))

    k = cfg["bwd_dx"]
    programs, per = _grid_split(triton.cdiv(m, k["BLOCK_M"]), k["programs_per_sm"] * _launch.sm_count(x.device))
    dlwp = torch.empty((programs, c) if need_dlw else (0,), **f32)
    dlbp = torch.empty((programs, c) if need_dlb else (0,), **f32)
    _bwd_dx_kernel[(programs,)](
        *ptrs, dx, dlwp, dlbp, m, c, h, d1, d2, s0, s1, s2, *strides, per,
        HAS_DLW=need_dlw, HAS_DLB=need_dlb, **common, BLOCK_M=k["BLOCK_M"], BLOCK_H=k["BLOCK_H"],
        num_warps=k["num_warps"], num_stages=k["num_stages"])

    k = cfg["bwd_dw"]
    h_tiles = triton.cdiv(h, k["BLOCK_H"])
    target = max(1, k["programs_per_sm"] * _launch.sm_count(x.device) // h_tiles)
    splits, per = _grid_split(triton.cdiv(m, k["BLOCK_M"]), target)
    dw1p = torch.empty((splits, *w1.shape), **f32)
    dw2p = torch.empty((splits, h, c), **f32)
    db1p = torch.empty((splits, w1.shape[0]) if need_db1 else (0,), **f32)
    db2p = torch.empty((splits, c) if need_db2 else (0,), **f32)
    _bwd_dw_kernel[_launch.check_grid((h_tiles, splits))](
        *ptrs, dw1p, dw2p, db1p, db2p, m, c, h, d1, d2, s0, s1, s2, *strides, per,
        HAS_DB1=need_db1, HAS_DB2=need_db2, **common, BLOCK_M=k["BLOCK_M"], BLOCK_H=k["BLOCK_H"],
        num_warps=k["num_warps"], num_stages=k["num_stages"])
    # second pass: fixed-order sums of the per-program / per-split partials
    return (dx, dlwp.sum(0) if need_dlw else None, dlbp.sum(0) if need_dlb else None, dw1p.sum(0),
            db1p.sum(0) if need_db1 else None, dw2p.sum(0).t(), db2p.sum(0) if need_db2 else None)
