"""Triton Linear(sigmoid(g) * o), forward and backward, without ever writing the gated tensor.

Notation: o, g ``[M, K]`` (K = heads x head dim; rows addressed in place through
:func:`_launch.row_layout`, so ``o`` may be a broadcast view, e.g. global attention's ``[*, 1, K]`` against
per-sequence gates ``[*, S, K]``), u = sigmoid(g) * o, W ``[N, K]``, y = u W^T + b ``[M, N]``.

* forward: a tiled GEMM whose prologue loads the o and g tiles, forms u in fp32 registers and rounds
  it to the GEMM dtype just before ``tl.dot`` -- u never reaches memory. Nothing beyond the inputs is
  saved for backward.
* backward d(o), d(g): du = dY W per ``[BLOCK_M, BLOCK_K]`` tile (accumulated over N), and the epilogue
  applies the gate's derivatives in registers: do = du * s, dg = du * o * s (1 - s).
* backward dW, db: dW = dY^T u as a reduction over rows split into fixed ranges; each program recomputes
  u for its rows and writes one fp32 ``[N_tile, K_tile]`` partial, summed in a second pass. No atomics:
  bitwise-reproducible weight gradients.
* fp32 operands multiply in IEEE fp32, each K tile's products summed from zero before they join the
  accumulator (:func:`_transition_triton.mma`): one FMA chain over all of K measured 4-7x eager's error.

The forward and d(o)/d(g) grids are 1-D with the row tile major: the programs of one row tile (its N or
K tiles) run next to each other, so the o/g (or dY) rows they share come from HBM once and from L2 after.
W is rounded to the GEMM dtype once on the host (every program reads all of it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from foldforge.kernels import _launch
from foldforge.kernels._layer_norm_triton import _row_offsets
from foldforge.kernels._ln_linear_triton import _grid_split
from foldforge.kernels._transition_triton import mma, to_dtype


@triton.jit
def _gate_tile(O, G, o_off, g_off, ks, row_ok, K):
    """fp32 tiles of o, g and s = sigmoid(g) for the rows/columns given (zero outside the masks)."""
    k_ok = ks < K
    m = row_ok[:, None] & k_ok[None, :]
    o = tl.load(O + o_off[:, None] + ks[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + g_off[:, None] + ks[None, :], mask=m, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    return o, s


@triton.jit(do_not_specialize=["M"])
def _fwd_kernel(O, G, W, Bias, Y, M, K, N, oD1, oD2, os0, os1, os2, gD1, gD2, gs0, gs1, gs2, swn, swk, n_tiles,
                HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, RNE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    n_ok = ns < N
    o_off = _row_offsets(rows, oD1, oD2, os0, os1, os2)
    g_off = _row_offsets(rows, gD1, gD2, gs0, gs1, gs2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        o, s = _gate_tile(O, G, o_off, g_off, ks, row_ok, K)
        u = to_dtype(o * s, Y, RNE)
        w = to_dtype(tl.load(W + ns[:, None] * swn + ks[None, :] * swk, mask=n_ok[:, None] & (ks < K)[None, :],
                             other=0.0).to(tl.float32), Y, RNE)
        if DOT_F32:
            u = u.to(tl.float32)
            w = w.to(tl.float32)
        acc = mma(u, tl.trans(w), acc, PREC)
    if HAS_BIAS:
        acc += to_dtype(tl.load(Bias + ns, mask=n_ok, other=0.0).to(tl.float32), Y, RNE).to(tl.float32)[None, :]
    y_row = rows.to(tl.int64) * N
    tl.store(Y + y_row[:, None] + ns[None, :], to_dtype(acc, Y, RNE), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _bwd_dx_kernel(DY, O, G, W, DO, DG, M, K, N, oD1, oD2, os0, os1, os2, gD1, gD2, gs0, gs1, gs2, swn, swk,
                   k_tiles, DOT_F32: tl.constexpr, PREC: tl.constexpr, RNE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """du = dY W for one [BLOCK_M, BLOCK_K] tile, then do = du s, dg = du o s (1 - s); du is never stored."""
    pid = tl.program_id(0)
    rows = (pid // k_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = (pid % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = ks < K
    y_row = rows.to(tl.int64) * N
    du = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        dy = tl.load(DY + y_row[:, None] + ns[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w = to_dtype(tl.load(W + ns[:, None] * swn + ks[None, :] * swk, mask=n_ok[:, None] & k_ok[None, :],
                             other=0.0).to(tl.float32), DY, RNE)
        if DOT_F32:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        du = mma(dy, w, du, PREC)
    o_off = _row_offsets(rows, oD1, oD2, os0, os1, os2)
    g_off = _row_offsets(rows, gD1, gD2, gs0, gs1, gs2)
    o, s = _gate_tile(O, G, o_off, g_off, ks, row_ok, K)
    m = row_ok[:, None] & k_ok[None, :]
    x_row = rows.to(tl.int64) * K
    tl.store(DO + x_row[:, None] + ks[None, :], to_dtype(du * s, DO, RNE), mask=m)
    tl.store(DG + x_row[:, None] + ks[None, :], to_dtype(du * o * s * (1.0 - s), DG, RNE), mask=m)


@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _bwd_dw_kernel(DY, O, G, DWp, DBp, M, K, N, oD1, oD2, os0, os1, os2, gD1, gD2, gs0, gs1, gs2,
                   tiles_per_split, HAS_DB: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, RNE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial dW[n_tile, k_tile] = sum over this split's rows of dY^T u (u recomputed in the GEMM dtype);
    partial db (the programs of the first K tile only)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        rows = (pid_s * tiles_per_split + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        y_row = rows.to(tl.int64) * N
        dy = tl.load(DY + y_row[:, None] + ns[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        o_off = _row_offsets(rows, oD1, oD2, os0, os1, os2)
        g_off = _row_offsets(rows, gD1, gD2, gs0, gs1, gs2)
        o, s = _gate_tile(O, G, o_off, g_off, ks, row_ok, K)
        u = to_dtype(o * s, DY, RNE)
        if HAS_DB:
            db_acc += tl.sum(dy.to(tl.float32), axis=0)
        if DOT_F32:
            dy = dy.to(tl.float32)
            u = u.to(tl.float32)
        acc = mma(tl.trans(dy), u, acc, PREC)
    out = DWp + pid_s.to(tl.int64) * N * K
    tl.store(out + ns[:, None] * K + ks[None, :], acc, mask=n_ok[:, None] & k_ok[None, :])
    if HAS_DB:
        if pid_k == 0:
            tl.store(DBp + pid_s * N + ns, db_acc, mask=n_ok)


# ---------------------------------------------------------------- launch parameters
def bucket(k: int, n: int) -> str:
    return f"{_launch.next_pow2(k)}x{min(_launch.next_pow2(n), 1024)}"


def default_config(k: int, n: int) -> dict:
    """Heuristic tiles when the GPU has no committed entry: the whole output row (N <= 256) in one tile so
    the gate is formed once per element in the forward; K tiles of 64."""
    bk = min(64, max(16, _launch.next_pow2(k)))
    bn = min(256, max(16, _launch.next_pow2(n)))
    return {
        "fwd": {"BLOCK_M": 64, "BLOCK_N": min(bn, 128), "BLOCK_K": bk, "num_warps": 4, "num_stages": 3},
        "bwd_dx": {"BLOCK_M": 64, "BLOCK_N": min(bn, 64), "BLOCK_K": min(128, max(16, _launch.next_pow2(k))),
                   "num_warps": 4, "num_stages": 3},
        "bwd_dw": {"BLOCK_M": 64, "BLOCK_N": min(bn, 128), "BLOCK_K": bk, "num_warps": 4, "num_stages": 3,
                   "programs_per_sm": 2},
    }


def config(device: torch.device, k: int, n: int) -> dict:
    return _launch.tuned(device, "gated_output", bucket(k, n)) or default_config(k, n)


def grids(m: int, k: int, n: int, cfg: dict, sms: int) -> dict:
    """Host-side launch geometry of the three kernels for ``m`` rows (no tensors involved).

    ``fwd``/``bwd_dx``: 1-D grids of row tiles x (N or K) tiles with the second index fastest (``n_tiles``,
    ``k_tiles``: the divisors the kernels unfold pid with); ``bwd_dw``: (N tiles, K tiles, row splits), the
    splits bounded by ``programs_per_sm * sms``, so every axis stays within CUDA's limits."""
    f, x, w = cfg["fwd"], cfg["bwd_dx"], cfg["bwd_dw"]
    n_tiles = triton.cdiv(n, f["BLOCK_N"])
    k_tiles = triton.cdiv(k, x["BLOCK_K"])
    wn, wk = triton.cdiv(n, w["BLOCK_N"]), triton.cdiv(k, w["BLOCK_K"])
    splits, per = _grid_split(triton.cdiv(m, w["BLOCK_M"]), max(1, w["programs_per_sm"] * sms // (wn * wk)))
    return {"fwd": _launch.check_grid((triton.cdiv(m, f["BLOCK_M"]) * n_tiles,)), "n_tiles": n_tiles,
            "bwd_dx": _launch.check_grid((triton.cdiv(m, x["BLOCK_M"]) * k_tiles,)), "k_tiles": k_tiles,
            "bwd_dw": _launch.check_grid((wn, wk, splits)), "tiles_per_split": per}


def _layouts(o: Tensor, g: Tensor):
    """Row addressing of o (broadcast to g's shape: stride 0 along the broadcast dims) and g."""
    if o.shape != g.shape:
        o = o.expand(g.shape)
    o, (od1, od2), (os0, os1, os2) = _launch.rows_2d(o)
    g, (gd1, gd2), (gs0, gs1, gs2) = _launch.rows_2d(g)
    return o, g, (od1, od2, os0, os1, os2, gd1, gd2, gs0, gs1, gs2)


# ---------------------------------------------------------------- forward / backward
def forward(o: Tensor, g: Tensor, w: Tensor, b: Tensor | None, gemm_dtype: torch.dtype,
            cfg: dict | None = None) -> Tensor:
    """``y [*, N]`` (g's leading shape) in ``gemm_dtype``."""
    k, n = g.shape[-1], w.shape[0]
    m = g.numel() // k
    y = torch.empty((*g.shape[:-1], n), dtype=gemm_dtype, device=g.device)
    if m == 0:
        return y
    cfg = cfg or config(g.device, k, n)
    c = cfg["fwd"]
    gr = grids(m, k, n, cfg, _launch.sm_count(g.device))
    o2, g2, lay = _layouts(o, g)
    w = _launch.gemm_weight(w, gemm_dtype)
    _fwd_kernel[gr["fwd"]](o2, g2, w, b if b is not None else y, y, m, k, n, *lay, w.stride(0), w.stride(1),
                           gr["n_tiles"], HAS_BIAS=b is not None, RNE=_launch.interpreting(),
                           **_launch.dot_args(gemm_dtype, follow_torch_tf32=False),
                           BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                           num_warps=c["num_warps"], num_stages=c["num_stages"])
    return y


def backward(dy: Tensor, o: Tensor, g: Tensor, w: Tensor, *, need_db: bool,
             cfg: dict | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``do`` (o's shape and dtype; summed over the broadcast dims), ``dg`` (g's dtype), ``dw`` and ``db``
    (fp32; db None when not needed)."""
    k, n = g.shape[-1], w.shape[0]
    m = g.numel() // k
    dy2 = dy.reshape(m, n)
    if not dy2.is_contiguous():
        dy2 = dy2.contiguous()
    broadcast = o.shape != g.shape
    # a broadcast o gets its per-row gradient in fp32, reduced over the broadcast dims afterwards
    do = torch.empty(g.shape, dtype=torch.float32 if broadcast else o.dtype, device=g.device)
    dg = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    f32 = dict(dtype=torch.float32, device=g.device)
    if m == 0:
        return (torch.zeros(o.shape, dtype=o.dtype, device=o.device), dg, torch.zeros((n, k), **f32),
                torch.zeros(n, **f32) if need_db else None)
    cfg = cfg or config(g.device, k, n)
    gr = grids(m, k, n, cfg, _launch.sm_count(g.device))
    o2, g2, lay = _layouts(o, g)
    dots = dict(_launch.dot_args(dy2.dtype, follow_torch_tf32=False), RNE=_launch.interpreting())
    c = cfg["bwd_dx"]
    w = _launch.gemm_weight(w, dy2.dtype)
    _bwd_dx_kernel[gr["bwd_dx"]](
        dy2, o2, g2, w, do, dg, m, k, n, *lay, w.stride(0), w.stride(1), gr["k_tiles"], **dots,
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    c = cfg["bwd_dw"]
    splits = gr["bwd_dw"][2]
    dwp = torch.empty((splits, n, k), **f32)
    dbp = torch.empty((splits, n) if need_db else (0,), **f32)
    _bwd_dw_kernel[gr["bwd_dw"]](
        dy2, o2, g2, dwp, dbp, m, k, n, *lay, gr["tiles_per_split"], HAS_DB=need_db, **dots,
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    if broadcast:
        do = do.sum_to_size(o.shape).to(o.dtype)
    # second pass: fixed-order sums of the per-split partials
    return do, dg, dwp.sum(0), (dbp.sum(0) if need_db else None)
