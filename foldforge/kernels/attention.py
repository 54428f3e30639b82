"""Attention with a shared pair bias and a key mask: the core of AF2 Suppl. Alg. 7, 8, 13, 14.

One call attends, for every row ``s`` of ``S`` independent rows (MSA rows, or pair-matrix rows in
triangle attention), queries ``[L_q]`` to keys ``[L_k]`` with a bias shared by all rows::

    o[s, i, h] = sum_j softmax_j(scale * q[s, i, h] . k[s, j, h] + bias[h, i, j] | mask[s, j]) v[s, j, h]

Masked keys get a logit of -1e9 in fp32 and a probability of exactly 0, so a fully masked row
gives an output of 0 (not the mean of ``v``, which is what a bias-only mask would give) and finite
gradients. Padding rows are common in AF2 crops and the Triton kernel produces the same zeros.

``impl="triton"`` runs :mod:`foldforge.kernels._attention_triton` (online softmax, no ``L x L`` tensor in
memory) through two ``torch.library`` custom ops (forward, backward) joined by ``register_autograd``, so
``torch.compile(fullgraph=True)`` keeps them as opaque nodes; eager calls go through a lighter
``torch.autograd.Function``. Saved for backward: q, k, v, bias, mask, the per-row log-sum-exp (8 bytes
per query row and head) and, for 16-bit inputs, the output (usually kept by the next op anyway: the gate
multiply) with its rounding residual (the size of the output, written only when gradients are wanted), from
which the backward sums ``delta = dO . O`` to ~16 bits without a second sweep over the keys (see
:mod:`foldforge.kernels._attention_triton`). The output must then not be modified in place before backward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from foldforge.kernels import _dispatch, _launch
from foldforge.kernels._utils import acc_dtype, check_bool_mask, chunk_slices

MAX_HEAD_DIM = 64        # the Triton path holds a [BLOCK, next_pow2(D)] tile of q, k, v and dO in registers
DBIAS_MODES = ("auto", "deterministic", "atomic")

_MASK_LOGIT = -1e9   # fp32 logit of a masked key; exp(-1e9 - max) == 0 in fp32


def evo_attention_reference(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None,
                            mask: Tensor | None = None, *, scale: float | None = None) -> Tensor:
    """Readable eager attention (the baseline in ablations); see the module docstring.

    Matmuls run in the input dtype (as an eager bf16 model would run them); logits, bias, mask and
    softmax are in fp32 (fp64 for fp64 inputs).

    Args:
        q: ``[*, S, L_q, H, D]``; k, v: ``[*, S, L_k, H, D]``.
        bias: broadcastable to ``[*, S, H, L_q, L_k]``, usually ``[*, 1, H, L_q, L_k]``; or None.
        mask: bool, broadcastable to ``[*, S, L_k]``; True = attend; or None.
        scale: logit scale, default ``1 / sqrt(D)``.
    Returns:
        ``[*, S, L_q, H, D]`` in q's dtype.
    """
    check_bool_mask(mask, "evo_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = acc_dtype(q.dtype)
    qh = q.transpose(-2, -3)                     # [*, S, H, L_q, D]
    kt = k.transpose(-2, -3).transpose(-1, -2)   # [*, S, H, D, L_k]
    vh = v.transpose(-2, -3)                     # [*, S, H, L_k, D]
    logits = torch.matmul(qh, kt).to(acc) * scale   # [*, S, H, L_q, L_k]
    if bias is not None:
        logits = logits + bias.to(acc)
    if mask is not None:
        keep = mask[..., None, None, :]          # [*, S, 1, 1, L_k]
        logits = logits.masked_fill(~keep, _MASK_LOGIT)
    probs = torch.softmax(logits, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~keep, 0.0)    # fully masked rows: uniform -> 0
    out = torch.matmul(probs.to(v.dtype), vh)   # [*, S, H, L_q, D]
    return out.transpose(-2, -3).to(q.dtype)     # [*, S, L_q, H, D]


def _batch_broadcast_ok(lead: tuple[int, ...], batch: tuple[int, ...]) -> bool:
    """Leading (batch) dims of a bias or mask, left-padded to q's: all 1 or all equal to q's."""
    lead = (1,) * (len(batch) - len(lead)) + tuple(lead)
    return len(lead) == len(batch) and (all(n == 1 for n in lead) or lead == tuple(batch))


def supports(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, mask: Tensor | None = None) -> bool:
    """Whether the Triton kernels handle these inputs: CUDA tensors (or CPU under ``TRITON_INTERPRET=1``)
    on one device; q, k, v fp16/bf16/fp32 of one dtype, ``[*, S, L, H, D]`` with ``1 <= D <= 64``, equal
    leading dims and last dim contiguous; bias fp16/bf16/fp32 ``[*, S|1, H, L_q, L_k]`` (any strides) whose
    batch dims are all 1 or all equal to q's; mask bool ``[*, S|1, L_k]`` likewise; no empty dims."""
    if q.dim() < 4 or k.dim() != q.dim() or v.shape != k.shape:
        return False
    if q.dtype not in _launch.TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[:-3] != k.shape[:-3] or q.shape[-2:] != k.shape[-2:] or not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return False
    if q.numel() == 0 or k.numel() == 0:
        return False
    if any(t.stride(-1) != 1 and t.shape[-1] != 1 for t in (q, k, v)):
        return False
    if not _launch.device_ok(q) or k.device != q.device or v.device != q.device:
        return False
    *batch, s, lq, h, _ = q.shape
    lk = k.shape[-3]
    if bias is not None:
        if bias.dtype not in _launch.TRITON_DTYPES or bias.device != q.device or not 3 <= bias.dim() <= q.dim():
            return False
        if tuple(bias.shape[-3:]) != (h, lq, lk):
            return False
        if bias.dim() >= 4 and bias.shape[-4] not in (1, s):
            return False
        if not _batch_broadcast_ok(tuple(bias.shape[:-4]), tuple(batch)):
            return False
    if mask is not None:
        if mask.dtype != torch.bool or mask.device != q.device or not 1 <= mask.dim() <= q.dim() - 2:
            return False
        if mask.shape[-1] != lk or (mask.dim() >= 2 and mask.shape[-2] not in (1, s)):
            return False
        if not _batch_broadcast_ok(tuple(mask.shape[:-2]), tuple(batch)):
            return False
    return _launch.triton_available()


