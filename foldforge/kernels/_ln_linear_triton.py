"""Triton Linear(LayerNorm(x)), forward and backward, without ever storing the normalised tensor.

Notation: x ``[M, K]`` (K = C <= 1024; rows addressed in place through :func:`_launch.row_layout`),
z = x_hat * gamma + beta the LayerNorm output, W ``[N, K]``, y = z W^T + b ``[M, N]``.

Two designs; the committed table (``tuned/<gpu>.json``, key ``"<pow2 K>x<pow2 N>"``) picks one per
shape bucket, and each must keep z out of saved memory:

* ``"fused"`` (K <= 256, the whole row fits one register tile):
  - forward: one program normalises ``[BLOCK_M, K]`` rows in registers (fp32 two-pass statistics),
    rounds z to the GEMM dtype and multiplies it by every ``BLOCK_N`` slice of W; z exists only in
    registers. Mean/rstd (8 bytes a row) are the only thing saved.
  - backward dx: dz = dY W accumulated over N in a ``[BLOCK_M, K]`` fp32 tile (the full row), then the
    LayerNorm backward runs in the epilogue on that tile (x_hat recomputed from x, mean, rstd) and
    writes dx; dgamma/dbeta partial sums per program.
  - backward dW: dW = dY^T z as a reduction over rows, split into fixed row ranges; each program
    recomputes z for its rows and writes one ``[N_tile, K]`` partial; partials are summed in a second
    pass. No atomics: bitwise-reproducible dW, dgamma, dbeta.
* ``"hybrid"`` (any K <= 1024): the LayerNorm kernel writes z in the GEMM dtype only transiently, cuBLAS
  does the products (forward y = z W^T; backward dz = dY W and dW = dY^T z with z recomputed), and the
  LayerNorm backward kernel turns dz into dx, dgamma, dbeta. z is freed right after each product.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from foldforge.kernels import _launch
from foldforge.kernels import _layer_norm_triton as _ln
from foldforge.kernels._layer_norm_triton import _load_rows, _xhat_saved

FUSED_MAX_K = 256


@triton.jit(do_not_specialize=["M"])
def _fwd_kernel(X, LW, LB, W, Bias, Y, Mean, Rstd, M, K, N, D1, D2, s0, s1, s2, swn, swk, eps,
                HAS_LW: tl.constexpr, HAS_LB: tl.constexpr, HAS_BIAS: tl.constexpr,
                DOT_F32: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = ks < K
    mask = row_ok[:, None] & k_ok[None, :]
    x = _load_rows(X, rows, ks, mask, D1, D2, s0, s1, s2)
    mean = tl.sum(x, axis=1) / K
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    z = xc * rstd[:, None]
    if HAS_LW:
        z = z * tl.load(LW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LB:
        z = z + tl.load(LB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    # rounded to the GEMM dtype exactly where the reference rounds its LayerNorm output
    z = tl.where(mask, z, 0.0).to(Y.dtype.element_ty)
    if DOT_F32:
        z = z.to(tl.float32)
    y_row = rows.to(tl.int64) * N
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        w = tl.load(W + ns[:, None] * swn + ks[None, :] * swk, mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0).to(Y.dtype.element_ty)
        if DOT_F32:
            w = w.to(tl.float32)
        acc = tl.dot(z, tl.trans(w), input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(Bias + ns, mask=n_ok, other=0.0).to(Y.dtype.element_ty).to(tl.float32)[None, :]
        tl.store(Y + y_row[:, None] + ns[None, :], acc.to(Y.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M", "tiles_per_prog"])
def _bwd_dx_kernel(DY, W, X, LW, LB, Mean, Rstd, DX, DLWp, DLBp, DWp, DBp, M, K, N, D1, D2, s0, s1, s2,
                   swn, swk, tiles_per_prog,
                   HAS_LW: tl.constexpr, HAS_LB: tl.constexpr, HAS_DLW: tl.constexpr, HAS_DLB: tl.constexpr,
                   FUSE_DW: tl.constexpr, HAS_DB: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """dz = dY W ([BLOCK_M, K] fp32, never stored), then dx = rstd (g - mean(g) - x_hat mean(g x_hat)),
    g = dz * gamma; dgamma += dz * x_hat, dbeta += dz kept per program.

    FUSE_DW (N <= BLOCK_N: the few-heads bias projections, e.g. c_z -> 8): the program also accumulates
    its partial dW = dY^T z and db from the tile it already holds, so x is read once for the whole
    backward instead of once more by the dW kernel (x is 16 of the ~49 MB moved at [65536, 128] -> 8)."""
    pid = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    if HAS_LW:
        lw = tl.load(LW + ks, mask=k_ok, other=0.0).to(tl.float32)
    if FUSE_DW:
        if HAS_LB:
            lb = tl.load(LB + ks, mask=k_ok, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # 1-D partials, reduced over each tile's rows: the [BLOCK_M, K] dz accumulator already takes 32-64
    # registers a thread; two more 2-D accumulators would spill at K = 256.
    dlw_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    dlb_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for t in range(0, tiles_per_prog):
        rows = (pid * tiles_per_prog + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        y_row = rows.to(tl.int64) * N
        dz = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_ok = ns < N
            dy = tl.load(DY + y_row[:, None] + ns[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(W + ns[:, None] * swn + ks[None, :] * swk, mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0).to(DY.dtype.element_ty)
            if DOT_F32:
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            dz = tl.dot(dy, w, dz, input_precision=PREC)
        mask = row_ok[:, None] & k_ok[None, :]
        xhat, rstd = _xhat_saved(_load_rows(X, rows, ks, mask, D1, D2, s0, s1, s2), Mean, Rstd, rows, row_ok, mask)
        if HAS_LW:
            g = dz * lw[None, :]
        else:
            g = dz
        c1 = tl.sum(xhat * g, axis=1) / K
        c2 = tl.sum(g, axis=1) / K
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        x_row = rows.to(tl.int64) * K
        tl.store(DX + x_row[:, None] + ks[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DLW:
            dlw_acc += tl.sum(dz * xhat, axis=0)
        if HAS_DLB:
            dlb_acc += tl.sum(dz, axis=0)
        if FUSE_DW:
            ns = tl.arange(0, BLOCK_N)
            n_ok = ns < N
            # the single dY chunk again (just read: an L1/L2 hit), as the A operand of dY^T z
            dy = tl.load(DY + y_row[:, None] + ns[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            z = xhat
            if HAS_LW:
                z = z * lw[None, :]
            if HAS_LB:
                z = z + lb[None, :]
            z = tl.where(mask, z, 0.0).to(DY.dtype.element_ty)
            if HAS_DB:
                db_acc += tl.sum(dy.to(tl.float32), axis=0)
            if DOT_F32:
                dy = dy.to(tl.float32)
                z = z.to(tl.float32)
            dw_acc = tl.dot(tl.trans(dy), z, dw_acc, input_precision=PREC)
    if HAS_DLW:
        tl.store(DLWp + pid * K + ks, dlw_acc, mask=k_ok)
    if HAS_DLB:
        tl.store(DLBp + pid * K + ks, dlb_acc, mask=k_ok)
    if FUSE_DW:
        ns = tl.arange(0, BLOCK_N)
        n_ok = ns < N
        out = DWp + pid.to(tl.int64) * N * K
        tl.store(out + ns[:, None] * K + ks[None, :], dw_acc, mask=n_ok[:, None] & k_ok[None, :])
        if HAS_DB:
            tl.store(DBp + pid * N + ns, db_acc, mask=n_ok)


@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _bwd_dw_kernel(DY, X, LW, LB, Mean, Rstd, DWp, DBp, M, K, N, D1, D2, s0, s1, s2, tiles_per_split,
                   HAS_LW: tl.constexpr, HAS_LB: tl.constexpr, HAS_DB: tl.constexpr,
                   DOT_F32: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Partial dW[n_tile, :] = sum over this split's rows of dY^T z (z recomputed, GEMM dtype),
    partial db = sum of dY over the same rows."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < K
    if HAS_LW:
        lw = tl.load(LW + ks, mask=k_ok, other=0.0).to(tl.float32)
    if HAS_LB:
        lb = tl.load(LB + ks, mask=k_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        rows = (pid_s * tiles_per_split + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        y_row = rows.to(tl.int64) * N
        dy = tl.load(DY + y_row[:, None] + ns[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        mask = row_ok[:, None] & k_ok[None, :]
        z, _ = _xhat_saved(_load_rows(X, rows, ks, mask, D1, D2, s0, s1, s2), Mean, Rstd, rows, row_ok, mask)
        if HAS_LW:
            z = z * lw[None, :]
        if HAS_LB:
            z = z + lb[None, :]
        z = tl.where(mask, z, 0.0).to(DY.dtype.element_ty)
        if HAS_DB:
            db_acc += tl.sum(dy.to(tl.float32), axis=0)
        if DOT_F32:
            dy = dy.to(tl.float32)
            z = z.to(tl.float32)
        acc = tl.dot(tl.trans(dy), z, acc, input_precision=PREC)
    out = DWp + pid_s.to(tl.int64) * N * K
    tl.store(out + ns[:, None] * K + ks[None, :], acc, mask=n_ok[:, None] & k_ok[None, :])
    if HAS_DB:
        tl.store(DBp + pid_s * N + ns, db_acc, mask=n_ok)


# ---------------------------------------------------------------- launch parameters
def bucket(k: int, n: int) -> str:
    return f"{_launch.next_pow2(k)}x{min(_launch.next_pow2(n), 1024)}"


def default_config(k: int, n: int) -> dict:
    """Heuristic launch parameters when the GPU has no committed entry for this bucket."""
    bk = max(16, _launch.next_pow2(k))
    bn_full = max(16, _launch.next_pow2(n))
    wide = bk >= 256
    return {
        "design": "fused" if bk <= FUSED_MAX_K else "hybrid",
        # few output columns (bias heads): dW/db accumulate inside the dx kernel, x is read once
        "fuse_dw": bn_full <= 32,
        "fwd": {"BLOCK_M": 64, "BLOCK_N": min(64 if wide else 128, bn_full), "num_warps": 8 if wide else 4,
                "num_stages": 2},
        "bwd_dx": {"BLOCK_M": 64, "BLOCK_N": min(32 if wide else 64, bn_full), "num_warps": 8 if wide else 4,
                   "num_stages": 2, "programs_per_sm": 2},
        "bwd_dw": {"BLOCK_M": 64, "BLOCK_N": min(64 if wide else 128, bn_full), "num_warps": 8,
                   "num_stages": 2, "programs_per_sm": 2},
    }


def config(device: torch.device, k: int, n: int, gemm_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launch parameters for this bucket. The fused design runs only for 16-bit GEMMs with K <= 256:
    an fp32 product through the kernel's single tl.dot accumulates K terms in one FMA chain, measured
    5x the error of cuBLAS's fp32 GEMM at K = 256 (H100: 7.2e-6 vs 1.4e-6 max abs on outputs of ~7),
    which fails the three-way rule; fp32 is not the training precision, so it goes through cuBLAS."""
    cfg = _launch.tuned(device, "ln_linear", bucket(k, n)) or default_config(k, n)
    if cfg["design"] == "fused" and (_launch.next_pow2(k) > FUSED_MAX_K or gemm_dtype == torch.float32):
        cfg["design"] = "hybrid"
    return cfg


