"""Triton attention with a shared pair bias and a key mask (AF2 Suppl. Alg. 7, 8, 13, 14; AF3 Suppl. Alg. 24),
forward and backward, on the ``[B, S, L, H, D]`` layout read and written in place through strides.

Imported lazily by :mod:`foldforge.kernels.attention` on the first launch.

Launch: one 1-d grid per kernel whose program ids run over the blocks of one (b, s, h) row first, so the
programs that read the same K/V (forward, dq) or q/dO (dK/dV) are launched together and share those loads
in L2; a 1-d grid also has no 65535 limit on the number of rows. Offsets of (b, s, h) are int64.
Full tiles are loaded without bounds masks: ``EVEN_M`` / ``EVEN_N`` (L_q / L_k a multiple of the block)
and ``EVEN_D`` (D a power of two >= 16) are compile-time flags set on the host, so the common shapes get
unmasked, vectorised loads of q, k, v, dO and the bias; other lengths keep the masked code. D itself is a
compile-time constant and the ``[B, S, L, H]`` strides of q, k, v, dO, O and the gradients are passed in
units of ``VEC`` elements (16 bytes where they allow), so head dims below the tile (D = 8, 24) still get
16-byte loads (the compiler knows a runtime stride only as "multiple of 16" or not).

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

``delta_i = sum_j P_ij dP_ij = dO_i . O_i`` (the row term of dS = P (dP - delta)) must carry more than the
16-bit output's precision: with a peaked softmax (large pair biases) dS cancels, and delta from O rounded to
bf16 gave 3-4x the bf16 reference's error in dbias, dq and dk (interpreter, bias ~3). For 16-bit inputs
that need gradients the forward therefore also stores the output's rounding residual ``O_lo`` (q's dtype,
O's layout), with O + O_lo ~ 16 bits of ``sum_j P_j v_j``: besides ``acc = sum_j fl16(P_j) v_j`` (which gives
O exactly as without gradients) a second accumulator sums ``fl16(P_j - fl16(P_j)) v_j`` (one more
``[BM, BN] x [BN, D]`` product per tile), and ``O_lo = fl16((acc + acc_lo) / l - O)``. The residual of P
matters as much as O's own rounding: without it, dbias / dq errors grew up to 2.3x (interpreter tests,
bias 3-10); with it, every gradient error of the tests equals the rowsum(P * dP) path's. The dq kernel's
prologue sums ``delta = dO . (O + O_lo)`` in fp32 -- no second sweep over the keys.
fp32 inputs (and 16-bit ones without a stored residual) keep ``delta = rowsum(P * dP)``, summed by a first
sweep over the keys in the dq kernel: at fp32 the reference's own error is small enough that ``dO . O``
shows that the recomputed probabilities do not sum to exactly the forward's normaliser (1.14x the allowed
dq error, interpreter, L = 7), while rowsum(P * dP) cancels with dS exactly as the reference's does.

Backward, three kernels, each recomputing ``P = exp2((s - lse) * log2 e)`` from q, k and the bias:
  * ``dq``:   per (b, s, h, query block): delta (above; stored for the two later kernels), then a sweep
              over the keys accumulating dq.
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
def _program(LEN, BLOCK: tl.constexpr):
    """1-d launch: program id -> (block index along a length LEN, row id (int64)); the blocks of one row are
    consecutive programs."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(LEN, BLOCK)
    return pid % n_blocks, (pid // n_blocks).to(tl.int64)


@triton.jit
def _in_elements(sb, ss, sl, sh, VEC: tl.constexpr):
    """The ``[B, S, L, H]`` strides of a q/k/v-like tensor, passed in units of VEC elements, back in elements:
    the compiler then knows they are multiples of VEC and uses 16-byte loads along D even where D is not a
    multiple of 16 (D = 8, 24), which it cannot know from the runtime stride values."""
    return sb * VEC, ss * VEC, sl * VEC, sh * VEC


@triton.jit
def _split_row(row, S, H):
    """row id -> (b, s, h) with h fastest (int64, for offsets)."""
    h = row % H
    t = row // H
    return t // S, t % S, h


@triton.jit
def _load2(ptrs, ok0, ok1, EVEN0: tl.constexpr, EVEN1: tl.constexpr):
    """A 2-d tile; ``ok0`` / ``ok1`` are the in-range flags along dims 0 / 1, applied only along a dim that
    is not EVEN (full tiles load unmasked); out-of-range elements read 0."""
    if EVEN0:
        if EVEN1:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=ok1[None, :], other=0.0)
    else:
        if EVEN1:
            x = tl.load(ptrs, mask=ok0[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=ok0[:, None] & ok1[None, :], other=0.0)
    return x


@triton.jit
def _store2(ptrs, x, ok0, ok1, EVEN0: tl.constexpr, EVEN1: tl.constexpr):
    """Store a 2-d tile, masked as :func:`_load2` loads."""
    if EVEN0:
        if EVEN1:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=ok1[None, :])
    else:
        if EVEN1:
            tl.store(ptrs, x, mask=ok0[:, None])
        else:
            tl.store(ptrs, x, mask=ok0[:, None] & ok1[None, :])


