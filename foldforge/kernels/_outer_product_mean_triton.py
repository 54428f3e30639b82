"""Triton outer product mean (AF2 Suppl. Alg. 10), forward and backward.

Notation: m ``[B, S, L, c_m]``, a/b ``[B, S, L, C]`` (C = c_hidden <= 32), W_out ``[c_z, C*C]``,
n_ij = sum_s mask_si mask_sj. "act" is m's dtype.

Forward:
  1. ``_proj_fwd_kernel``: LayerNorm in fp32 registers, both projections and the mask in one pass over m:
     a, b ``[B, S, L, C]`` (act). The normalised m is not stored.
  2. ``_opm_fwd_kernel``: one program per (i block, j block) of ``BI x BJ`` residues accumulates the
     ``[BI*C, BJ*C]`` tile of sum_s a_s^T b_s over all MSA rows in fp32 registers (a plain GEMM tile with
     K = S), rounds it to act and regroups it in registers to ``[BI*BJ, C*C]``, multiplies it by W_out^T,
     adds the bias and divides by n_ij + eps. The ``[L, L, C*C]`` outer-product tensor never exists in
     memory. Programs run in groups of ``GROUP`` i blocks sweeping the j blocks together (the grouped order
     of a tiled GEMM), so each b column block is read from HBM once per group rather than once per i
     block when a and b outgrow L2 (large crops). W_out is rounded to act once on the host.
Saved for backward: m, the LayerNorm statistics, the masked a and b (small: 2C values per MSA element),
the row-pair counts n.

Backward, over chunks of residues (``chunk`` rows at a time, so the transient ``[chunk, L, C*C]``
buffers stay ~16M elements whatever L), with dY' = dY / (n + eps) and dO = dY' W (cuBLAS, fp32 accumulation):
  i chunks:  O_i = a_i^T b (recomputed),  dW += dY'_i^T O_i,  da[:, i] = b dO_i^T
  j chunks:  db[:, j] = a dO_j               (dO_j = dY'[:, j] W: the same values, grouped by j)
Each slice of da and db is one GEMM over its full reduction (K = L*C); the alternative, db += a_i dO_i per
i chunk, re-reads and re-writes the whole fp32 db ``[B, S, L*C]`` once per chunk (256 times at crop 2048,
1.3 GB each for the extra MSA), far more than the second dO product costs. Then ``_proj_bwd_kernel`` (mask,
both projections' dx in registers, LayerNorm backward; writes the pre-activation gradients and the
normalised m for ``dW = dPre^T z``). Weight gradients are GEMMs with
fp32 output, bias/LayerNorm gradients fixed-order sums of per-tile partials: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from foldforge.kernels import _launch
from foldforge.kernels._layer_norm_triton import _bound, _cv, _load_rows, _xhat_saved
from foldforge.kernels._triangle_mult_triton import _proj

MAX_C = 32                     # the [BI*C, BJ*C] accumulator is 128 x 128 fp32 at C = 32
CHUNK_ELEMENTS = 1 << 24       # transient [chunk, L, C*C] buffers of the backward


@triton.jit(do_not_specialize=["M"])
def _proj_fwd_kernel(X, MASK, LNW, LNB, W1, B1, W2, B2, A, Bo, Mean, Rstd, M, K, C, D1, D2, s0, s1, s2, eps,
                     DOT_F32: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """LayerNorm (fp32 registers) + both projections + mask: a, b ``[M, C]`` (act)."""
    ACT: tl.constexpr = A.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    mk2 = row_ok[:, None] & k_ok[None, :]
    x = _load_rows(X, rows, ks, mk2, D1, D2, s0, s1, s2)
    mean = tl.sum(x, axis=1) / K
    xc = tl.where(mk2, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    z = xc * rstd[:, None] * tl.load(LNW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :] \
        + tl.load(LNB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    z = _cv(tl.where(mk2, z, 0.0), ACT, DOT_F32)
    if DOT_F32:
        z = z.to(tl.float32)
    m = tl.load(MASK + rows, mask=row_ok, other=0.0).to(tl.float32)
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    st_ok = row_ok[:, None] & c_ok[None, :]
    off = rows.to(tl.int64)[:, None] * C + cs[None, :]
    y, _w = _proj(z, W1, B1, cs, c_ok, ks, k_ok, K, ACT, DOT_F32, PREC)
    tl.store(A + off, _cv(y * m[:, None], ACT, DOT_F32), mask=st_ok)
    y, _w = _proj(z, W2, B2, cs, c_ok, ks, k_ok, K, ACT, DOT_F32, PREC)
    tl.store(Bo + off, _cv(y * m[:, None], ACT, DOT_F32), mask=st_ok)


@triton.jit(do_not_specialize=["M"])
def _proj_bwd_kernel(X, MASK, LNW, LNB, W1, W2, Mean, Rstd, DA, DB, DPRE, Z, DX, DLWp, DLBp, DBp,
                     M, K, C, D1, D2, s0, s1, s2, DOT_F32: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """From dA, dB ``[M, C]`` (fp32): the projection pre-activation gradients ``[M, 2C]`` and the
    LayerNorm output z (act) for dW = dPre^T z, then dx through both projections and the LayerNorm;
    per-tile partial sums of the bias and LayerNorm parameter gradients."""
    ACT: tl.constexpr = Z.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    mk2 = row_ok[:, None] & k_ok[None, :]
    xhat, rstd = _xhat_saved(_load_rows(X, rows, ks, mk2, D1, D2, s0, s1, s2), Mean, Rstd, rows, row_ok, mk2)
    lw = tl.load(LNW + ks, mask=k_ok, other=0.0).to(tl.float32)
    z = xhat * lw[None, :] + tl.load(LNB + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    x_row = rows.to(tl.int64) * K
    tl.store(Z + x_row[:, None] + ks[None, :], _cv(tl.where(mk2, z, 0.0), ACT, DOT_F32), mask=mk2)
    m = tl.load(MASK + rows, mask=row_ok, other=0.0).to(tl.float32)
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    st_ok = row_ok[:, None] & c_ok[None, :]
    off = rows.to(tl.int64)[:, None] * C + cs[None, :]
    p_off = rows.to(tl.int64)[:, None] * (2 * C) + cs[None, :]
    w_ok = c_ok[:, None] & k_ok[None, :]
    dz = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for side in tl.static_range(2):
        if side == 0:
            d = tl.load(DA + off, mask=st_ok, other=0.0) * m[:, None]
            w = _cv(tl.load(W1 + cs[:, None] * K + ks[None, :], mask=w_ok, other=0.0), ACT, DOT_F32)
        else:
            d = tl.load(DB + off, mask=st_ok, other=0.0) * m[:, None]
            w = _cv(tl.load(W2 + cs[:, None] * K + ks[None, :], mask=w_ok, other=0.0), ACT, DOT_F32)
        tl.store(DBp + pid * 2 * C + side * C + cs, tl.sum(d, axis=0), mask=c_ok)
        d = _cv(d, ACT, DOT_F32)
        tl.store(DPRE + p_off + side * C, d, mask=st_ok)
        if DOT_F32:
            d = d.to(tl.float32)
            w = w.to(tl.float32)
        dz = tl.dot(d, w, dz, input_precision=PREC)
    gw = dz * lw[None, :]
    c1 = tl.sum(xhat * gw, axis=1) / K
    c2 = tl.sum(gw, axis=1) / K
    dx = (gw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    tl.store(DX + x_row[:, None] + ks[None, :], _cv(dx, DX.dtype.element_ty, DOT_F32), mask=mk2)
    tl.store(DLWp + pid * K + ks, tl.sum(dz * xhat, axis=0), mask=k_ok)
    tl.store(DLBp + pid * K + ks, tl.sum(dz, axis=0), mask=k_ok)


@triton.jit(do_not_specialize=["S", "L", "n_bi", "n_bj"])
def _opm_fwd_kernel(A, Bm, W, Bias, Norm, Out, S, L, C, NZ, eps, n_bi, n_bj,
                    DOT_F32: tl.constexpr, PREC: tl.constexpr, EVEN_C: tl.constexpr, GROUP: tl.constexpr,
                    BI: tl.constexpr, BJ: tl.constexpr, CP: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """EVEN_C: C == CP (C a power of two), so a tile's columns (ii, c) are contiguous in a and b and every
    (c, d) pair is a real column of W_out: no channel masks."""
    ACT: tl.constexpr = Out.dtype.element_ty
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    # grouped order: pid -> (i block, j block), i fastest within a group of GROUP i blocks
    per_group = GROUP * n_bj
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_bi - first, GROUP)
    i0 = (first + (pid % per_group) % size) * BI
    j0 = ((pid % per_group) // size) * BJ
    # tile columns (ii, c) -> ii * CP + c (C padded to the power of two CP)
    ra = tl.arange(0, BI * CP)
    ia = i0 + ra // CP
    rb = tl.arange(0, BJ * CP)
    jb = j0 + rb // CP
    if EVEN_C:
        a_ok = ia < L
        b_ok = jb < L
        a_col = i0 * C + ra
        b_col = j0 * C + rb
    else:
        ca = ra % CP
        cb = rb % CP
        a_ok = (ia < L) & (ca < C)
        b_ok = (jb < L) & (cb < C)
        a_col = ia * C + ca
        b_col = jb * C + cb
    base = bat * S * L * C
    acc = tl.zeros([BI * CP, BJ * CP], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < S
        s_off = base + ss.to(tl.int64) * L * C
        at = tl.load(A + s_off[:, None] + a_col[None, :], mask=s_ok[:, None] & a_ok[None, :], other=0.0)
        bt = tl.load(Bm + s_off[:, None] + b_col[None, :], mask=s_ok[:, None] & b_ok[None, :], other=0.0)
        if DOT_F32:
            at = at.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(tl.trans(at), bt, acc, input_precision=PREC)
    # rounded to act first (elementwise, so the same values), then [(ii, c), (jj, d)] -> [(ii, jj), (c, d)]:
    # the rows of the output projection; the regrouping moves half the bytes of the fp32 tile
    o = _cv(acc, ACT, DOT_F32)
    o = tl.reshape(tl.permute(tl.reshape(o, (BI, CP, BJ, CP)), (0, 2, 1, 3)), (BI * BJ, CP * CP))
    if DOT_F32:
        o = o.to(tl.float32)
    kk = tl.arange(0, CP * CP)
    if EVEN_C:
        k_ok = _bound(kk, CP * CP, True)
        w_col = kk
    else:
        kc = kk // CP
        kd = kk % CP
        k_ok = (kc < C) & (kd < C)
        w_col = kc * C + kd
    rr = tl.arange(0, BI * BJ)
    oi = i0 + rr // BJ
    oj = j0 + rr % BJ
    r_ok = (oi < L) & (oj < L)
    pair = (bat * L + oi) * L + oj
    inv = 1.0 / (tl.load(Norm + pair, mask=r_ok, other=0.0) + eps)
    for n0 in range(0, NZ, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < NZ
        w = _cv(tl.load(W + ns[None, :] * (C * C) + w_col[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0), ACT, DOT_F32)
        if DOT_F32:
            w = w.to(tl.float32)
        y = tl.dot(o, w, input_precision=PREC)
        y += _cv(tl.load(Bias + ns, mask=n_ok, other=0.0), ACT, DOT_F32).to(tl.float32)[None, :]
        tl.store(Out + pair[:, None] * NZ + ns[None, :], _cv(y * inv[:, None], ACT, DOT_F32),
                 mask=r_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------- launch parameters
def default_config(c: int) -> dict:
    cp = max(4, _launch.next_pow2(c))
    bi = max(1, 128 // cp)
    return {"BI": bi, "BJ": bi, "BLOCK_S": 32, "BLOCK_N": 32, "GROUP": 8, "num_warps": 8, "num_stages": 2}


def fwd_grid(nb: int, length: int, cfg: dict) -> tuple[int, int]:
    """``(i blocks x j blocks, batch)``: the residue blocks on axis 0 (2^18 at L = 2048 with 4-residue
    blocks), the batch -- small -- on axis 1."""
    return _launch.check_grid((triton.cdiv(length, cfg["BI"]) * triton.cdiv(length, cfg["BJ"]), nb))


def bucket(c: int) -> str:
    """Tuned-table key: the next power of two of the hidden width c (at least 4)."""
    return str(max(4, _launch.next_pow2(c)))


def config(device: torch.device, c: int) -> dict:
    return _launch.tuned(device, "outer_product_mean", bucket(c)) or default_config(c)


def _bmm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Batched ``a @ b``, fp32 accumulation, one rounding to ``out_dtype``."""
    if a.is_cuda:
        return torch.bmm(a, b) if a.dtype == out_dtype else torch.bmm(a, b, out_dtype=out_dtype)
    return torch.bmm(a.float(), b.float()).to(out_dtype)


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _dims(m: Tensor, params) -> tuple[int, int, int, int, int]:
    s, length, c_m = m.shape[-3:]
    nb = m.numel() // (s * length * c_m)
    return nb, s, length, params[2].shape[0], params[6].shape[0]


