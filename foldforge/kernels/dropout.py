"""Residual add with shared dropout: ``x + dropout(update)`` (AF2 Suppl. 1.11.6).

AF2 shares one dropout mask along a whole axis: "row-wise" dropout (MSA row attention, triangle
multiplication, starting-node triangle attention) uses one mask for all rows, i.e. the mask has size 1
along dim -3; "column-wise" (ending-node triangle attention) has size 1 along dim -2.
"""
from __future__ import annotations

import torch
from torch import Tensor


def bias_dropout_residual(x: Tensor, update: Tensor, *, p: float, shared_dim: int | None, training: bool,
                          generator: torch.Generator | None = None) -> Tensor:
    """``x + update * keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)`` broadcast along ``shared_dim``.

    Args:
        x, update: same shape ``[*, R, C_ax, C]``.
        p: drop probability in [0, 1].
        shared_dim: dim along which the mask is shared (-3 row-wise, -2 column-wise), or None for
            independent elements.
        training: no dropout when False (and when p == 0).
        generator: torch.Generator on ``update``'s device, for reproducible masks.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x + update
    shape = list(update.shape)
    if shared_dim is not None:
        shape[shared_dim] = 1
    keep = torch.rand(shape, generator=generator, device=update.device) >= p   # [*, 1 on shared_dim, ...]
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    return x + update * (keep.to(update.dtype) * scale)