@triton.jit
def _load1(ptrs, ok, EVEN: tl.constexpr):
    if EVEN:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=ok, other=0.0)
    return x


@triton.jit
def _store1(ptrs, x, ok, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, x)
    else:
        tl.store(ptrs, x, mask=ok)


@triton.jit
def _load_lse(ptrs, LQ, row_ok, EVEN_M: tl.constexpr, LSE_LO: tl.constexpr):
    """The row log-sum-exp planes ``(hi, lo)``; without LSE_LO ``lo`` is not read (``hi`` stands in)."""
    hi = _load1(ptrs, row_ok, EVEN_M)
    lo = hi
    if LSE_LO:
        lo = _load1(ptrs + LQ, row_ok, EVEN_M)
    return hi, lo


@triton.jit
def _probs(st, hi, lo, LSE_LO: tl.constexpr):
    """Softmax probabilities recomputed from the logits and the saved log-sum-exp (broadcast shapes)."""
    x = st - hi
    if LSE_LO:
        x = x - lo
    return tl.exp2(x * _LOG2E)


@triton.jit
def _key_ok(m_ptrs, col_ok, HAS_MASK: tl.constexpr, EVEN_N: tl.constexpr):
    """``[BLOCK_N]`` bool: the key is in range and not masked. Only called where ``KEY_CHECK`` (a key mask,
    or a partial key tile)."""
    if HAS_MASK:
        if EVEN_N:
            ok = tl.load(m_ptrs) != 0
        else:
            ok = tl.load(m_ptrs, mask=col_ok, other=0) != 0
    else:
        ok = col_ok
    return ok


@triton.jit
def _logits(q, kt, b_ptrs, m_ptrs, row_ok, col_ok, scale, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
            KEY_CHECK: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_F32: tl.constexpr,
            PREC: tl.constexpr):
    """Logits ``q k^T * scale + bias`` of a ``[BLOCK_M queries, BLOCK_N keys]`` tile (natural units, fp32),
    ``_NEG`` at masked or out-of-range keys."""
    st = _mm(q, kt, DOT_F32, PREC) * scale
    if HAS_BIAS:
        st += _load2(b_ptrs, row_ok, col_ok, EVEN_M, EVEN_N).to(tl.float32)
    if KEY_CHECK:
        st = tl.where(_key_ok(m_ptrs, col_ok, HAS_MASK, EVEN_N)[None, :], st, _NEG)
    return st


@triton.jit
def _query_block(Q, K, V, Bias, Mask, S, H, LQ, sqb, sqs, sql, sqh, skb, sks, skh, svb, svs, svh,
                 sbb, sbs, sbh, sbi, smb, sms, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr):
    """This program's row (b, s, h) and block of queries (fwd and dq kernels, strides in elements): the
    index vectors and bounds, the q tile, and scalar pointers to the first key block of k, v, the bias rows
    of the block and the key mask (advanced by BLOCK_N keys per iteration)."""
    blk, row = _program(LQ, BLOCK_M)
    b, s, h = _split_row(row, S, H)
    m0 = blk * BLOCK_M
    rr = tl.arange(0, BLOCK_M)
    rows = m0 + rr
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    d_ok = dd < D
    q = _load2(Q + b * sqb + s * sqs + h * sqh + rows[:, None] * sql + dd[None, :], row_ok, d_ok, EVEN_M, EVEN_D)
    k_at = K + b * skb + s * sks + h * skh
    v_at = V + b * svb + s * svs + h * svh
    b_at = Bias + b * sbb + s * sbs + h * sbh + m0.to(tl.int64) * sbi
    m_at = Mask + b * smb + s * sms
    return b, s, h, row, rr, rows, cols, dd, row_ok, d_ok, q, k_at, v_at, b_at, m_at


