"""Global (multi-query) attention of the extra-MSA stack: AF2 Suppl. Alg. 19 lines 3-7.

For every residue column, one averaged query per head attends over the ``S`` sequences; keys and
values have a single head shared by all query heads. The mask-mean of the query and the gating stay
in the module (:class:`foldforge.model.attention.GlobalAttention`); the kernel is the softmax part,
which is where a fused kernel would save memory traffic over ``S`` (1024-5120 extra-MSA rows).
"""
from __future__ import annotations

import torch
from torch import Tensor

from foldforge.kernels import _dispatch
from foldforge.kernels._utils import acc_dtype, check_bool_mask, chunk_slices

_MASK_LOGIT = -1e9


def global_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
                               scale: float | None = None) -> Tensor:
    """Readable eager global attention.

    Args:
        q: ``[*, H, D]`` (one query per head, e.g. ``*`` = ``[B, N_res]``).
        k, v: ``[*, S, D]`` (shared by all heads).
        mask: bool ``[*, S]``, True = attend; a fully masked column gives 0.
        scale: default ``1 / sqrt(D)``.
    Returns:
        ``[*, H, D]`` in q's dtype.
    """
    check_bool_mask(mask, "global_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = acc_dtype(q.dtype)
    logits = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale   # [*, H, S]
    if mask is not None:
        keep = mask[..., None, :]                                    # [*, 1, S]
        logits = logits.masked_fill(~keep, _MASK_LOGIT)
    probs = torch.softmax(logits, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~keep, 0.0)
    return torch.matmul(probs.to(v.dtype), v).to(q.dtype)           # [*, H, D]


def supports(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> bool:
    """Whether the Triton kernel handles these inputs. False until the kernel lands."""
    return False


def global_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *,
                     scale: float | None = None, chunk_size: int | None = None,
                     impl: str = "reference") -> Tensor:
    """AF2 Suppl. Alg. 19 attention core; shapes as :func:`global_attention_reference`.

    ``chunk_size`` chunks the last batch dim (the residue columns, dim -3 of q).
    """
    if q.dim() < 3:
        raise ValueError(f"global_attention: q must be [*, N, H, D], got shape {tuple(q.shape)}")
    _dispatch.resolve("global_attention", impl, lambda: supports(q, k, v, mask))
    slices = chunk_slices(q.shape[-3], chunk_size)
    if len(slices) == 1:
        return global_attention_reference(q, k, v, mask, scale=scale)
    outs = [global_attention_reference(q[..., sl, :, :], k[..., sl, :, :], v[..., sl, :, :],
                                       None if mask is None else mask[..., sl, :], scale=scale)
            for sl in slices]
    return torch.cat(outs, dim=-3)
