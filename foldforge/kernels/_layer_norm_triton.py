"""Triton LayerNorm over the last dim (row width C <= 1024), forward and backward.

Imported lazily by :mod:`foldforge.kernels.layer_norm` on the first launch (Triton decides at kernel
definition whether it interprets, so tests set ``TRITON_INTERPRET=1`` before this module loads).

Forward: one program normalises a ``[BLOCK_M, next_pow2(C)]`` tile held in registers: statistics in
fp32 with the two-pass variance (no E[x^2] - E[x]^2 cancellation), output in the requested dtype, mean
and 1/std stored (fp32, 8 bytes a row) for backward -- the normalised tensor itself is never saved.

Backward: persistent programs, each owning a contiguous run of row tiles, compute dx in one pass over
x and dy and keep their partial dW/db in registers; each program writes one row of a ``[programs, C]``
fp32 buffer, and a second reduction sums it over programs. No atomics, so dW/db are bitwise
reproducible (ScaleFold's and MegaFold's kernels use fp32 atomics here: order-dependent results and
contended addresses, research/megafold.md).

Rows are addressed through :func:`_launch.row_layout`: up to three collapsed leading dims with their
own strides, so slices and residue-transposed pair tensors are read in place without a copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from foldforge.kernels import _launch


@triton.jit
def _row_offsets(rows, D1, D2, s0, s1, s2):
    """Element offset of each row's first element (int64): row -> (i0, i1, i2) over (*, D1, D2).
    D1 == D2 == 1 (a contiguous tensor) is specialised by Triton, so the divisions fold away."""
    r = rows.to(tl.int64)
    i2 = r % D2
    t = r // D2
    i1 = t % D1
    i0 = t // D1
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit
def _load_rows(X, rows, cols, mask, D1, D2, s0, s1, s2):
    """A row tile of a strided ``[*, D1, D2, n]`` tensor (rows over the leading dims) as fp32, 0 outside
    ``mask``."""
    return tl.load(X + _row_offsets(rows, D1, D2, s0, s1, s2)[:, None] + cols[None, :], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _xhat_saved(x, Mean, Rstd, rows, row_ok, mask):
    """``(x - mean) * rstd`` of an fp32 row tile with the statistics the forward saved, 0 outside ``mask``,
    and ``rstd`` (every backward that recomputes its LayerNorm instead of keeping the normalised
    activation)."""
    mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    return tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0), rstd


@triton.jit
def _bound(idx, n, EVEN: tl.constexpr):
    """``idx < n``; with ``EVEN`` (the host checked that every index of the tile is in range) a constant
    all-true mask instead, which folds away: the loads and stores it guards compile unmasked."""
    if EVEN:
        ok = tl.full(idx.shape, 1, tl.int1)
    else:
        ok = idx < n
    return ok


@triton.jit
def _cv(x, ACT: tl.constexpr, INTERP: tl.constexpr):
    """fp32 -> act, rounded to nearest even (shared by the kernels that round intermediates). Triton 3.9's
    interpreter truncates fp32 -> bf16 casts (measured: 1-ulp errors of one sign, which doubled the bf16
    error of every output), so under the interpreter the rounding is done on the bits first; compiled
    kernels cast directly."""
    if INTERP:
        if ACT == tl.bfloat16:
            b = x.to(tl.float32).to(tl.uint32, bitcast=True)
            b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
            x = b.to(tl.float32, bitcast=True)
    return x.to(ACT)


# Row counts are not specialised (Triton would compile a variant for M == 1 and for M % 16 == 0): they only
# enter masks, and crops of every size must reuse one binary. Widths and strides stay specialised (16-byte loads).
# EVEN_N (C is a power of two >= 16: the tile is exactly one row) and EVEN_M (M % BLOCK_M == 0) drop the masks.
@triton.jit(do_not_specialize=["M"])
def _ln_fwd_kernel(X, Y, W, B, Mean, Rstd, M, N, D1, D2, s0, s1, s2, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_STATS: tl.constexpr,
                   LOAD_STATS: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = _bound(rows, M, EVEN_M)
    col_ok = _bound(cols, N, EVEN_N)
    mask = row_ok[:, None] & col_ok[None, :]
    x = _load_rows(X, rows, cols, mask, D1, D2, s0, s1, s2)
    if LOAD_STATS:   # re-apply saved statistics (recomputing z for a backward GEMM)
        y, rstd = _xhat_saved(x, Mean, Rstd, rows, row_ok, mask)
    else:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_off = rows.to(tl.int64) * N
    tl.store(Y + y_off[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=["M", "tiles_per_prog"])
def _ln_bwd_kernel(X, DY, DX, W, Mean, Rstd, DWp, DBp, M, N, D1, D2, s0, s1, s2, tiles_per_prog,
                   HAS_W: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, EVEN_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * w (per row, over the C columns);
    dW += dy * x_hat, db += dy accumulated as [BLOCK_M, BLOCK_N] tiles and reduced once at the end."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = _bound(cols, N, EVEN_N)
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, tiles_per_prog):
        rows = (pid * tiles_per_prog + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        y_off = rows.to(tl.int64) * N
        x = _load_rows(X, rows, cols, mask, D1, D2, s0, s1, s2)
        dy = tl.load(DY + y_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat, rstd = _xhat_saved(x, Mean, Rstd, rows, row_ok, mask)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        c1 = tl.sum(xhat * g, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + y_off[:, None] + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw_acc += dy * xhat
        if HAS_DB:
            db_acc += dy
    if HAS_DW:
        tl.store(DWp + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_DB:
        tl.store(DBp + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


# Default tiles when the GPU has no committed entry: ~4096 elements a program keeps 16-32 fp32 values
# per thread at 4 warps, enough loads in flight for a memory-bound row op; 8 warps from 1024 wide.
def _default_fwd(block_n: int) -> dict:
    return {"BLOCK_M": max(1, 4096 // block_n), "num_warps": 4 if block_n <= 512 else 8}


def _default_bwd(block_n: int) -> dict:
    return {"BLOCK_M": max(1, 2048 // block_n), "num_warps": 4 if block_n <= 256 else 8,
            "programs_per_sm": 4}


def fwd_config(device: torch.device, n: int) -> dict:
    bn = max(16, _launch.next_pow2(n))
    cfg = _launch.tuned(device, "layer_norm_fwd", str(bn)) or _default_fwd(bn)
    cfg["BLOCK_N"] = bn
    return cfg


def bwd_config(device: torch.device, n: int) -> dict:
    bn = max(16, _launch.next_pow2(n))
    cfg = _launch.tuned(device, "layer_norm_bwd", str(bn)) or _default_bwd(bn)
    cfg["BLOCK_N"] = bn
    return cfg


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *,
            out_dtype: torch.dtype | None = None, stats: tuple[Tensor, Tensor] | None = None,
            config: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``y [*, C]`` (contiguous, ``out_dtype`` or x's), ``mean [M]``, ``rstd [M]`` (fp32). With ``stats``
    given, those saved statistics are applied instead of computed (and returned as they are)."""
    n = x.shape[-1]
    m = x.numel() // n if n else 0
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    if stats is not None:
        mean, rstd = stats
    else:
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
    if m == 0:
        return y, mean, rstd
    x, (d1, d2), (s0, s1, s2) = _launch.rows_2d(x)
    cfg = config or fwd_config(x.device, n)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _ln_fwd_kernel[grid](x, y, weight if weight is not None else y, bias if bias is not None else y,
                         mean, rstd, m, n, d1, d2, s0, s1, s2, eps,
                         HAS_W=weight is not None, HAS_B=bias is not None, STORE_STATS=stats is None,
                         LOAD_STATS=stats is not None, EVEN_M=m % cfg["BLOCK_M"] == 0,
                         EVEN_N=n == cfg["BLOCK_N"],
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return y, mean, rstd


def backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, *,
             need_dw: bool, need_db: bool, dx_dtype: torch.dtype | None = None,
             config: dict | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``dx`` (contiguous, x's dtype), ``dW``/``db`` in fp32 (None when not needed).

    The number of programs depends only on the row count and the GPU model (SM count), so repeated
    runs on one GPU reduce in the same order: bitwise-equal gradients.
    """
    n = x.shape[-1]
    m = x.numel() // n if n else 0
    dy = dy.contiguous()
    dx = torch.empty(x.shape, dtype=dx_dtype or x.dtype, device=x.device)
    if m == 0:
        z = torch.zeros(n, dtype=torch.float32, device=x.device)
        return dx, (z if need_dw else None), (z.clone() if need_db else None)
    x, (d1, d2), (s0, s1, s2) = _launch.rows_2d(x)
    cfg = config or bwd_config(x.device, n)
    tiles = triton.cdiv(m, cfg["BLOCK_M"])
    programs = min(tiles, cfg["programs_per_sm"] * _launch.sm_count(x.device))
    tiles_per_prog = triton.cdiv(tiles, programs)
    programs = triton.cdiv(tiles, tiles_per_prog)
    dwp = torch.empty((programs, n) if need_dw else (0,), dtype=torch.float32, device=x.device)
    dbp = torch.empty((programs, n) if need_db else (0,), dtype=torch.float32, device=x.device)
    _ln_bwd_kernel[(programs,)](x, dy, dx, weight if weight is not None else dx, mean, rstd, dwp, dbp,
                                m, n, d1, d2, s0, s1, s2, tiles_per_prog,
                                HAS_W=weight is not None, HAS_DW=need_dw, HAS_DB=need_db,
                                EVEN_N=n == cfg["BLOCK_N"],
                                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    # second pass: a fixed-order column sum of the [programs, C] partials (torch's reduction kernels
    # are deterministic for a given shape)
    return dx, (dwp.sum(0) if need_dw else None), (dbp.sum(0) if need_db else None)