# ---------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["S", "H", "LQ", "LK"])
def _fwd_kernel(Q, K, V, Bias, Mask, O, OLo, Lse, S, H, LQ, LK, D: tl.constexpr, scale,
                sqb, sqs, sql, sqh, skb, sks, skl, skh, svb, svs, svl, svh, sob, sos, sol, soh,
                sbb, sbs, sbh, sbi, sbj, smb, sms, smj,
                HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, KEY_CHECK: tl.constexpr, STORE_LO: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr,
                EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, VEC: tl.constexpr, DOT_F32: tl.constexpr,
                PREC: tl.constexpr):
    """O (and with STORE_LO its rounding residual ``OLo``, same strides ``so*``) and the lse planes."""
    sqb, sqs, sql, sqh = _in_elements(sqb, sqs, sql, sqh, VEC)
    skb, sks, skl, skh = _in_elements(skb, sks, skl, skh, VEC)
    svb, svs, svl, svh = _in_elements(svb, svs, svl, svh, VEC)
    sob, sos, sol, soh = _in_elements(sob, sos, sol, soh, VEC)
    b, s, h, row, rr, rows, cols, dd, row_ok, d_ok, q, k_at, v_at, b_at, m_at = _query_block(
        Q, K, V, Bias, Mask, S, H, LQ, sqb, sqs, sql, sqh, skb, sks, skh, svb, svs, svh, sbb, sbs, sbh, sbi, smb, sms,
        D, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_M, EVEN_D)
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if STORE_LO:
        acc_lo = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, LK, BLOCK_N):
        col_ok = start + cols < LK
        kt = _load2(k_at + cols[None, :] * skl + dd[:, None], d_ok, col_ok, EVEN_D, EVEN_N)
        st = _logits(q, kt, b_at + rr[:, None] * sbi + cols[None, :] * sbj, m_at + cols * smj, row_ok, col_ok,
                     scale, HAS_BIAS, HAS_MASK, KEY_CHECK, EVEN_M, EVEN_N, DOT_F32, PREC)
        m_new = tl.maximum(m_i, tl.max(st, 1))
        alpha = tl.exp2((m_i - m_new) * _LOG2E)
        p = tl.exp2((st - m_new[:, None]) * _LOG2E)   # masked keys: 0 once a valid key was seen (see the end)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load2(v_at + cols[:, None] * svl + dd[None, :], col_ok, d_ok, EVEN_N, EVEN_D)
        p_hi = p.to(v.dtype)
        acc = acc * alpha[:, None] + _mm(p_hi, v, DOT_F32, PREC)
        if STORE_LO:   # the product of P's rounding residual: acc + acc_lo carries P to ~16 bits
            acc_lo = acc_lo * alpha[:, None] + _mm((p - p_hi.to(tl.float32)).to(v.dtype), v, DOT_F32, PREC)
        m_i = m_new
        k_at += BLOCK_N * skl
        v_at += BLOCK_N * svl
        b_at += BLOCK_N * sbj
        m_at += BLOCK_N * smj
    # m_i == _NEG: no valid key in the row; p was exp2(0) = 1 for every key, so l_i and acc hold junk -> 0
    seen = m_i > _NEG
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    o_hi = out.to(O.dtype.element_ty)
    o_off = b * sob + s * sos + h * soh + rows[:, None] * sol + dd[None, :]
    _store2(O + o_off, o_hi, row_ok, d_ok, EVEN_M, EVEN_D)
    if STORE_LO:   # O itself does not depend on STORE_LO (same output with and without gradients)
        out = tl.where(seen[:, None], (acc + acc_lo) / l_safe[:, None], 0.0)
        _store2(OLo + o_off, (out - o_hi.to(tl.float32)).to(OLo.dtype.element_ty), row_ok, d_ok, EVEN_M, EVEN_D)
    log_l = tl.log(l_safe)
    hi = tl.where(seen, m_i + log_l, 0.0)
    lo = tl.where(seen, (m_i - hi) + log_l, 0.0)
    lse_row = Lse + row * 2 * LQ + rows
    _store1(lse_row, hi, row_ok, EVEN_M)
    _store1(lse_row + LQ, lo, row_ok, EVEN_M)


# ---------------------------------------------------------------- backward: dq (+ delta)
@triton.jit
def _dq_tile(q, do, k_at, v_at, b_at, m_at, rr, cols, dd, row_ok, col_ok, d_ok, lse_hi, lse_lo, scale,
             skl, svl, sbi, sbj, smj, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, KEY_CHECK: tl.constexpr,
             EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr,
             PREC: tl.constexpr, LSE_LO: tl.constexpr):
    """One key tile of the dq kernel (``*_at``: the tile's first key / bias element): ``P``,
    ``dP = dO V^T`` (``[BLOCK_M, BLOCK_N]``, fp32) and ``K^T``."""
    kt = _load2(k_at + cols[None, :] * skl + dd[:, None], d_ok, col_ok, EVEN_D, EVEN_N)
    vt = _load2(v_at + cols[None, :] * svl + dd[:, None], d_ok, col_ok, EVEN_D, EVEN_N)
    st = _logits(q, kt, b_at + rr[:, None] * sbi + cols[None, :] * sbj, m_at + cols * smj, row_ok, col_ok, scale,
                 HAS_BIAS, HAS_MASK, KEY_CHECK, EVEN_M, EVEN_N, DOT_F32, PREC)
    p = _probs(st, lse_hi[:, None], lse_lo[:, None], LSE_LO)
    return p, _mm(do, vt, DOT_F32, PREC), kt