def _kernels():
    from foldforge.kernels import _attention_triton   # lazy: Triton only on the first launch
    return _attention_triton


# ---------------------------------------------------------------- custom ops (forward, backward)
@torch.library.custom_op("foldforge::evo_attention_fwd", mutates_args=())
def _attn_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None,
              scale: float, store_lo: bool) -> tuple[Tensor, Tensor, Tensor]:
    out, lse, out_lo = _kernels().forward(q, k, v, bias, mask, scale, store_lo=store_lo)
    return out, lse, (out_lo if out_lo is not None else q.new_empty(0))   # custom ops return no None


def _stores_lo(q: Tensor, store_lo: bool) -> bool:
    """Whether the forward keeps the output's rounding residual: 16-bit inputs whose gradients are wanted."""
    return store_lo and q.dtype != torch.float32


@_attn_fwd.register_fake
def _(q, k, v, bias, mask, scale, store_lo):
    lo = q.new_empty(q.shape) if _stores_lo(q, store_lo) else q.new_empty(0)
    return q.new_empty(q.shape), q.new_empty((*q.shape[:-3], q.shape[-2], 2, q.shape[-3]), dtype=torch.float32), lo


@torch.library.custom_op("foldforge::evo_attention_bwd", mutates_args=())
def _attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None,
              out: Tensor | None, out_lo: Tensor | None, lse: Tensor, scale: float, need_dbias: bool,
              dbias_mode: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, db = _kernels().backward(do, q, k, v, bias, mask, out, out_lo, lse, scale, need_dbias, dbias_mode)
    return dq, dk, dv, (db if db is not None else q.new_empty(0))   # custom ops return no None


@_attn_bwd.register_fake
def _(do, q, k, v, bias, mask, out, out_lo, lse, scale, need_dbias, dbias_mode):
    db = bias.new_empty(bias.shape) if need_dbias and bias is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db


def _save(ctx, q, k, v, bias, mask, scale, dbias_mode, out, lse, out_lo, has_lo):
    """What backward needs. Without the residual (fp32 inputs) the output is not kept: the backward sums
    delta by a sweep over the keys instead."""
    if not has_lo:
        out = out_lo = None
    ctx.save_for_backward(q, k, v, bias, mask, out, out_lo, lse)
    ctx.scale = scale
    ctx.dbias_mode = dbias_mode


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale, store_lo = inputs
    out, lse, out_lo = output
    _save(ctx, q, k, v, bias, mask, scale, "auto", out, lse, out_lo, _stores_lo(q, store_lo))


def _backward(ctx, dout, _dlse, _dlo):
    q, k, v, bias, mask, out, out_lo, lse = ctx.saved_tensors
    need_db = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, db = _attn_bwd(dout, q, k, v, bias, mask, out, out_lo, lse, ctx.scale, need_db, ctx.dbias_mode)
    return dq, dk, dv, (db if need_db else None), None, None, None


