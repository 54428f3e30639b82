"""Triton attention with a shared pair bias and a key mask (AF2 Suppl. Alg. 7, 8, 13, 14; AF3 Suppl. Alg. 24),
forward and backward, on the ``[B, S, L, H, D]`` layout read and written in place through strides.

Imported lazily by :mod:`foldforge.kernels.attention` on the first launch.

Forward (one program per (b, s, h) and BLOCK_M queries): online softmax over BLOCK_N key tiles; bias tile
and key mask applied to the fp32 logits; masked keys get the logit ``_NEG`` and a row with no valid key is
written as 0 at the end (m stays at ``_NEG``). Saves the log-sum-exp as two fp32 planes,
``lse [B, S, H, 2, L_q]``: ``hi = fl(m + log l)`` and the rounding residual ``lo = (m - hi) + log l``
(0, 0 for fully masked rows, which makes every recomputed probability of such a row 0). The backward uses
``lo`` for fp32 inputs only: ``hi`` alone rounds at the magnitude of the largest logit, a common relative
error of every probability in the row that gave twice the fp32 reference's error in dV (interpreter test).

Exponentials are ``exp2((s - m) * log2 e)`` with the logits ``s = q k^T * scale + bias`` in natural units:
the subtraction rounds at the magnitude of the (small) difference. Folding log2 e into the scale and the
bias instead (FlashAttention's ``exp2(s' - m')``) rounds at the magnitude of the logits -- large with AF2
pair biases -- and gave about twice the fp32 reference's error in the bias gradient (interpreter, bias ~5).

Backward, three kernels, each recomputing ``P = exp2((s - lse) * log2 e)`` from q, k and the bias:
  * ``dq``:   per (b, s, h, query block), a first sweep over the key blocks sums
              ``delta = rowsum(P * dP)`` (stored for the two later kernels; see the kernel for why not
              FlashAttention's ``rowsum(dO * O)``), a second accumulates dq. The output is not kept for backward.
  * ``dkdv``: per (b, s, h, key block), loops over query blocks (dK, dV accumulate in registers). Where
              each bias element belongs to exactly one (b, s) row (S == 1, or a per-row bias) it stores dS
              as the bias gradient directly; in the "atomic" mode it ``atomic_add``s dS into an fp32 buffer.
  * ``dbias`` (the deterministic mode): per (bias row, h, query block, key block) tile, loops over the
              rows (b, s) that share the bias, recomputing P and dP = dO V^T and summing
              dS = P (dP - delta) in registers; each tile is written once. No atomics and no scratch memory:
              the reduction over S rows happens in registers, in a fixed order, so results are bitwise
              reproducible. Cost: two extra ``[BM, D] x [D, BN]`` products per tile and row, which at
              D <= 64 cost less than the alternatives -- a per-row-group partial-sum buffer would move
              ``S * H * L^2 * 8`` bytes (1.8 GB for triangle attention at L = 384) through a read-modify-write.

Fully masked rows: output 0, lse 0, every P 0, so all four gradients of that row are 0 (finite).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from foldforge.kernels import _launch

_NEG = tl.constexpr(-1.0e30)          # logit of a masked key; exp2((_NEG - finite) * log2 e) == 0
_LOG2E = tl.constexpr(1.4426950408889634)
MAX_HEAD_DIM = 64
DBIAS_MODES = ("deterministic", "atomic")
# Bias-gradient path when the tuned table has no "dbias" entry for the shape bucket. Deterministic until a
# GPU measurement (bench ops --op attention, both paths) shows the atomic path faster: bitwise-reproducible
# gradients are worth a small cost, and MegaFold's fp32 atomics are the slow part of its backward.
DEFAULT_DBIAS_MODE = "deterministic"


# ---------------------------------------------------------------- shared device helpers
@triton.jit
def _mm(a, b, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` accumulated in fp32. Under the interpreter the (already rounded) operands go in as fp32:
    Triton 3.9's interpreter multiplies bf16 operands as raw uint16."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _split_row(pid, S, H):
    """program id -> (b, s, h) with h fastest (int64, for offsets)."""
    p = pid.to(tl.int64)
    h = p % H
    t = p // H
    return t // S, t % S, h


@triton.jit
def _logits(q, kt, scale, bias_ptrs, bias_mask, valid, HAS_BIAS: tl.constexpr,
            DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """Logits ``q k^T * scale + bias`` of a tile (natural units, fp32), ``_NEG`` where ``valid`` is False
    (``valid`` broadcasts against the tile)."""
    s = _mm(q, kt, DOT_F32, PREC) * scale
    if HAS_BIAS:
        s += tl.load(bias_ptrs, mask=bias_mask, other=0.0).to(tl.float32)
    return tl.where(valid, s, _NEG)


@triton.jit
def _load_lse(ptrs, LQ, row_ok, LSE_LO: tl.constexpr):
    """The row log-sum-exp planes ``(hi, lo)``; without LSE_LO ``lo`` is not read (``hi`` stands in)."""
    hi = tl.load(ptrs, mask=row_ok, other=0.0)
    lo = hi
    if LSE_LO:
        lo = tl.load(ptrs + LQ, mask=row_ok, other=0.0)
    return hi, lo


@triton.jit
def _probs(st, hi, lo, LSE_LO: tl.constexpr):
    """Softmax probabilities recomputed from the logits and the saved log-sum-exp (broadcast shapes)."""
    x = st - hi
    if LSE_LO:
        x = x - lo
    return tl.exp2(x * _LOG2E)


@triton.jit
def _key_valid(cols, LK, mask_base, smj, HAS_MASK: tl.constexpr):
    ok = cols < LK
    if HAS_MASK:
        keep = tl.load(mask_base + cols * smj, mask=ok, other=0)
        ok = ok & (keep != 0)
    return ok


# ---------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["S", "H", "LQ", "LK"])
def _fwd_kernel(Q, K, V, Bias, Mask, O, Lse, S, H, LQ, LK, D, scale,
                sqb, sqs, sql, sqh, skb, sks, skl, skh, svb, svs, svl, svh, sob, sos, sol, soh,
                sbb, sbs, sbh, sbi, sbj, smb, sms, smj,
                HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    b, s, h = _split_row(pid, S, H)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    d_ok = dd < D
    q = tl.load(Q + b * sqb + s * sqs + h * sqh + rows[:, None] * sql + dd[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + s * sks + h * skh
    v_base = V + b * svb + s * svs + h * svh
    bias_rows = Bias + b * sbb + s * sbs + h * sbh + rows[:, None] * sbi
    mask_base = Mask + b * smb + s * sms
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < LK
        kt = tl.load(k_base + cols[None, :] * skl + dd[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        valid = _key_valid(cols, LK, mask_base, smj, HAS_MASK)
        st = _logits(q, kt, scale, bias_rows + cols[None, :] * sbj, row_ok[:, None] & col_ok[None, :],
                     valid[None, :], HAS_BIAS, DOT_F32, PREC)
        m_new = tl.maximum(m_i, tl.max(st, 1))
        alpha = tl.exp2((m_i - m_new) * _LOG2E)
        p = tl.exp2((st - m_new[:, None]) * _LOG2E)   # masked keys: 0 once a valid key was seen (see the end)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svl + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_F32, PREC)
        m_i = m_new
    # m_i == _NEG: no valid key in the row; p was exp2(0) = 1 for every key, so l_i and acc hold junk -> 0
    seen = m_i > _NEG
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    tl.store(O + b * sob + s * sos + h * soh + rows[:, None] * sol + dd[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    log_l = tl.log(l_safe)
    hi = tl.where(seen, m_i + log_l, 0.0)
    lo = tl.where(seen, (m_i - hi) + log_l, 0.0)
    lse_row = Lse + pid.to(tl.int64) * 2 * LQ + rows
    tl.store(lse_row, hi, mask=row_ok)
    tl.store(lse_row + LQ, lo, mask=row_ok)


# ---------------------------------------------------------------- backward: dq (+ delta)
@triton.jit(do_not_specialize=["S", "H", "LQ", "LK"])
def _dq_kernel(Q, K, V, Bias, Mask, DO, Lse, Delta, DQ, S, H, LQ, LK, D, scale,
               sqb, sqs, sql, sqh, skb, sks, skl, skh, svb, svs, svl, svh, sgb, sgs, sgl, sgh,
               sdob, sdos, sdol, sdoh, sbb, sbs, sbh, sbi, sbj, smb, sms, smj,
               HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, LSE_LO: tl.constexpr):
    """dq = scale * sum_j dS_ij k_j with dS = P (dP - delta), written with the strides ``sg*`` (a fresh
    tensor of q's shape).

    delta_i = sum_j P_ij dP_ij is computed here by a first sweep over the keys (and stored for the other two
    kernels) instead of FlashAttention's rowsum(dO * O): O is stored rounded to q's dtype, and with a
    peaked softmax (large pair biases) dS_ij = P_ij (dP_ij - delta_i) cancels; the bf16 rounding of O then
    gave 3-4x the bf16 reference's error in dbias, dq and dk (interpreter, bias ~3), while P dP summed in
    fp32 cancels as the reference does. It costs a second QK^T / dO V^T sweep in this kernel and saves
    keeping O for backward."""
    pid = tl.program_id(0)
    b, s, h = _split_row(pid, S, H)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    tile_ok = row_ok[:, None] & (dd < D)[None, :]
    q = tl.load(Q + b * sqb + s * sqs + h * sqh + rows[:, None] * sql + dd[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DO + b * sdob + s * sdos + h * sdoh + rows[:, None] * sdol + dd[None, :], mask=tile_ok, other=0.0)
    lse_hi, lse_lo = _load_lse(Lse + pid.to(tl.int64) * 2 * LQ + rows, LQ, row_ok, LSE_LO)
    k_base = K + b * skb + s * sks + h * skh
    v_base = V + b * svb + s * svs + h * svh
    bias_rows = Bias + b * sbb + s * sbs + h * sbh + rows[:, None] * sbi
    mask_base = Mask + b * smb + s * sms
    delta = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_ok = (dd < D)[:, None] & (cols < LK)[None, :]
        kt = tl.load(k_base + cols[None, :] * skl + dd[:, None], mask=kv_ok, other=0.0)
        vt = tl.load(v_base + cols[None, :] * svl + dd[:, None], mask=kv_ok, other=0.0)
        valid = _key_valid(cols, LK, mask_base, smj, HAS_MASK)
        st = _logits(q, kt, scale, bias_rows + cols[None, :] * sbj, row_ok[:, None] & (cols < LK)[None, :],
                     valid[None, :], HAS_BIAS, DOT_F32, PREC)
        p = _probs(st, lse_hi[:, None], lse_lo[:, None], LSE_LO)
        delta += tl.sum(p * _mm(do, vt, DOT_F32, PREC), 1)
    tl.store(Delta + pid.to(tl.int64) * LQ + rows, delta, mask=row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_ok = (dd < D)[:, None] & (cols < LK)[None, :]
        kt = tl.load(k_base + cols[None, :] * skl + dd[:, None], mask=kv_ok, other=0.0)
        vt = tl.load(v_base + cols[None, :] * svl + dd[:, None], mask=kv_ok, other=0.0)
        valid = _key_valid(cols, LK, mask_base, smj, HAS_MASK)
        st = _logits(q, kt, scale, bias_rows + cols[None, :] * sbj, row_ok[:, None] & (cols < LK)[None, :],
                     valid[None, :], HAS_BIAS, DOT_F32, PREC)
        p = _probs(st, lse_hi[:, None], lse_lo[:, None], LSE_LO)
        dp = _mm(do, vt, DOT_F32, PREC)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(kt.dtype), tl.trans(kt), DOT_F32, PREC)
    tl.store(DQ + b * sgb + s * sgs + h * sgh + rows[:, None] * sgl + dd[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------- backward: dk, dv (+ dbias stored / atomics)
@triton.jit(do_not_specialize=["S", "H", "LQ", "LK"])
def _dkdv_kernel(Q, K, V, Bias, Mask, DO, Lse, Delta, DK, DV, DB, S, H, LQ, LK, D, scale,
                 sqb, sqs, sql, sqh, skb, sks, skl, skh, svb, svs, svl, svh, sdob, sdos, sdol, sdoh,
                 sgb, sgs, sgl, sgh, sbb, sbs, sbh, sbi, sbj, smb, sms, smj, sdbb, sdbs, sdbh, sdbi, sdbj,
                 HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DS_MODE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_F32: tl.constexpr, PREC: tl.constexpr, LSE_LO: tl.constexpr):
    """Transposed tiles ``[BLOCK_N keys, BLOCK_M queries]``: dv += P^T dO, dk += scale * dS^T q.
    DS_MODE 0: no bias gradient here; 1: store dS^T as the bias gradient (each element has one owner);
    2: fp32 atomic add of dS^T into the bias gradient (query blocks visited in a per-row rotated order, so
    the rows sharing a bias tile do not all hit the same addresses at once). dk and dv are written with the
    strides ``sg*`` (fresh tensors of k's shape)."""
    pid = tl.program_id(0)
    b, s, h = _split_row(pid, S, H)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    col_ok = cols < LK
    d_ok = dd < D
    kv_ok = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + s * sks + h * skh + cols[:, None] * skl + dd[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + s * svs + h * svh + cols[:, None] * svl + dd[None, :], mask=kv_ok, other=0.0)
    valid = _key_valid(cols, LK, Mask + b * smb + s * sms, smj, HAS_MASK)
    q_base = Q + b * sqb + s * sqs + h * sqh
    do_base = DO + b * sdob + s * sdos + h * sdoh
    bias_cols = Bias + b * sbb + s * sbs + h * sbh + cols[:, None] * sbj
    db_cols = DB + b * sdbb + s * sdbs + h * sdbh + cols[:, None] * sdbj
    row_base = pid.to(tl.int64) * LQ
    lse_base = Lse + pid.to(tl.int64) * 2 * LQ
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    n_blocks = tl.cdiv(LQ, BLOCK_M)
    first = 0
    if DS_MODE == 2:
        first = pid % n_blocks
    for t in range(0, n_blocks):
        rows = ((first + t) % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < LQ
        qt = tl.load(q_base + rows[None, :] * sql + dd[:, None], mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * sdol + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse_hi, lse_lo = _load_lse(lse_base + rows, LQ, row_ok, LSE_LO)
        delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
        tile_ok = col_ok[:, None] & row_ok[None, :]
        st = _logits(k, qt, scale, bias_cols + rows[None, :] * sbi, tile_ok, valid[:, None],
                     HAS_BIAS, DOT_F32, PREC)
        pt = _probs(st, lse_hi[None, :], lse_lo[None, :], LSE_LO)
        dv += _mm(pt.to(do.dtype), do, DOT_F32, PREC)
        dpt = _mm(v, tl.trans(do), DOT_F32, PREC)
        dst = pt * (dpt - delta[None, :])
        dk += _mm(dst.to(qt.dtype), tl.trans(qt), DOT_F32, PREC)
        if DS_MODE == 1:
            tl.store(db_cols + rows[None, :] * sdbi, dst.to(DB.dtype.element_ty), mask=tile_ok)
        if DS_MODE == 2:
            tl.atomic_add(db_cols + rows[None, :] * sdbi, dst, mask=tile_ok, sem="relaxed")
    g_off = b * sgb + s * sgs + h * sgh + cols[:, None] * sgl + dd[None, :]
    tl.store(DK + g_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


# ---------------------------------------------------------------- backward: deterministic dbias
@triton.jit(do_not_specialize=["S", "H", "LQ", "LK", "NB", "NS", "SB"])
def _dbias_kernel(Q, K, V, Bias, Mask, DO, Lse, Delta, DB, S, H, LQ, LK, D, scale, NB, NS, SB,
                  sqb, sqs, sql, sqh, skb, sks, skl, skh, svb, svs, svl, svh, sdob, sdos, sdol, sdoh,
                  sbb, sbs, sbh, sbi, sbj, smb, sms, smj, sdbb, sdbs, sdbh, sdbi, sdbj,
                  HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_F32: tl.constexpr, PREC: tl.constexpr, LSE_LO: tl.constexpr):
    """dbias[bb, sb, h, i, j] = sum over the NB x NS rows (b, s) sharing it of dS[b, s, h, i, j].
    Program axis 0: (bb, sb, h) of the bias gradient (SB = its row count), axis 1: (query block, key block).
    ``sb*`` strides index the bias itself by (bb, sb); rows are b = bb + r // NS, s = sb + r % NS."""
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    t = pid // H
    sb = t % SB
    bb = t // SB
    tile = tl.program_id(1)
    n_col_blocks = tl.cdiv(LK, BLOCK_N)
    rows = (tile // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    col_ok = cols < LK
    d_ok = dd < D
    tile_ok = row_ok[:, None] & col_ok[None, :]
    # the bias tile is the same for every row of the reduction: loaded once
    bias = tl.load(Bias + bb * sbb + sb * sbs + h * sbh + rows[:, None] * sbi + cols[None, :] * sbj,
                   mask=tile_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r in range(0, NB * NS):
        b = bb + r // NS
        s = sb + r % NS
        q = tl.load(Q + b * sqb + s * sqs + h * sqh + rows[:, None] * sql + dd[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + b * sdob + s * sdos + h * sdoh + rows[:, None] * sdol + dd[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        kt = tl.load(K + b * skb + s * sks + h * skh + cols[None, :] * skl + dd[:, None],
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        vt = tl.load(V + b * svb + s * svs + h * svh + cols[None, :] * svl + dd[:, None],
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        row = (b * S + s) * H + h
        lse_hi, lse_lo = _load_lse(Lse + row * 2 * LQ + rows, LQ, row_ok, LSE_LO)
        delta = tl.load(Delta + row * LQ + rows, mask=row_ok, other=0.0)
        valid = _key_valid(cols, LK, Mask + b * smb + s * sms, smj, HAS_MASK)
        st = tl.where(valid[None, :], _mm(q, kt, DOT_F32, PREC) * scale + bias, _NEG)
        p = _probs(st, lse_hi[:, None], lse_lo[:, None], LSE_LO)
        dp = _mm(do, vt, DOT_F32, PREC)
        acc += p * (dp - delta[:, None])
    tl.store(DB + bb * sdbb + sb * sdbs + h * sdbh + rows[:, None] * sdbi + cols[None, :] * sdbj,
             acc.to(DB.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------- launch parameters
def bucket(lq: int, lk: int, d: int) -> str:
    """Tuned-table key: padded head dim and the next power of two of the longer length (16..1024)."""
    return f"d{max(16, _launch.next_pow2(d))}-l{min(1024, max(16, _launch.next_pow2(max(lq, lk))))}"


def default_config(d: int) -> dict:
    """Launch parameters without a tuned entry: 64 x 64 tiles (FlashAttention-2's choice at D <= 64 on
    A100/H100), 4 warps, 2 stages. A tuned entry may also set ``dkdv_atomic`` (the dK/dV kernel's tiles
    when it adds the bias gradient atomically) and ``dbias_mode``."""
    tile = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"fwd": dict(tile), "dq": dict(tile), "dkdv": dict(tile), "dbias": dict(tile),
            "dbias_mode": DEFAULT_DBIAS_MODE}


_CONFIGS: dict[tuple, dict] = {}


def config(device: torch.device, lq: int, lk: int, d: int) -> dict:
    """The tuned entry of this shape bucket on this GPU (or :func:`default_config`), with the tiles
    clipped to the lengths (a 16-row tile for L = 7). Cached per (GPU, bucket, lengths' clip)."""
    bm_cap, bn_cap = max(16, _launch.next_pow2(lq)), max(16, _launch.next_pow2(lk))
    key = (_launch.gpu_slug(device), bucket(lq, lk, d), min(bm_cap, 1024), min(bn_cap, 1024))
    cfg = _CONFIGS.get(key)
    if cfg is None:
        base = default_config(d)
        cfg = _launch.tuned(device, "evo_attention", key[1]) or {}
        cfg = {**base, **cfg}
        cfg.setdefault("dkdv_atomic", cfg["dkdv"])
        for name in ("fwd", "dq", "dkdv", "dbias", "dkdv_atomic"):
            c = dict(cfg[name])
            c["BLOCK_M"] = min(c["BLOCK_M"], bm_cap)
            c["BLOCK_N"] = min(c["BLOCK_N"], bn_cap)
            cfg[name] = c
        _CONFIGS[key] = cfg
    return cfg


def clear_config_cache() -> None:
    """Forget resolved configs (after :func:`_launch.set_tuned_override`)."""
    _CONFIGS.clear()


def _lse_lo(P: "Problem") -> dict:
    return {"LSE_LO": P.q.dtype == torch.float32}


# ---------------------------------------------------------------- problem layout
class Problem:
    """Inputs viewed as 5-d ``[B, S, L, H, D]`` (q, k, v), ``[Bb, Sb, H, L_q, L_k]`` (bias) and
    ``[Bm, Sm, L_k]`` (mask) without copies where the batch dims merge, with the strides the kernels use
    (stride 0 along broadcast dims)."""

    __slots__ = ("q", "k", "v", "bias", "mask", "B", "S", "LQ", "LK", "H", "D", "BB", "SB", "bias_strides",
                 "mask_strides", "scale", "dot")

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None, scale: float):
        *batch, S, LQ, H, D = q.shape
        LK = k.shape[-3]
        B = 1
        for n in batch:
            B *= n
        self.B, self.S, self.LQ, self.LK, self.H, self.D = B, S, LQ, LK, H, D
        self.q = q.reshape(B, S, LQ, H, D)
        self.k = k.reshape(B, S, LK, H, D)
        self.v = v.reshape(B, S, LK, H, D)
        self.scale = float(scale)
        self.dot = _launch.dot_args(q.dtype, follow_torch_tf32=True)
        nd = q.dim()
        if bias is not None:
            bias = bias.reshape((1,) * (nd - bias.dim()) + tuple(bias.shape))
            bb = 1 if all(n == 1 for n in bias.shape[:-4]) else B
            self.bias = bias.reshape(bb, bias.shape[-4], H, LQ, LK)
            self.BB, self.SB = bb, bias.shape[-4]
            st = self.bias.stride()
            self.bias_strides = (st[0] if bb > 1 else 0, st[1] if self.SB > 1 else 0, st[2], st[3], st[4])
        else:
            self.bias, self.BB, self.SB = None, 1, 1
            self.bias_strides = (0, 0, 0, 0, 0)
        if mask is not None:
            mask = mask.reshape((1,) * (nd - 2 - mask.dim()) + tuple(mask.shape))
            bm = 1 if all(n == 1 for n in mask.shape[:-2]) else B
            m = mask.reshape(bm, mask.shape[-2], LK).view(torch.uint8)
            self.mask = m
            st = m.stride()
            self.mask_strides = (st[0] if bm > 1 else 0, st[1] if m.shape[1] > 1 else 0, st[2])
        else:
            self.mask = None
            self.mask_strides = (0, 0, 0)

    @property
    def rows(self) -> int:
        return self.B * self.S * self.H

    def bias_ptr(self, fallback: Tensor) -> Tensor:
        return self.bias if self.bias is not None else fallback

    def mask_ptr(self, fallback: Tensor) -> Tensor:
        return self.mask if self.mask is not None else fallback

    def reduced_rows(self) -> int:
        """Rows (b, s) summed into each bias-gradient element."""
        return (self.B // self.BB) * (self.S // self.SB)


def _s4(t: Tensor) -> tuple[int, int, int, int]:
    st = t.stride()
    return st[0], st[1], st[2], st[3]


def _launch_kw(c: dict) -> dict:
    return {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"], "num_warps": c["num_warps"],
            "num_stages": c["num_stages"]}


def _block_d(d: int) -> int:
    return max(16, _launch.next_pow2(d))


# ---------------------------------------------------------------- launchers
def run_fwd(P: Problem, c: dict) -> tuple[Tensor, Tensor]:
    """``o [B, S, L_q, H, D]`` (contiguous, q's dtype), ``lse [B, S, H, 2, L_q]`` (fp32, hi and lo planes)."""
    q = P.q
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((P.B, P.S, P.H, 2, P.LQ), dtype=torch.float32, device=q.device)
    grid = (P.rows, triton.cdiv(P.LQ, c["BLOCK_M"]))
    _fwd_kernel[grid](q, P.k, P.v, P.bias_ptr(q), P.mask_ptr(q), o, lse, P.S, P.H, P.LQ, P.LK, P.D,
                      P.scale, *_s4(q), *_s4(P.k), *_s4(P.v), *_s4(o), *P.bias_strides, *P.mask_strides,
                      HAS_BIAS=P.bias is not None, HAS_MASK=P.mask is not None, BLOCK_D=_block_d(P.D),
                      **P.dot, **_launch_kw(c))
    return o, lse


def run_dq(P: Problem, do: Tensor, lse: Tensor, c: dict) -> tuple[Tensor, Tensor]:
    """``dq`` (contiguous, q's dtype) and ``delta = rowsum(P * dP)`` (fp32, ``[B, S, H, L_q]``)."""
    q = P.q
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    delta = torch.empty((P.B, P.S, P.H, P.LQ), dtype=torch.float32, device=q.device)
    grid = (P.rows, triton.cdiv(P.LQ, c["BLOCK_M"]))
    _dq_kernel[grid](q, P.k, P.v, P.bias_ptr(q), P.mask_ptr(q), do, lse, delta, dq, P.S, P.H, P.LQ, P.LK, P.D,
                     P.scale, *_s4(q), *_s4(P.k), *_s4(P.v), *_s4(dq), *_s4(do),
                     *P.bias_strides, *P.mask_strides, HAS_BIAS=P.bias is not None, HAS_MASK=P.mask is not None,
                     BLOCK_D=_block_d(P.D), **P.dot, **_lse_lo(P), **_launch_kw(c))
    return dq, delta


def run_dkdv(P: Problem, do: Tensor, lse: Tensor, delta: Tensor, c: dict, ds_mode: int,
             db: Tensor | None) -> tuple[Tensor, Tensor]:
    """``dk``, ``dv`` (contiguous, k's dtype); with ``ds_mode`` 1 / 2 also stores / atomically adds dS into
    ``db`` (``[BB, SB, H, L_q, L_k]``, contiguous)."""
    k = P.k
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(k.shape, dtype=P.v.dtype, device=k.device)
    if db is not None:
        st = db.stride()
        db_strides = (st[0] if P.BB > 1 else 0, st[1] if P.SB > 1 else 0, st[2], st[3], st[4])
    else:
        db, db_strides = dk, (0, 0, 0, 0, 0)
    grid = (P.rows, triton.cdiv(P.LK, c["BLOCK_N"]))
    _dkdv_kernel[grid](P.q, k, P.v, P.bias_ptr(k), P.mask_ptr(k), do, lse, delta, dk, dv, db,
                       P.S, P.H, P.LQ, P.LK, P.D, P.scale,
                       *_s4(P.q), *_s4(k), *_s4(P.v), *_s4(do), *_s4(dk), *P.bias_strides, *P.mask_strides,
                       *db_strides, HAS_BIAS=P.bias is not None, HAS_MASK=P.mask is not None, DS_MODE=ds_mode,
                       BLOCK_D=_block_d(P.D), **P.dot, **_lse_lo(P), **_launch_kw(c))
    return dk, dv


def run_dbias(P: Problem, do: Tensor, lse: Tensor, delta: Tensor, db: Tensor, c: dict) -> Tensor:
    """Deterministic bias gradient into ``db`` (``[BB, SB, H, L_q, L_k]``, contiguous, bias dtype)."""
    nb, ns = P.B // P.BB, P.S // P.SB
    grid = (P.BB * P.SB * P.H, triton.cdiv(P.LQ, c["BLOCK_M"]) * triton.cdiv(P.LK, c["BLOCK_N"]))
    _dbias_kernel[grid](P.q, P.k, P.v, P.bias, P.mask_ptr(P.q), do, lse, delta, db,
                        P.S, P.H, P.LQ, P.LK, P.D, P.scale, nb, ns, P.SB,
                        *_s4(P.q), *_s4(P.k), *_s4(P.v), *_s4(do), *P.bias.stride(), *P.mask_strides,
                        *db.stride(), HAS_MASK=P.mask is not None, BLOCK_D=_block_d(P.D), **P.dot,
                        **_lse_lo(P), **_launch_kw(c))
    return db


# ---------------------------------------------------------------- entry points (custom ops call these)
def forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None, scale: float,
            config_override: dict | None = None) -> tuple[Tensor, Tensor]:
    """``out`` of q's shape (contiguous) and ``lse [*, S, H, 2, L_q]`` (fp32, hi and lo planes)."""
    P = Problem(q, k, v, bias, mask, scale)
    cfg = config_override or config(q.device, P.LQ, P.LK, P.D)
    o, lse = run_fwd(P, cfg["fwd"])
    return o.view(q.shape), lse.view(*q.shape[:-3], P.H, 2, P.LQ)


def resolve_dbias_mode(mode: str, cfg: dict) -> str:
    if mode == "auto":
        mode = cfg.get("dbias_mode", DEFAULT_DBIAS_MODE)
    if mode not in DBIAS_MODES:
        raise ValueError(f"evo_attention: dbias_mode must be 'auto' or one of {DBIAS_MODES}, got {mode!r}")
    return mode


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None,
             lse: Tensor, scale: float, need_dbias: bool, dbias_mode: str = "auto",
             config_override: dict | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``dq, dk, dv`` (contiguous, shapes and dtypes of q, k, v) and ``dbias`` (bias's shape and dtype)
    or None. ``dbias_mode``: "deterministic", "atomic" or "auto" (the tuned table's choice)."""
    P = Problem(q, k, v, bias, mask, scale)
    cfg = config_override or config(q.device, P.LQ, P.LK, P.D)
    if do.stride(-1) != 1:
        do = do.contiguous()
    do5 = do.reshape(P.B, P.S, P.LQ, P.H, P.D)
    lse5 = lse.reshape(P.B, P.S, P.H, 2, P.LQ)
    dq, delta = run_dq(P, do5, lse5, cfg["dq"])
    db, ds_mode = None, 0
    need_dbias = need_dbias and bias is not None
    if need_dbias:
        db_shape = (P.BB, P.SB, P.H, P.LQ, P.LK)
        if P.reduced_rows() == 1:
            db, ds_mode = torch.empty(db_shape, dtype=bias.dtype, device=q.device), 1
        elif resolve_dbias_mode(dbias_mode, cfg) == "atomic":
            db, ds_mode = torch.zeros(db_shape, dtype=torch.float32, device=q.device), 2
    dk, dv = run_dkdv(P, do5, lse5, delta, cfg["dkdv_atomic" if ds_mode == 2 else "dkdv"], ds_mode, db)
    if need_dbias and db is None:
        db = run_dbias(P, do5, lse5, delta, torch.empty((P.BB, P.SB, P.H, P.LQ, P.LK), dtype=bias.dtype,
                                                        device=q.device), cfg["dbias"])
    if db is not None:
        db = db.to(bias.dtype).view(bias.shape)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), db