@triton.jit(do_not_specialize=["S", "H", "LQ", "LK"])
def _dq_kernel(Q, K, V, Bias, Mask, DO, O, OLo, Lse, Delta, DQ, S, H, LQ, LK, D: tl.constexpr, scale,
               sqb, sqs, sql, sqh, skb, sks, skl, skh, svb, svs, svl, svh, sgb, sgs, sgl, sgh,
               sdob, sdos, sdol, sdoh, sob, sos, sol, soh, sbb, sbs, sbh, sbi, sbj, smb, sms, smj,
               HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, KEY_CHECK: tl.constexpr, DELTA_FROM_O: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr,
               EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, VEC: tl.constexpr, DOT_F32: tl.constexpr,
               PREC: tl.constexpr, LSE_LO: tl.constexpr):
    """dq = scale * sum_j dS_ij k_j with dS = P (dP - delta), written with the strides ``sg*`` (a fresh
    tensor of q's shape). delta (stored for the other two kernels): with DELTA_FROM_O ``dO . (O + O_lo)``
    from the saved 16-bit output and its residual (both with the strides ``so*``), else ``rowsum(P * dP)``
    by a first sweep over the keys (see the module docstring)."""
    sqb, sqs, sql, sqh = _in_elements(sqb, sqs, sql, sqh, VEC)
    skb, sks, skl, skh = _in_elements(skb, sks, skl, skh, VEC)
    svb, svs, svl, svh = _in_elements(svb, svs, svl, svh, VEC)
    sgb, sgs, sgl, sgh = _in_elements(sgb, sgs, sgl, sgh, VEC)
    sdob, sdos, sdol, sdoh = _in_elements(sdob, sdos, sdol, sdoh, VEC)
    sob, sos, sol, soh = _in_elements(sob, sos, sol, soh, VEC)
    b, s, h, row, rr, rows, cols, dd, row_ok, d_ok, q, k_first, v_first, b_first, m_first = _query_block(
        Q, K, V, Bias, Mask, S, H, LQ, sqb, sqs, sql, sqh, skb, sks, skh, svb, svs, svh, sbb, sbs, sbh, sbi, smb, sms,
        D, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_M, EVEN_D)
    do = _load2(DO + b * sdob + s * sdos + h * sdoh + rows[:, None] * sdol + dd[None, :], row_ok, d_ok,
                EVEN_M, EVEN_D)
    lse_hi, lse_lo = _load_lse(Lse + row * 2 * LQ + rows, LQ, row_ok, EVEN_M, LSE_LO)
    if DELTA_FROM_O:
        o_off = b * sob + s * sos + h * soh + rows[:, None] * sol + dd[None, :]
        o = _load2(O + o_off, row_ok, d_ok, EVEN_M, EVEN_D).to(tl.float32)
        o += _load2(OLo + o_off, row_ok, d_ok, EVEN_M, EVEN_D).to(tl.float32)
        delta = tl.sum(do.to(tl.float32) * o, 1)
    else:
        delta = tl.zeros([BLOCK_M], tl.float32)
        k_at, v_at, b_at, m_at = k_first, v_first, b_first, m_first
        for start in range(0, LK, BLOCK_N):
            p, dp, kt = _dq_tile(q, do, k_at, v_at, b_at, m_at, rr, cols, dd, row_ok, start + cols < LK, d_ok,
                                 lse_hi, lse_lo, scale, skl, svl, sbi, sbj, smj, HAS_BIAS, HAS_MASK, KEY_CHECK,
                                 EVEN_M, EVEN_N, EVEN_D, DOT_F32, PREC, LSE_LO)
            delta += tl.sum(p * dp, 1)
            k_at += BLOCK_N * skl
            v_at += BLOCK_N * svl
            b_at += BLOCK_N * sbj
            m_at += BLOCK_N * smj
    _store1(Delta + row * LQ + rows, delta, row_ok, EVEN_M)
    k_at, v_at, b_at, m_at = k_first, v_first, b_first, m_first
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, LK, BLOCK_N):
        p, dp, kt = _dq_tile(q, do, k_at, v_at, b_at, m_at, rr, cols, dd, row_ok, start + cols < LK, d_ok,
                             lse_hi, lse_lo, scale, skl, svl, sbi, sbj, smj, HAS_BIAS, HAS_MASK, KEY_CHECK,
                             EVEN_M, EVEN_N, EVEN_D, DOT_F32, PREC, LSE_LO)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(kt.dtype), tl.trans(kt), DOT_F32, PREC)
        k_at += BLOCK_N * skl
        v_at += BLOCK_N * svl
        b_at += BLOCK_N * sbj
        m_at += BLOCK_N * smj
    _store2(DQ + b * sgb + s * sgs + h * sgh + rows[:, None] * sgl + dd[None, :],
            (dq * scale).to(DQ.dtype.element_ty), row_ok, d_ok, EVEN_M, EVEN_D)


