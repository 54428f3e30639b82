"""Outer product mean (AF2 Suppl. Alg. 10): the MSA -> pair update of every Evoformer block."""
from __future__ import annotations

from torch import Tensor, nn

from foldforge import kernels as ops
from foldforge.config import KernelConfig
from foldforge.model.primitives import LayerNorm, Linear, gather_params


class OuterProductMean(nn.Module):
    """LayerNorm -> two ``c_m -> c_hidden`` projections -> masked mean over MSA rows of their outer
    product -> ``c_hidden^2 -> c_z``. Layout as OpenFold's ``OuterProductMean``; the computation is one
    :func:`kernels.outer_product_mean` call (normalised by the unmasked row-pair count + 1e-3)."""

    def __init__(self, c_m: int, c_z: int, c_hidden: int, kernels: KernelConfig, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.impl = ops.validate_impl(kernels.outer_product_mean)
        # weights only: the kernel applies the LayerNorm inside the fused op
        self.layer_norm = LayerNorm(c_m)
        self.linear_1 = Linear(c_m, c_hidden)
        self.linear_2 = Linear(c_m, c_hidden)
        self.linear_out = Linear(c_hidden * c_hidden, c_z, init="final")

    def forward(self, m: Tensor, msa_mask: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
        """m ``[*, S, L, c_m]``, msa_mask ``[*, S, L]`` -> pair update ``[*, L, L, c_z]``.

        ``chunk_size`` bounds the ``[*, chunk, L, c_hidden^2]`` intermediate (inference memory).
        """
        params = gather_params(self, ops.OPMParams)
        return ops.outer_product_mean(m, msa_mask, params, eps=self.eps, chunk_size=chunk_size, impl=self.impl)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
