"""MSA-stack attention blocks: row attention with pair bias (AF2 Suppl. Alg. 7), column attention
(Alg. 8) and the extra-MSA stack's global column attention (Alg. 19).

Each returns the update (no residual; dropout and the residual add belong to the stack). Parameter
layout as OpenFold's ``MSAAttention`` / ``MSAColumnGlobalAttention``; the column attention owns
``layer_norm_m`` and ``mha`` directly (OpenFold nests them under ``_msa_att``).
"""
from __future__ import annotations

from torch import Tensor, nn

from foldforge import kernels as ops
from foldforge.config import KernelConfig
from foldforge.model.attention import Attention, GlobalAttention
from foldforge.model.primitives import LayerNorm, Linear


def _attention(c: int, c_hidden: int, num_heads: int, kc: KernelConfig) -> Attention:
    return Attention(c, c, c_hidden, num_heads, impl=kc.attention, gated_output_impl=kc.gated_output)


class MSARowAttentionWithPairBias(nn.Module):
    """AF2 Suppl. Alg. 7: gated self-attention along each MSA row, biased by the pair representation."""

    def __init__(self, c_m: int, c_z: int, c_hidden: int, num_heads: int, kernels: KernelConfig):
        super().__init__()
        self.layer_norm_m = LayerNorm(c_m, impl=kernels.layer_norm)
        self.layer_norm_z = LayerNorm(c_z, impl=kernels.layer_norm)
        self.linear_z = Linear(c_z, num_heads, bias=False, init="normal")
        self.mha = _attention(c_m, c_hidden, num_heads, kernels)

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor | None = None,
                chunk_size: int | None = None) -> Tensor:
        """m ``[*, S, L, c_m]``, z ``[*, L, L, c_z]``, msa_mask ``[*, S, L]`` -> update ``[*, S, L, c_m]``."""
        ln = self.layer_norm_z
        # LayerNorm(z) feeds only this projection, so it goes through the fused ln_linear op.
        bias = ops.ln_linear(z, ln.weight, ln.bias, self.linear_z.weight, None, eps=ln.eps,
                                 impl=ln.impl)                  # [*, L, L, H]
        bias = bias.movedim(-1, -3).unsqueeze(-4)              # [*, 1, H, L, L]
        return self.mha.forward_layer_norm(m, self.layer_norm_m, mask=msa_mask, chunk_size=chunk_size,
                                           bias_from_extra=lambda: bias)


class MSAColumnAttention(nn.Module):
    """AF2 Suppl. Alg. 8: gated self-attention along each MSA column (over sequences)."""

    def __init__(self, c_m: int, c_hidden: int, num_heads: int, kernels: KernelConfig):
        super().__init__()
        self.layer_norm_m = LayerNorm(c_m, impl=kernels.layer_norm)
        self.mha = _attention(c_m, c_hidden, num_heads, kernels)

    def forward(self, m: Tensor, msa_mask: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
        """m ``[*, S, L, c_m]``, msa_mask ``[*, S, L]`` -> update ``[*, S, L, c_m]``."""
        mask = None if msa_mask is None else msa_mask.transpose(-1, -2)   # [*, L, S]
        out = self.mha.forward_layer_norm(m.transpose(-2, -3), self.layer_norm_m, mask=mask,
                                          chunk_size=chunk_size)              # [*, L, S, c_m]
        return out.transpose(-2, -3)                                  # [*, S, L, c_m]


class MSAColumnGlobalAttention(nn.Module):
    """AF2 Suppl. Alg. 19: global column attention of the extra-MSA stack."""

    def __init__(self, c_m: int, c_hidden: int, num_heads: int, kernels: KernelConfig):
        super().__init__()
        self.layer_norm_m = LayerNorm(c_m, impl=kernels.layer_norm)
        self.global_attention = GlobalAttention(c_m, c_hidden, num_heads, impl=kernels.attention,
                                                gated_output_impl=kernels.gated_output)

    def forward(self, m: Tensor, msa_mask: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
        """m ``[*, S, L, c_m]``, msa_mask ``[*, S, L]`` -> update ``[*, S, L, c_m]``."""
        x = self.layer_norm_m(m.transpose(-2, -3))                    # [*, L, S, c_m]
        mask = None if msa_mask is None else msa_mask.transpose(-1, -2)   # [*, L, S]
        out = self.global_attention(x, mask, chunk_size=chunk_size)
        return out.transpose(-2, -3)                                  # [*, S, L, c_m]