# ---------------------------------------------------------------- backward: dk, dv (+ dbias stored / atomics)
@triton.jit(do_not_specialize=["S", "H", "LQ", "LK"])
def _dkdv_kernel(Q, K, V, Bias, Mask, DO, Lse, Delta, DK, DV, DB, S, H, LQ, LK, D: tl.constexpr, scale,
                 sqb, sqs, sql, sqh, skb, sks, skl, skh, svb, svs, svl, svh, sdob, sdos, sdol, sdoh,
                 sgb, sgs, sgl, sgh, sbb, sbs, sbh, sbi, sbj, smb, sms, smj, sdbb, sdbs, sdbh, sdbi, sdbj,
                 HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, KEY_CHECK: tl.constexpr, DS_MODE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr,
                 EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, VEC: tl.constexpr, DOT_F32: tl.constexpr,
                 PREC: tl.constexpr, LSE_LO: tl.constexpr):
    """Transposed tiles ``[BLOCK_N keys, BLOCK_M queries]``: dv += P^T dO, dk += scale * dS^T q.
    DS_MODE 0: no bias gradient here; 1: store dS^T as the bias gradient (each element has one owner);
    2: fp32 atomic add of dS^T into the bias gradient (query blocks visited in a per-row rotated order, so
    the rows sharing a bias tile do not all hit the same addresses at once). dk and dv are written with the
    strides ``sg*`` (fresh tensors of k's shape)."""
    sqb, sqs, sql, sqh = _in_elements(sqb, sqs, sql, sqh, VEC)
    skb, sks, skl, skh = _in_elements(skb, sks, skl, skh, VEC)
    svb, svs, svl, svh = _in_elements(svb, svs, svl, svh, VEC)
    sdob, sdos, sdol, sdoh = _in_elements(sdob, sdos, sdol, sdoh, VEC)
    sgb, sgs, sgl, sgh = _in_elements(sgb, sgs, sgl, sgh, VEC)
    blk, row = _program(LK, BLOCK_N)
    b, s, h = _split_row(row, S, H)
    cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    col_ok = cols < LK
    d_ok = dd < D
    k = _load2(K + b * skb + s * sks + h * skh + cols[:, None] * skl + dd[None, :], col_ok, d_ok, EVEN_N, EVEN_D)
    v = _load2(V + b * svb + s * svs + h * svh + cols[:, None] * svl + dd[None, :], col_ok, d_ok, EVEN_N, EVEN_D)
    if KEY_CHECK:   # this program's keys are fixed: their validity is read once
        valid = _key_ok(Mask + b * smb + s * sms + cols * smj, col_ok, HAS_MASK, EVEN_N)
    q_base = Q + b * sqb + s * sqs + h * sqh
    do_base = DO + b * sdob + s * sdos + h * sdoh
    bias_cols = Bias + b * sbb + s * sbs + h * sbh + cols[:, None] * sbj
    db_cols = DB + b * sdbb + s * sdbs + h * sdbh + cols[:, None] * sdbj
    lse_base = Lse + row * 2 * LQ
    delta_base = Delta + row * LQ
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    n_blocks = tl.cdiv(LQ, BLOCK_M)
    rr = tl.arange(0, BLOCK_M)
    first = 0
    if DS_MODE == 2:
        first = (row % n_blocks).to(tl.int32)
    for t in range(0, n_blocks):
        m0 = ((first + t) % n_blocks) * BLOCK_M
        rows = m0 + rr
        row_ok = rows < LQ
        qt = _load2(q_base + rows[None, :] * sql + dd[:, None], d_ok, row_ok, EVEN_D, EVEN_M)
        do = _load2(do_base + rows[:, None] * sdol + dd[None, :], row_ok, d_ok, EVEN_M, EVEN_D)
        lse_hi, lse_lo = _load_lse(lse_base + rows, LQ, row_ok, EVEN_M, LSE_LO)
        delta = _load1(delta_base + rows, row_ok, EVEN_M)
        st = _mm(k, qt, DOT_F32, PREC) * scale
        if HAS_BIAS:
            # tile row offset in int64: a bias that is a view into a wider tensor (the fused LN+projection
            # output) has a row stride of L * 516 elements, past 2^31 at crop 2048
            st += _load2(bias_cols + m0.to(tl.int64) * sbi + rr[None, :] * sbi, col_ok, row_ok, EVEN_N,
                         EVEN_M).to(tl.float32)
        if KEY_CHECK:
            st = tl.where(valid[:, None], st, _NEG)
        pt = _probs(st, lse_hi[None, :], lse_lo[None, :], LSE_LO)
        dv += _mm(pt.to(do.dtype), do, DOT_F32, PREC)
        dpt = _mm(v, tl.trans(do), DOT_F32, PREC)
        dst = pt * (dpt - delta[None, :])
        dk += _mm(dst.to(qt.dtype), tl.trans(qt), DOT_F32, PREC)
        db_ptrs = db_cols + m0.to(tl.int64) * sdbi + rr[None, :] * sdbi
        if DS_MODE == 1:
            _store2(db_ptrs, dst.to(DB.dtype.element_ty), col_ok, row_ok, EVEN_N, EVEN_M)
        if DS_MODE == 2:
            if EVEN_N:
                if EVEN_M:
                    tl.atomic_add(db_ptrs, dst, sem="relaxed")
                else:
                    tl.atomic_add(db_ptrs, dst, mask=row_ok[None, :], sem="relaxed")
            else:
                tl.atomic_add(db_ptrs, dst, mask=col_ok[:, None] & row_ok[None, :], sem="relaxed")
    g_off = b * sgb + s * sgs + h * sgh + cols[:, None] * sgl + dd[None, :]
    _store2(DK + g_off, (dk * scale).to(DK.dtype.element_ty), col_ok, d_ok, EVEN_N, EVEN_D)
    _store2(DV + g_off, dv.to(DV.dtype.element_ty), col_ok, d_ok, EVEN_N, EVEN_D)