def _proj_block(k: int, c: int) -> dict:
    bk = max(16, _launch.next_pow2(k))
    return {"BLOCK_M": 32 if bk >= 256 else 64, "BLOCK_K": bk, "BLOCK_C": max(16, _launch.next_pow2(c)),
            "num_warps": 4}


def forward(m: Tensor, mask: Tensor | None, params: list[Tensor], eps: float, ln_eps: float,
            cfg: dict | None = None) -> tuple[Tensor, ...]:
    """``out [*, L, L, c_z]`` (m's dtype) and for backward: LayerNorm mean/rstd ``[M]``, masked a and b
    ``[B, S, L, C]`` (act), the row-pair counts ``[B, L, L]`` (fp32) and the mask as act ``[B, S, L]``."""
    nb, s, length, c, nz = _dims(m, params)
    act, dev = m.dtype, m.device
    k = m.shape[-1]
    rows = nb * s * length
    lnw, lnb, w1, b1, w2, b2, _, _ = params
    maskf = (torch.ones((nb, s, length), dtype=act, device=dev) if mask is None
             else mask.reshape(nb, s, length).to(act).contiguous())
    a = torch.empty((nb, s, length, c), dtype=act, device=dev)
    b = torch.empty_like(a)
    mean = torch.empty(rows, dtype=torch.float32, device=dev)
    rstd = torch.empty_like(mean)
    mm, (d1, d2), (s0, s1, s2) = _launch.rows_2d(m)
    pb = _proj_block(k, c)
    dot = _launch.dot_args(act, follow_torch_tf32=True)
    _proj_fwd_kernel[(triton.cdiv(rows, pb["BLOCK_M"]),)](
        mm, maskf, lnw, lnb, _launch.gemm_weight(w1, act), b1, _launch.gemm_weight(w2, act), b2, a, b, mean,
        rstd, rows, k, c, d1, d2, s0, s1, s2, ln_eps, **dot, BLOCK_M=pb["BLOCK_M"], BLOCK_K=pb["BLOCK_K"],
        BLOCK_C=pb["BLOCK_C"], num_warps=pb["num_warps"])
    mf = maskf.float()
    norm = torch.bmm(mf.transpose(1, 2), mf)                                     # [B, L, L] fp32, exact
    out = torch.empty((*m.shape[:-3], length, length, nz), dtype=act, device=dev)
    cfg = cfg or config(dev, c)
    cp = max(4, _launch.next_pow2(c))
    n_bi, n_bj = triton.cdiv(length, cfg["BI"]), triton.cdiv(length, cfg["BJ"])
    _opm_fwd_kernel[fwd_grid(nb, length, cfg)](
        a, b, _launch.gemm_weight(params[6], act), params[7], norm, out, s, length, c, nz, eps, n_bi, n_bj,
        **dot, EVEN_C=c == cp, GROUP=cfg.get("GROUP", 8), BI=cfg["BI"], BJ=cfg["BJ"], CP=cp,
        BLOCK_S=cfg["BLOCK_S"],
        BLOCK_N=min(cfg["BLOCK_N"], max(16, _launch.next_pow2(nz))), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out, mean, rstd, a, b, norm, maskf


def chunk_rows(length: int, c: int, nb: int) -> int:
    return max(1, min(length, CHUNK_ELEMENTS // max(1, nb * length * c * c)))


def backward(dout: Tensor, m: Tensor, params: list[Tensor], mean: Tensor, rstd: Tensor, a: Tensor, b: Tensor,
             norm: Tensor, maskf: Tensor, eps: float) -> tuple[Tensor, list[Tensor]]:
    """``dm`` (m's dtype) and the 8 parameter gradients in :class:`OPMParams` order (fp32)."""
    nb, s, length, c, nz = _dims(m, params)
    act, f32 = m.dtype, torch.float32
    w_act = params[6].to(act)
    # dY' = dY / (n + eps) in fp32, rounded to act where the reference rounds the gradient of its act output;
    # one pass (the division runs in fp32 and is cast on store), no fp32 copies of dY
    dyn = torch.empty((nb, length, length, nz), dtype=act, device=m.device)
    torch.div(dout.reshape(nb, length, length, nz), norm[..., None] + eps, out=dyn)
    db_out = dyn.sum((0, 1, 2), dtype=f32)
    a_f = a.reshape(nb, s, length * c)
    b_f = b.reshape(nb, s, length * c)
    da = torch.empty((nb, s, length, c), dtype=f32, device=m.device)
    db = torch.empty((nb, s, length, c), dtype=f32, device=m.device)
    dw = None
    step = chunk_rows(length, c, nb)
    for i0 in range(0, length, step):
        i1 = min(length, i0 + step)
        li = i1 - i0
        a_ic = a[:, :, i0:i1].reshape(nb, s, li * c)                               # [B, S, li*C]
        o = _bmm(a_ic.transpose(1, 2), b_f, act)                                  # [B, li*C, L*C]
        o = o.view(nb, li, c, length, c).transpose(2, 3).reshape(nb * li * length, c * c)
        dy_ic = dyn[:, i0:i1].reshape(nb * li * length, nz)
        dw_ic = _mm_f32(dy_ic.t(), o)
        dw = dw_ic if dw is None else dw.add_(dw_ic)
        del o, dw_ic
        do = (dy_ic @ w_act).view(nb, li, length, c, c).transpose(2, 3).reshape(nb, li * c, length * c)
        da[:, :, i0:i1] = _bmm(b_f, do.transpose(1, 2), f32).view(nb, s, li, c)   # [B, S, li*C]
        del do
    for j0 in range(0, length, step):
        j1 = min(length, j0 + step)
        lj = j1 - j0
        dy_jc = dyn[:, :, j0:j1].reshape(nb * length * lj, nz)                    # rows (b, i, j in chunk)
        do = (dy_jc @ w_act).view(nb, length, lj, c, c).transpose(2, 3).reshape(nb, length * c, lj * c)
        db[:, :, j0:j1] = _bmm(a_f, do, f32).view(nb, s, lj, c)                    # [B, S, lj*C]
        del do
    k = m.shape[-1]
    rows = nb * s * length
    lnw, lnb, w1, _, w2, _, _, _ = params
    pb = _proj_block(k, c)
    tiles = triton.cdiv(rows, pb["BLOCK_M"])
    dpre = torch.empty((rows, 2 * c), dtype=act, device=m.device)
    z = torch.empty((rows, k), dtype=act, device=m.device)
    dm = torch.empty(m.shape, dtype=m.dtype, device=m.device)
    dlw_p, dlb_p = torch.empty((tiles, k), dtype=f32, device=m.device), torch.empty((tiles, k), dtype=f32,
                                                                                    device=m.device)
    db_p = torch.empty((tiles, 2 * c), dtype=f32, device=m.device)
    mm, (d1, d2), (s0, s1, s2) = _launch.rows_2d(m)
    _proj_bwd_kernel[(tiles,)](
        mm, maskf, lnw, lnb, _launch.gemm_weight(w1, act), _launch.gemm_weight(w2, act), mean, rstd, da, db,
        dpre, z, dm, dlw_p, dlb_p, db_p, rows, k, c, d1, d2, s0, s1, s2, **_launch.dot_args(act, follow_torch_tf32=True),
        BLOCK_M=pb["BLOCK_M"], BLOCK_K=pb["BLOCK_K"],
        BLOCK_C=pb["BLOCK_C"], num_warps=pb["num_warps"])
    dw_cat = _mm_f32(dpre.t(), z)                                               # [2C, c_m]
    db_cat = db_p.sum(0)
    return dm, [dlw_p.sum(0), dlb_p.sum(0), dw_cat[:c], db_cat[:c], dw_cat[c:], db_cat[c:], dw, db_out]
