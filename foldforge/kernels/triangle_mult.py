"""Triangular multiplicative update, AF2 Suppl. Alg. 11 ("outgoing") and Alg. 12 ("incoming").

    x = LayerNorm(z)
    a = mask * sigmoid(x W_ag) * (x W_ap),  b = mask * sigmoid(x W_bg) * (x W_bp)      [*, L, L, C]
    outgoing: t_ij = sum_k a_ik b_jk      incoming: t_ij = sum_k a_ki b_kj
    update = sigmoid(x W_g) * (LayerNorm(t) W_z)

The contraction over k runs in fp32 (as OpenFold does under bf16: the sum of L = 256-384 products of
O(1) gated values overflows fp16 and loses digits in bf16).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from foldforge.kernels import _dispatch
from foldforge.kernels._utils import acc_dtype, linear
from foldforge.kernels.layer_norm import layer_norm_reference

DIRECTIONS = ("outgoing", "incoming")


class TriMulParams(NamedTuple):
    """Weights in nn.Linear layout ([out, in]); names match OpenFold's TriangleMultiplicativeUpdate."""
    layer_norm_in_weight: Tensor     # [c_z]
    layer_norm_in_bias: Tensor
    linear_a_p_weight: Tensor        # [C, c_z]
    linear_a_p_bias: Tensor
    linear_a_g_weight: Tensor        # [C, c_z]
    linear_a_g_bias: Tensor
    linear_b_p_weight: Tensor
    linear_b_p_bias: Tensor
    linear_b_g_weight: Tensor
    linear_b_g_bias: Tensor
    linear_g_weight: Tensor          # [c_z, c_z]
    linear_g_bias: Tensor
    layer_norm_out_weight: Tensor    # [C]
    layer_norm_out_bias: Tensor
    linear_z_weight: Tensor          # [c_z, C]
    linear_z_bias: Tensor


def triangle_multiplication_reference(z: Tensor, mask: Tensor | None, params: TriMulParams, *,
                                      direction: str = "outgoing", eps: float = 1e-5) -> Tensor:
    """Readable eager triangle multiplication.

    Args:
        z: pair representation ``[*, L, L, c_z]``.
        mask: pair mask ``[*, L, L]`` (bool or 0/1 float) or None.
        params: :class:`TriMulParams`.
        direction: "outgoing" (Alg. 11) or "incoming" (Alg. 12).
    Returns:
        the update ``[*, L, L, c_z]`` in z's dtype (no residual).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"triangle_multiplication: direction must be one of {DIRECTIONS}, got {direction!r}")
    p = params
    x = layer_norm_reference(z, p.layer_norm_in_weight, p.layer_norm_in_bias, eps)
    a = torch.sigmoid(linear(x, p.linear_a_g_weight, p.linear_a_g_bias)) * linear(x, p.linear_a_p_weight,
                                                                                   p.linear_a_p_bias)
    b = torch.sigmoid(linear(x, p.linear_b_g_weight, p.linear_b_g_bias)) * linear(x, p.linear_b_p_weight,
                                                                                   p.linear_b_p_bias)
    if mask is not None:
        m = mask.to(x.dtype)[..., None]          # [*, L, L, 1]
        a, b = a * m, b * m
    acc = acc_dtype(z.dtype)
    a, b = a.to(acc), b.to(acc)
    if direction == "outgoing":
        t = torch.einsum("...ikc,...jkc->...ijc", a, b)   # [*, L, L, C]
    else:
        t = torch.einsum("...kic,...kjc->...ijc", a, b)   # [*, L, L, C]
    t = layer_norm_reference(t, p.layer_norm_out_weight, p.layer_norm_out_bias, eps).to(z.dtype)
    gate = torch.sigmoid(linear(x, p.linear_g_weight, p.linear_g_bias))
    return linear(t, p.linear_z_weight, p.linear_z_bias) * gate


def supports(z: Tensor, mask: Tensor | None, params: TriMulParams, direction: str) -> bool:
    """Whether the Triton kernel handles these inputs. False until the kernel lands."""
    return False


def triangle_multiplication(z: Tensor, mask: Tensor | None, params: TriMulParams, *,
                            direction: str = "outgoing", eps: float = 1e-5, impl: str = "reference") -> Tensor:
    """AF2 Suppl. Alg. 11/12 update; see :func:`triangle_multiplication_reference`."""
    _dispatch.resolve("triangle_multiplication", impl, lambda: supports(z, mask, params, direction))
    return triangle_multiplication_reference(z, mask, params, direction=direction, eps=eps)