# ---------------------------------------------------------------- backward: deterministic dbias
@triton.jit(do_not_specialize=["S", "H", "LQ", "LK", "NB", "NS", "SB"])
def _dbias_kernel(Q, K, V, Bias, Mask, DO, Lse, Delta, DB, S, H, LQ, LK, D: tl.constexpr, scale, NB, NS, SB,
                  sqb, sqs, sql, sqh, skb, sks, skl, skh, svb, svs, svl, svh, sdob, sdos, sdol, sdoh,
                  sbb, sbs, sbh, sbi, sbj, smb, sms, smj, sdbb, sdbs, sdbh, sdbi, sdbj,
                  HAS_MASK: tl.constexpr, KEY_CHECK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
                  VEC: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, LSE_LO: tl.constexpr):
    """dbias[bb, sb, h, i, j] = sum over the NB x NS rows (b, s) sharing it of dS[b, s, h, i, j].
    1-d launch over (bias row (bb, sb, h), tile) with the tile fastest (key block fastest within a query
    block): the tiles of one head, which read the same rows of q, k, v and dO, run together. ``sb*`` strides
    index the bias itself by (bb, sb) (SB = its row count); rows are b = bb + r // NS, s = sb + r % NS."""
    sqb, sqs, sql, sqh = _in_elements(sqb, sqs, sql, sqh, VEC)
    skb, sks, skl, skh = _in_elements(skb, sks, skl, skh, VEC)
    svb, svs, svl, svh = _in_elements(svb, svs, svl, svh, VEC)
    sdob, sdos, sdol, sdoh = _in_elements(sdob, sdos, sdol, sdoh, VEC)
    pid = tl.program_id(0)
    n_col_blocks = tl.cdiv(LK, BLOCK_N)
    n_tiles = tl.cdiv(LQ, BLOCK_M) * n_col_blocks
    tile = pid % n_tiles
    brow = (pid // n_tiles).to(tl.int64)
    h = brow % H
    t = brow // H
    sb = t % SB
    bb = t // SB
    m0 = (tile // n_col_blocks) * BLOCK_M
    rr = tl.arange(0, BLOCK_M)
    rows = m0 + rr
    cols = (tile % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    col_ok = cols < LK
    d_ok = dd < D
    # the bias tile is the same for every row of the reduction: loaded once
    bias = _load2(Bias + bb * sbb + sb * sbs + h * sbh + m0.to(tl.int64) * sbi + rr[:, None] * sbi
                  + cols[None, :] * sbj, row_ok, col_ok, EVEN_M, EVEN_N).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r in range(0, NB * NS):
        b = bb + r // NS
        s = sb + r % NS
        q = _load2(Q + b * sqb + s * sqs + h * sqh + rows[:, None] * sql + dd[None, :], row_ok, d_ok, EVEN_M, EVEN_D)
        do = _load2(DO + b * sdob + s * sdos + h * sdoh + rows[:, None] * sdol + dd[None, :], row_ok, d_ok,
                    EVEN_M, EVEN_D)
        kt = _load2(K + b * skb + s * sks + h * skh + cols[None, :] * skl + dd[:, None], d_ok, col_ok, EVEN_D, EVEN_N)
        vt = _load2(V + b * svb + s * svs + h * svh + cols[None, :] * svl + dd[:, None], d_ok, col_ok, EVEN_D, EVEN_N)
        row = (b * S + s) * H + h
        lse_hi, lse_lo = _load_lse(Lse + row * 2 * LQ + rows, LQ, row_ok, EVEN_M, LSE_LO)
        delta = _load1(Delta + row * LQ + rows, row_ok, EVEN_M)
        st = _mm(q, kt, DOT_F32, PREC) * scale + bias
        if KEY_CHECK:
            st = tl.where(_key_ok(Mask + b * smb + s * sms + cols * smj, col_ok, HAS_MASK, EVEN_N)[None, :], st, _NEG)
        p = _probs(st, lse_hi[:, None], lse_lo[:, None], LSE_LO)
        dp = _mm(do, vt, DOT_F32, PREC)
        acc += p * (dp - delta[:, None])
    _store2(DB + bb * sdbb + sb * sdbs + h * sdbh + m0.to(tl.int64) * sdbi + rr[:, None] * sdbi + cols[None, :] * sdbj,
            acc.to(DB.dtype.element_ty), row_ok, col_ok, EVEN_M, EVEN_N)


# ---------------------------------------------------------------- launch parameters
def bucket(lq: int, lk: int, d: int, rows: int | None = None) -> str:
    """Tuned-table key: padded head dim and the next power of two of the longer length (16..1024), with
    ``-s1`` when a single row (batch x S = 1: AF3 single attention) makes the call: its grid is H x L / tile
    programs, so it wants other tiles than the many-row triangle and MSA shapes of the same L (measured on an
    H100: the d32-l512 entry tuned at 512 rows ran AF3 single attention at 0.91x the default tiles)."""
    key = f"d{max(16, _launch.next_pow2(d))}-l{min(1024, max(16, _launch.next_pow2(max(lq, lk))))}"
    return key + "-s1" if rows == 1 else key


def default_config(d: int) -> dict:
    """Launch parameters without a tuned entry: 64 x 64 tiles (FlashAttention-2's choice at D <= 64 on
    A100/H100), 4 warps, 2 stages. A tuned entry may also set ``dkdv_atomic`` (the dK/dV kernel's tiles
    when it adds the bias gradient atomically) and ``dbias_mode``."""
    tile = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"fwd": dict(tile), "dq": dict(tile), "dkdv": dict(tile), "dbias": dict(tile),
            "dbias_mode": DEFAULT_DBIAS_MODE}


_CONFIGS: dict[tuple, dict] = {}


def config(device: torch.device, lq: int, lk: int, d: int, rows: int | None = None) -> dict:
    """The tuned entry of this shape bucket on this GPU (or :func:`default_config`), with the tiles
    clipped to the lengths (a 16-row tile for L = 7). ``rows`` = batch x S of the call (a single-row call has
    its own bucket, see :func:`bucket`). Cached per (GPU, bucket, lengths' clip)."""
    bm_cap, bn_cap = max(16, _launch.next_pow2(lq)), max(16, _launch.next_pow2(lk))
    key = (_launch.gpu_slug(device), bucket(lq, lk, d, rows), min(bm_cap, 1024), min(bn_cap, 1024))
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


def _vec(*tensors: Tensor) -> int:
    """The widest vector (in elements, at most 16 bytes) dividing every ``[B, S, L, H]`` stride of these
    q/k/v-like tensors (one dtype): the kernels get those strides in its units (:func:`_in_elements`)."""
    vec = 16 // tensors[0].element_size()
    for t in tensors:
        for st in t.stride()[:4]:
            while st % vec:
                vec //= 2
    return vec


def _s4(t: Tensor, vec: int) -> tuple[int, int, int, int]:
    """``[B, S, L, H]`` strides in units of ``vec`` elements."""
    return tuple(st // vec for st in t.stride()[:4])


def _block_d(d: int) -> int:
    return max(16, _launch.next_pow2(d))


def _launch_kw(P: Problem, c: dict) -> dict:
    """Tile sizes, launch parameters and the compile-time flags shared by the kernels: the ``EVEN_*`` flags
    (no bounds masks along that dim) and ``KEY_CHECK`` (keys need a mask or a bounds check)."""
    bm, bn, bd = c["BLOCK_M"], c["BLOCK_N"], _block_d(P.D)
    even_n = P.LK % bn == 0
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "EVEN_M": P.LQ % bm == 0, "EVEN_N": even_n,
            "EVEN_D": P.D == bd, "HAS_MASK": P.mask is not None, "KEY_CHECK": P.mask is not None or not even_n,
            "num_warps": c["num_warps"], "num_stages": c["num_stages"], **P.dot}


def _grid(rows: int, length: int, block: int) -> tuple[int]:
    """1-d grid: ``rows`` x the blocks of ``length`` (the block index varies fastest in the kernels)."""
    n = rows * triton.cdiv(length, block)
    assert n < 2**31, f"evo_attention: {n} programs exceed the launch limit"
    return (n,)


# ---------------------------------------------------------------- launchers
def run_fwd(P: Problem, c: dict, store_lo: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """``o [B, S, L_q, H, D]`` (contiguous, q's dtype), ``lse [B, S, H, 2, L_q]`` (fp32, hi and lo planes) and,
    for 16-bit q with ``store_lo``, the output's rounding residual ``o_lo`` (o's layout and dtype; else None)."""
    q = P.q
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    o_lo = torch.empty_like(o) if store_lo and q.dtype != torch.float32 else None
    lse = torch.empty((P.B, P.S, P.H, 2, P.LQ), dtype=torch.float32, device=q.device)
    vec = _vec(q, P.k, P.v, o)
    _fwd_kernel[_grid(P.rows, P.LQ, c["BLOCK_M"])](
        q, P.k, P.v, P.bias_ptr(q), P.mask_ptr(q), o, o if o_lo is None else o_lo, lse, P.S, P.H, P.LQ, P.LK, P.D,
        P.scale, *_s4(q, vec), *_s4(P.k, vec), *_s4(P.v, vec), *_s4(o, vec), *P.bias_strides, *P.mask_strides,
        HAS_BIAS=P.bias is not None, STORE_LO=o_lo is not None, VEC=vec, **_launch_kw(P, c))
    return o, lse, o_lo


def run_dq(P: Problem, do: Tensor, o: Tensor | None, o_lo: Tensor | None, lse: Tensor,
           c: dict) -> tuple[Tensor, Tensor]:
    """``dq`` (contiguous, q's dtype) and ``delta = rowsum(P * dP)`` (fp32, ``[B, S, H, L_q]``). ``o`` and
    ``o_lo`` as :func:`run_fwd` returns them (``[B, S, L_q, H, D]``, one layout): delta from ``dO . (o + o_lo)``
    where both are given, else (fp32 inputs, no residual) by a sweep over the keys."""
    q = P.q
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    delta = torch.empty((P.B, P.S, P.H, P.LQ), dtype=torch.float32, device=q.device)
    from_o = o is not None and o_lo is not None
    if from_o:
        assert o_lo.stride() == o.stride(), "evo_attention: o and its residual must share a layout"
    else:
        o = o_lo = q    # not read
    vec = _vec(q, P.k, P.v, dq, do, o)
    _dq_kernel[_grid(P.rows, P.LQ, c["BLOCK_M"])](
        q, P.k, P.v, P.bias_ptr(q), P.mask_ptr(q), do, o, o_lo, lse, delta, dq, P.S, P.H, P.LQ, P.LK, P.D,
        P.scale, *_s4(q, vec), *_s4(P.k, vec), *_s4(P.v, vec), *_s4(dq, vec), *_s4(do, vec), *_s4(o, vec),
        *P.bias_strides, *P.mask_strides, HAS_BIAS=P.bias is not None, DELTA_FROM_O=from_o, VEC=vec,
        **_lse_lo(P), **_launch_kw(P, c))
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
    vec = _vec(P.q, k, P.v, do, dk)
    _dkdv_kernel[_grid(P.rows, P.LK, c["BLOCK_N"])](
        P.q, k, P.v, P.bias_ptr(k), P.mask_ptr(k), do, lse, delta, dk, dv, db, P.S, P.H, P.LQ, P.LK, P.D, P.scale,
        *_s4(P.q, vec), *_s4(k, vec), *_s4(P.v, vec), *_s4(do, vec), *_s4(dk, vec), *P.bias_strides,
        *P.mask_strides, *db_strides, HAS_BIAS=P.bias is not None, DS_MODE=ds_mode, VEC=vec, **_lse_lo(P),
        **_launch_kw(P, c))
    return dk, dv


def run_dbias(P: Problem, do: Tensor, lse: Tensor, delta: Tensor, db: Tensor, c: dict) -> Tensor:
    """Deterministic bias gradient into ``db`` (``[BB, SB, H, L_q, L_k]``, contiguous, bias dtype)."""
    nb, ns = P.B // P.BB, P.S // P.SB
    n_tiles = triton.cdiv(P.LQ, c["BLOCK_M"]) * triton.cdiv(P.LK, c["BLOCK_N"])
    vec = _vec(P.q, P.k, P.v, do)
    _dbias_kernel[_grid(P.BB * P.SB * P.H, n_tiles, 1)](
        P.q, P.k, P.v, P.bias, P.mask_ptr(P.q), do, lse, delta, db, P.S, P.H, P.LQ, P.LK, P.D, P.scale, nb, ns, P.SB,
        *_s4(P.q, vec), *_s4(P.k, vec), *_s4(P.v, vec), *_s4(do, vec), *P.bias.stride(), *P.mask_strides,
        *db.stride(), VEC=vec, **_lse_lo(P), **_launch_kw(P, c))
    return db


# ---------------------------------------------------------------- entry points (custom ops call these)
def forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None, scale: float,
            config_override: dict | None = None, store_lo: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """``out`` of q's shape (contiguous), ``lse [*, S, H, 2, L_q]`` (fp32, hi and lo planes) and, for 16-bit
    inputs with ``store_lo`` (gradients to come), ``out``'s rounding residual (its shape and dtype; else
    None). Backward needs all three."""
    P = Problem(q, k, v, bias, mask, scale)
    cfg = config_override or config(q.device, P.LQ, P.LK, P.D, P.B * P.S)
    o, lse, o_lo = run_fwd(P, cfg["fwd"], store_lo)
    return o.view(q.shape), lse.view(*q.shape[:-3], P.H, 2, P.LQ), (None if o_lo is None else o_lo.view(q.shape))


def resolve_dbias_mode(mode: str, cfg: dict) -> str:
    """"auto": deterministic under ``torch.use_deterministic_algorithms(True)``, else the tuned table's choice
    for the shape bucket (atomic where it measured > 10% faster), else deterministic."""
    if mode == "auto":
        mode = ("deterministic" if torch.are_deterministic_algorithms_enabled()
                else cfg.get("dbias_mode", DEFAULT_DBIAS_MODE))
    if mode not in DBIAS_MODES:
        raise ValueError(f"evo_attention: dbias_mode must be 'auto' or one of {DBIAS_MODES}, got {mode!r}")
    return mode


def _as5(t: Tensor | None, P: Problem) -> Tensor | None:
    """A saved output (or residual) of q's shape as ``[B, S, L_q, H, D]``; None if absent or not a view
    with a contiguous last dim (delta then comes from the key sweep)."""
    if t is None or t.numel() == 0 or t.stride(-1) != 1:
        return None
    try:
        return t.view(P.B, P.S, P.LQ, P.H, P.D)
    except RuntimeError:
        return None


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None,
             out: Tensor | None, out_lo: Tensor | None, lse: Tensor, scale: float, need_dbias: bool,
             dbias_mode: str = "auto", config_override: dict | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``dq, dk, dv`` (contiguous, shapes and dtypes of q, k, v) and ``dbias`` (bias's shape and dtype)
    or None. ``out``, ``out_lo``, ``lse``: as :func:`forward` returned them. ``dbias_mode``:
    "deterministic", "atomic" or "auto" (the tuned table's choice)."""
    P = Problem(q, k, v, bias, mask, scale)
    cfg = config_override or config(q.device, P.LQ, P.LK, P.D, P.B * P.S)
    if do.stride(-1) != 1:
        do = do.contiguous()
    do5 = do.reshape(P.B, P.S, P.LQ, P.H, P.D)
    lse5 = lse.reshape(P.B, P.S, P.H, 2, P.LQ)
    o5, lo5 = _as5(out, P), _as5(out_lo, P)
    if o5 is not None and lo5 is not None and lo5.stride() != o5.stride():
        lo5 = None
    dq, delta = run_dq(P, do5, o5, lo5, lse5, cfg["dq"])
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
