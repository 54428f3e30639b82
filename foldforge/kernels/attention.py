"""Attention with a shared pair bias and a key mask: the core of AF2 Suppl. Alg. 7, 8, 13, 14.

One call attends, for every row ``s`` of ``S`` independent rows (MSA rows, or pair-matrix rows in
triangle attention), queries ``[L_q]`` to keys ``[L_k]`` with a bias shared by all rows::

    o[s, i, h] = sum_j softmax_j(scale * q[s, i, h] . k[s, j, h] + bias[h, i, j] | mask[s, j]) v[s, j, h]

Masked keys get a logit of -1e9 in fp32 and a probability of exactly 0, so a fully masked row
gives an output of 0 (not the mean of ``v``, which is what a bias-only mask would give) and finite
gradients. Padding rows are common in AF2 crops and the Triton kernel must produce the same zeros.
"""
from __future__ import annotations

import torch
from torch import Tensor

from foldforge.kernels import _dispatch
from foldforge.kernels._utils import acc_dtype, check_bool_mask, chunk_slices

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


def supports(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, mask: Tensor | None = None) -> bool:
    """Whether the Triton kernel handles these inputs. False until the kernel lands."""
    return False


def evo_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, mask: Tensor | None = None,
                  *, scale: float | None = None, chunk_size: int | None = None,
                  impl: str = "reference") -> Tensor:
    """Gated-attention core with pair bias and key mask (AF2 Suppl. Alg. 7 lines 5-6).

    Shapes as :func:`evo_attention_reference`. ``chunk_size`` processes the ``S`` rows in chunks
    (inference memory: the ``[*, S, H, L_q, L_k]`` logits are the largest tensor of the Evoformer).
    ``impl``: "reference", "auto" (Triton where :func:`supports` accepts the inputs) or "triton".
    """
    if q.dim() < 4:
        raise ValueError(f"evo_attention: q must be [*, S, L, H, D], got shape {tuple(q.shape)}")
    _dispatch.resolve("evo_attention", impl, lambda: supports(q, k, v, bias, mask))
    # supports() is False until the Triton kernel lands, so the reference is the only path here.
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