_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def _wants_grad(*tensors: Tensor | None) -> bool:
    """Whether a backward can follow (the forward then stores the output's residual)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _EvoAttentionEager(torch.autograd.Function):
    """Eager calls: the same launchers and saved tensors as the custom ops, without the custom-op
    dispatcher's host time (see layer_norm.py: ~25 us a call, which bounds the small AF3 single-attention
    shapes)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, dbias_mode, store_lo):
        out, lse, out_lo = _kernels().forward(q, k, v, bias, mask, scale, store_lo=store_lo)
        _save(ctx, q, k, v, bias, mask, scale, dbias_mode, out, lse, out_lo, out_lo is not None)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, bias, mask, out, out_lo, lse = ctx.saved_tensors
        need_db = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, db = _kernels().backward(dout, q, k, v, bias, mask, out, out_lo, lse, ctx.scale, need_db,
                                             ctx.dbias_mode)
        return dq, dk, dv, db, None, None, None, None


def evo_attention_triton(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, mask: Tensor | None = None,
                         *, scale: float | None = None, dbias_mode: str = "auto") -> Tensor:
    """The Triton path without dispatch (callers have checked :func:`supports`). Under torch.compile the
    custom ops (opaque graph nodes, bias gradient mode from the tuned table); in eager the autograd
    Function. ``dbias_mode``: "auto" (deterministic under ``torch.use_deterministic_algorithms(True)``,
    else the tuned table's choice for the shape, else deterministic),
    "deterministic" (a separate reduction kernel, bitwise reproducible) or "atomic" (fp32 atomics)."""
    if dbias_mode not in DBIAS_MODES:
        raise ValueError(f"evo_attention: dbias_mode must be one of {DBIAS_MODES}, got {dbias_mode!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():
        if dbias_mode != "auto":
            raise ValueError("evo_attention: under torch.compile the bias gradient mode comes from the tuned "
                             "table (dbias_mode='auto')")
        return _attn_fwd(q, k, v, bias, mask, scale, _wants_grad(q, k, v, bias))[0]
    return _EvoAttentionEager.apply(q, k, v, bias, mask, scale, dbias_mode, _wants_grad(q, k, v, bias))[0]


def evo_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, mask: Tensor | None = None,
                  *, scale: float | None = None, chunk_size: int | None = None,
                  impl: str = "reference", dbias_mode: str = "auto") -> Tensor:
    """Gated-attention core with pair bias and key mask (AF2 Suppl. Alg. 7 lines 5-6).

    Shapes as :func:`evo_attention_reference`. ``chunk_size`` processes the ``S`` rows in chunks
    (inference memory: the ``[*, S, H, L_q, L_k]`` logits are the largest tensor of the Evoformer).
    ``impl``: "reference", "auto" (Triton where :func:`supports` accepts the inputs) or "triton".
    ``dbias_mode`` (Triton path only): how the bias gradient is summed over the rows sharing the bias, see
    :func:`evo_attention_triton`.
    """
    if q.dim() < 4:
        raise ValueError(f"evo_attention: q must be [*, S, L, H, D], got shape {tuple(q.shape)}")
    check_bool_mask(mask, "evo_attention")
    if _dispatch.resolve("evo_attention", impl, lambda: supports(q, k, v, bias, mask)) == "triton":
        def fn(q, k, v, b, m, scale):
            return evo_attention_triton(q, k, v, b, m, scale=scale, dbias_mode=dbias_mode)
    else:
        fn = evo_attention_reference
    n_rows = q.shape[-4]
    slices = chunk_slices(n_rows, chunk_size)
    if len(slices) == 1:
        return fn(q, k, v, bias, mask, scale=scale)
    if bias is not None:   # left-pad to [*, S|1, H, L_q, L_k] so dim -4 is the row dim
        bias = bias.reshape((1,) * (q.dim() - bias.dim()) + tuple(bias.shape))
    if mask is not None:   # left-pad to [*, S|1, L_k]
        mask = mask.reshape((1,) * (q.dim() - 2 - mask.dim()) + tuple(mask.shape))
    outs = []
    for sl in slices:
        b = bias if bias is None or bias.shape[-4] == 1 else bias[..., sl, :, :, :]
        m = mask if mask is None or mask.shape[-2] == 1 else mask[..., sl, :]
        outs.append(fn(q[..., sl, :, :, :], k[..., sl, :, :, :], v[..., sl, :, :, :], b, m, scale=scale))
    return torch.cat(outs, dim=-4)
