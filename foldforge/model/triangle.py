"""Triangle updates of the pair representation: multiplicative (AF2 Suppl. Alg. 11/12) and
attention around the starting / ending node (Alg. 13/14). Both return the update (no residual).

Parameter layout as OpenFold's ``TriangleMultiplicativeUpdate`` and ``TriangleAttention``.
"""
from __future__ import annotations

from torch import Tensor, nn

from foldforge import kernels as ops
from foldforge.config import KernelConfig
from foldforge.model.attention import Attention
from foldforge.model.primitives import LayerNorm, Linear, bool_mask, gather_params

DIRECTIONS = ("outgoing", "incoming")
NODES = ("starting", "ending")


class TriangleMultiplication(nn.Module):
    """AF2 Suppl. Alg. 11 ("outgoing": t_ij = sum_k a_ik b_jk) and Alg. 12 ("incoming": sum_k a_ki b_kj).

    ``c_hidden`` is the width of the a/b projections (128 in AF2's Evoformer, 64 in the template stack).
    The whole update is one :func:`kernels.triangle_multiplication` call with this module's weights.
    """

    def __init__(self, c_z: int, c_hidden: int, direction: str, kernels: KernelConfig):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.direction = direction
        self.impl = ops.validate_impl(kernels.triangle_mult)
        # the LayerNorms hold weights only: the kernel applies them inside the fused op
        self.layer_norm_in = LayerNorm(c_z)
        self.linear_a_p = Linear(c_z, c_hidden)
        self.linear_a_g = Linear(c_z, c_hidden, init="gating")
        self.linear_b_p = Linear(c_z, c_hidden)
        self.linear_b_g = Linear(c_z, c_hidden, init="gating")
        self.linear_g = Linear(c_z, c_z, init="gating")
        self.layer_norm_out = LayerNorm(c_hidden)
        self.linear_z = Linear(c_hidden, c_z, init="final")

    def forward(self, z: Tensor, pair_mask: Tensor | None = None) -> Tensor:
        """z ``[*, L, L, c_z]``, pair_mask ``[*, L, L]`` -> update ``[*, L, L, c_z]``."""
        params = gather_params(self, ops.TriMulParams)
        return ops.triangle_multiplication(z, pair_mask, params, direction=self.direction,
                                           eps=self.layer_norm_in.eps, impl=self.impl)

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, impl={self.impl!r}"


class TriangleAttention(nn.Module):
    """AF2 Suppl. Alg. 13 (around the starting node) and Alg. 14 (ending node).

    Starting node: row i of the pair matrix attends over k, ``q_ij . k_ik + b_jk``, keys masked by
    ``pair_mask[i, k]``. The ending node is the starting node applied to the transposed pair
    representation (and mask), transposed back.
    """

    def __init__(self, c_z: int, c_hidden: int, num_heads: int, node: str, kernels: KernelConfig):
        super().__init__()
        if node not in NODES:
            raise ValueError(f"node must be one of {NODES}, got {node!r}")
        self.node = node
        self.layer_norm = LayerNorm(c_z, impl=kernels.layer_norm)
        self.linear = Linear(c_z, num_heads, bias=False, init="normal")
        self.mha = Attention(c_z, c_z, c_hidden, num_heads, impl=kernels.attention,
                             gated_output_impl=kernels.gated_output)

    def forward(self, z: Tensor, pair_mask: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
        """z ``[*, L, L, c_z]``, pair_mask ``[*, L, L]`` -> update ``[*, L, L, c_z]``.

        ``chunk_size`` chunks the rows i of the attention core.
        """
        if self.node == "ending":
            z = z.transpose(-2, -3)
            pair_mask = None if pair_mask is None else pair_mask.transpose(-1, -2)
        out = self.mha.forward_layer_norm(
            z, self.layer_norm, extra=(self.linear,), mask=bool_mask(pair_mask), chunk_size=chunk_size,
            bias_from_extra=lambda b: b.movedim(-1, -3).unsqueeze(-4))    # [*, L, L, H] -> [*, 1, H, L, L]
        return out.transpose(-2, -3) if self.node == "ending" else out

    def extra_repr(self) -> str:
        return f"node={self.node!r}"
