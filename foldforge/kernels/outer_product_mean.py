"""Outer product mean, AF2 Suppl. Alg. 10: the MSA -> pair communication.

    x = LayerNorm(m);  a = mask * (x W_1 + b_1),  b = mask * (x W_2 + b_2)           [*, S, L, C]
    update_ij = (flatten(sum_s a_si (x) b_sj) W_out + b_out) / (n_ij + eps)         [*, L, L, c_z]

with ``n_ij`` the number of MSA rows where both i and j are unmasked and eps = 1e-3. As in AF2 and
OpenFold the division comes after the output projection, so the output bias is divided too.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from foldforge.kernels import _dispatch
from foldforge.kernels._utils import acc_dtype, chunk_slices, linear
from foldforge.kernels.layer_norm import layer_norm_reference


class OPMParams(NamedTuple):
    """Weights in nn.Linear layout ([out, in]); names match OpenFold's OuterProductMean."""
    layer_norm_weight: Tensor    # [c_m]
    layer_norm_bias: Tensor
    linear_1_weight: Tensor      # [C, c_m]
    linear_1_bias: Tensor
    linear_2_weight: Tensor      # [C, c_m]
    linear_2_bias: Tensor
    linear_out_weight: Tensor    # [c_z, C * C], input index c * C + d for a_c b_d
    linear_out_bias: Tensor


def outer_product_mean_reference(m: Tensor, mask: Tensor | None, params: OPMParams, *, eps: float = 1e-3,
                                 ln_eps: float = 1e-5, chunk_size: int | None = None) -> Tensor:
    """Readable eager outer product mean.

    Args:
        m: MSA representation ``[*, S, L, c_m]``.
        mask: MSA mask ``[*, S, L]`` (bool or 0/1 float) or None.
        chunk_size: number of residues i per chunk of the ``[*, L, L, C * C]`` intermediate.
    Returns:
        pair update ``[*, L, L, c_z]`` in m's dtype.
    """
    p = params
    x = layer_norm_reference(m, p.layer_norm_weight, p.layer_norm_bias, ln_eps)
    if mask is None:
        mask = x.new_ones(x.shape[:-1])
    mask = mask.to(x.dtype)
    a = linear(x, p.linear_1_weight, p.linear_1_bias) * mask[..., None]   # [*, S, L, C]
    b = linear(x, p.linear_2_weight, p.linear_2_bias) * mask[..., None]   # [*, S, L, C]
    rows = []
    for sl in chunk_slices(a.shape[-2], chunk_size):
        outer = torch.einsum("...sic,...sjd->...ijcd", a[..., sl, :], b)  # [*, Li, L, C, C]
        outer = outer.flatten(-2)                                            # [*, Li, L, C * C]
        rows.append(linear(outer, p.linear_out_weight, p.linear_out_bias))
    out = torch.cat(rows, dim=-3)                                            # [*, L, L, c_z]
    # Row-pair counts in fp32: bf16 holds integers exactly only up to 256, and N_extra is 1024+.
    acc = acc_dtype(m.dtype)
    mask = mask.to(acc)
    norm = torch.einsum("...si,...sj->...ij", mask, mask)[..., None]      # [*, L, L, 1]
    return (out.to(acc) / (norm + eps)).to(m.dtype)


def supports(m: Tensor, mask: Tensor | None, params: OPMParams) -> bool:
    """Whether the Triton kernel handles these inputs. False until the kernel lands."""
    return False


def outer_product_mean(m: Tensor, mask: Tensor | None, params: OPMParams, *, eps: float = 1e-3,
                       chunk_size: int | None = None, impl: str = "reference") -> Tensor:
    """AF2 Suppl. Alg. 10 pair update; see :func:`outer_product_mean_reference`."""
    _dispatch.resolve("outer_product_mean", impl, lambda: supports(m, mask, params))
    return outer_product_mean_reference(m, mask, params, eps=eps, chunk_size=chunk_size)