def _grid_split(tiles: int, programs: int) -> tuple[int, int]:
    programs = max(1, min(tiles, programs))
    per = triton.cdiv(tiles, programs)
    return triton.cdiv(tiles, per), per


def _mm_fp32_out(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with an fp32 result. dW sums M = 65k+ rows; rounding it to bf16 before the fp32 master
    weight adds up to half an ulp of |dW| (seen: 2x the reference's error on a 33-row test). cuBLAS
    accumulates in fp32 either way, so the fp32 output (torch >= 2.8, ``mm(..., out_dtype)``) is free;
    elsewhere the 16-bit operands are upcast, which gives the same exact products."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


# ---------------------------------------------------------------- forward / backward
def forward(x: Tensor, lw: Tensor | None, lb: Tensor | None, w: Tensor, b: Tensor | None, eps: float,
            gemm_dtype: torch.dtype, cfg: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``y [*, N]`` in ``gemm_dtype``, ``mean``/``rstd`` ``[M]`` fp32."""
    k, n = x.shape[-1], w.shape[0]
    m = x.numel() // k
    cfg = cfg or config(x.device, k, n, gemm_dtype)
    if cfg["design"] == "hybrid":
        z, mean, rstd = _ln.forward(x, lw, lb, eps, out_dtype=gemm_dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = torch.nn.functional.linear(z, w.to(gemm_dtype), None if b is None else b.to(gemm_dtype))
        return y, mean, rstd
    y = torch.empty((*x.shape[:-1], n), dtype=gemm_dtype, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if m == 0:
        return y, mean, rstd
    x, (d1, d2), (s0, s1, s2) = _launch.rows_2d(x)
    w = _launch.gemm_weight(w, gemm_dtype)     # every program reads all of W: once rounded, half the bytes
    c = cfg["fwd"]
    bk = max(16, _launch.next_pow2(k))
    _fwd_kernel[(triton.cdiv(m, c["BLOCK_M"]),)](
        x, lw if lw is not None else y, lb if lb is not None else y, w, b if b is not None else y, y, mean, rstd,
        m, k, n, d1, d2, s0, s1, s2, w.stride(0), w.stride(1), eps,
        HAS_LW=lw is not None, HAS_LB=lb is not None, HAS_BIAS=b is not None,
        **_launch.dot_args(gemm_dtype, follow_torch_tf32=True),
        BLOCK_M=c["BLOCK_M"], BLOCK_K=bk, BLOCK_N=c["BLOCK_N"], num_warps=c["num_warps"],
        num_stages=c["num_stages"])
    return y, mean, rstd


def backward(dy: Tensor, x: Tensor, lw: Tensor | None, lb: Tensor | None, w: Tensor, mean: Tensor, rstd: Tensor,
             *, need_dlw: bool, need_dlb: bool, need_db: bool, cfg: dict | None = None):
    """``dx`` (x's dtype), ``dlw``, ``dlb``, ``dw``, ``db`` (fp32; None where not needed)."""
    k, n = x.shape[-1], w.shape[0]
    m = x.numel() // k
    dy2 = dy.reshape(m, n)
    if not dy2.is_contiguous():
        dy2 = dy2.contiguous()
    cfg = cfg or config(x.device, k, n, dy2.dtype)
    if cfg["design"] == "hybrid" or m == 0:
        return _hybrid_backward(dy2, x, lw, lb, w, mean, rstd, need_dlw, need_dlb, need_db)
    if cfg.get("fuse_dw") and n <= cfg["bwd_dx"]["BLOCK_N"]:
        return fused_bwd_dx(dy2, x, lw, lb, w, mean, rstd, need_dlw, need_dlb, cfg["bwd_dx"], dw_db=need_db)
    dx, dlw, dlb, _, _ = fused_bwd_dx(dy2, x, lw, lb, w, mean, rstd, need_dlw, need_dlb, cfg["bwd_dx"])
    dw, db = fused_bwd_dw(dy2, x, lw, lb, mean, rstd, need_db, cfg["bwd_dw"])
    return dx, dlw, dlb, dw, db


def _hybrid_backward(dy2, x, lw, lb, w, mean, rstd, need_dlw, need_dlb, need_db):
    m, n = dy2.shape
    k = x.shape[-1]
    gd = dy2.dtype
    with torch.autocast(x.device.type, enabled=False):
        # z lives only until dW is formed: one [M, K] buffer at a time (z, then dz)
        z = _ln.forward(x, lw, lb, 0.0, out_dtype=gd, stats=(mean, rstd))[0]
        dw = _mm_fp32_out(dy2.t(), z.reshape(m, k))
        del z
        db = dy2.sum(0, dtype=torch.float32) if need_db else None
        dz = (dy2 @ w.to(gd)).view(x.shape)
    dx, dlw, dlb = _ln.backward(dz, x, lw, mean, rstd, need_dw=need_dlw, need_db=need_dlb)
    return dx, dlw, dlb, dw, db


def fused_bwd_dx(dy2, x, lw, lb, w, mean, rstd, need_dlw, need_dlb, c, dw_db: bool | None = None):
    """dx, dgamma, dbeta (and, with ``dw_db`` not None -- only for N <= BLOCK_N -- also dW and, if
    ``dw_db``, db from the same pass; else None, None)."""
    m, n = dy2.shape
    k = x.shape[-1]
    fuse = dw_db is not None
    x, (d1, d2), (s0, s1, s2) = _launch.rows_2d(x)
    w = _launch.gemm_weight(w, dy2.dtype)
    programs, per = _grid_split(triton.cdiv(m, c["BLOCK_M"]), c["programs_per_sm"] * _launch.sm_count(x.device))
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dlwp = torch.empty((programs, k) if need_dlw else (0,), **f32)
    dlbp = torch.empty((programs, k) if need_dlb else (0,), **f32)
    dwp = torch.empty((programs, n, k) if fuse else (0,), **f32)
    dbp = torch.empty((programs, n) if fuse and dw_db else (0,), **f32)
    _bwd_dx_kernel[(programs,)](
        dy2, w, x, lw if lw is not None else dx, lb if lb is not None else dx, mean, rstd, dx, dlwp, dlbp,
        dwp, dbp, m, k, n, d1, d2, s0, s1, s2, w.stride(0), w.stride(1), per,
        HAS_LW=lw is not None, HAS_LB=lb is not None, HAS_DLW=need_dlw, HAS_DLB=need_dlb,
        FUSE_DW=fuse, HAS_DB=bool(fuse and dw_db), **_launch.dot_args(dy2.dtype, follow_torch_tf32=True),
        BLOCK_M=c["BLOCK_M"], BLOCK_K=max(16, _launch.next_pow2(k)), BLOCK_N=c["BLOCK_N"],
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    # second pass: fixed-order sums of the per-program partials
    return (dx, dlwp.sum(0) if need_dlw else None, dlbp.sum(0) if need_dlb else None,
            dwp.sum(0) if fuse else None, dbp.sum(0) if fuse and dw_db else None)


def fused_bwd_dw(dy2, x, lw, lb, mean, rstd, need_db, c):
    m, n = dy2.shape
    k = x.shape[-1]
    x, (d1, d2), (s0, s1, s2) = _launch.rows_2d(x)
    n_tiles = triton.cdiv(n, c["BLOCK_N"])
    target = max(1, c["programs_per_sm"] * _launch.sm_count(x.device) // n_tiles)
    splits, per = _grid_split(triton.cdiv(m, c["BLOCK_M"]), target)
    dwp = torch.empty((splits, n, k), dtype=torch.float32, device=x.device)
    dbp = torch.empty((splits, n) if need_db else (0,), dtype=torch.float32, device=x.device)
    _bwd_dw_kernel[_launch.check_grid((n_tiles, splits))](
        dy2, x, lw if lw is not None else dwp, lb if lb is not None else dwp, mean, rstd, dwp, dbp,
        m, k, n, d1, d2, s0, s1, s2, per,
        HAS_LW=lw is not None, HAS_LB=lb is not None, HAS_DB=need_db,
        **_launch.dot_args(dy2.dtype, follow_torch_tf32=True),
        BLOCK_M=c["BLOCK_M"], BLOCK_K=max(16, _launch.next_pow2(k)), BLOCK_N=c["BLOCK_N"],
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    # second pass: fixed-order sums of the per-split partials
    return dwp.sum(0), (dbp.sum(0) if need_db else None)
