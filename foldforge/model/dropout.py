"""Residual add with AF2's shared dropout (AF2 Suppl. 1.11.6, Alg. 6 "DropoutRowwise/Columnwise")."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from foldforge import kernels as ops


class DropoutResidual(nn.Module):
    """``x + dropout(update)`` in training, ``x + update`` in eval; the mask is shared along
    ``shared_dim`` (-3 row-wise: MSA row attention, triangle multiplications, starting-node triangle
    attention; -2 column-wise: ending-node triangle attention; None: independent)."""

    def __init__(self, p: float, shared_dim: int | None, impl: str = "reference"):
        super().__init__()
        self.impl = ops.validate_impl(impl)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p
        self.shared_dim = shared_dim

    def forward(self, x: Tensor, update: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return ops.bias_dropout_residual(x, update, p=self.p, shared_dim=self.shared_dim,
                                         training=self.training, generator=generator, impl=self.impl)

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dim={self.shared_dim}, impl={self.impl!r}"
