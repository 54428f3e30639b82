"""Triangular multiplicative update, AF2 Suppl. Alg. 11 ("outgoing") and Alg. 12 ("incoming").

    x = LayerNorm(z)
    a = mask * sigmoid(x W_ag) * (x W_ap),  b = mask * sigmoid(x W_bg) * (x W_bp)      [*, L, L, C]
    outgoing: t_ij = sum_k a_ik b_jk      incoming: t_ij = sum_k a_ki b_kj
    update = sigmoid(x W_g) * (LayerNorm(t) W_z)

The contraction over k runs in fp32 (as OpenFold does under bf16: the sum of L = 256-384 products of
O(1) gated values overflows fp16 and loses digits in bf16).

``impl="triton"`` runs :mod:`foldforge.kernels._triangle_mult_triton` (LayerNorm + the five input
projections + gating in one kernel writing a/b channel-major, the contraction as a batched GEMM with
fp32 output, LayerNorm + output projection + gate in one kernel; explicit backward) through
``torch.library`` custom ops, so it stays whole under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from foldforge.kernels import _dispatch, _launch
from foldforge.kernels._utils import autocast_input, acc_dtype, linear
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


MAX_C = 256     # c_z and c_hidden: one register tile per row in the Triton kernels


def supports(z: Tensor, mask: Tensor | None, params: TriMulParams, direction: str) -> bool:
    """Whether the Triton path handles these inputs: z ``[*, L, L, c_z]`` (L >= 1) on CUDA (or any device
    under ``TRITON_INTERPRET=1``), fp16/bf16/fp32, ``c_z, C <= 256``, every parameter present with its
    :class:`TriMulParams` shape on z's device, mask None or ``[*, L, L]``."""
    if direction not in DIRECTIONS or z.dim() < 3 or z.dtype not in _launch.TRITON_DTYPES:
        return False
    if z.is_cuda and z.dtype == torch.float32:
        # compiled fp32 (IEEE dots, rounded LN/sigmoid) measured 2-2.5x eager fp32's error on an H200
        # (dlinear_a_p_weight at L=256): outside the three-way rule, so fp32 stays on the reference
        return False
    length, k = z.shape[-2], z.shape[-1]
    if z.shape[-3] != length or z.numel() == 0 or not 1 <= k <= MAX_C or not _launch.device_ok(z):
        return False
    if any(p is None for p in params):
        return False
    c = params.linear_a_p_weight.shape[0]
    if not 1 <= c <= MAX_C:
        return False
    shapes = ((k,), (k,), (c, k), (c,), (c, k), (c,), (c, k), (c,), (c, k), (c,), (k, k), (k,), (c,), (c,),
              (k, c), (k,))
    for p, shape in zip(params, shapes):
        if tuple(p.shape) != shape or p.device != z.device or p.dtype not in _launch.TRITON_DTYPES:
            return False
    if mask is not None and (mask.shape != z.shape[:-1] or mask.device != z.device):
        return False
    return _launch.triton_available()


def _kernels():
    from foldforge.kernels import (
        _triangle_mult_triton,  # lazy: Triton only on the first launch
    )
    return _triangle_mult_triton


# ---------------------------------------------------------------- custom ops (forward, backward)
@torch.library.custom_op("foldforge::triangle_mult_fwd", mutates_args=())
def _fwd(z: Tensor, mask: Tensor | None, params: list[Tensor], outgoing: bool,
         eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels().forward(z, mask, params, outgoing, eps)


@_fwd.register_fake
def _(z, mask, params, outgoing, eps):
    length, k = z.shape[-2], z.shape[-1]
    c = params[2].shape[0]
    nb = z.numel() // (length * length * k)
    m = nb * length * length
    f32 = torch.float32
    cm = (nb * c, length, length)
    return (z.new_empty(z.shape), z.new_empty(m, dtype=f32), z.new_empty(m, dtype=f32), z.new_empty(cm),
            z.new_empty(cm), z.new_empty((m, k)), z.new_empty(cm, dtype=f32), z.new_empty(m, dtype=f32),
            z.new_empty(m, dtype=f32))


@torch.library.custom_op("foldforge::triangle_mult_bwd", mutates_args=())
def _bwd(dy: Tensor, z: Tensor, mask: Tensor | None, params: list[Tensor], saved: list[Tensor],
         outgoing: bool) -> list[Tensor]:
    dz, grads = _kernels().backward(dy, z, mask, params, *saved, outgoing)
    return [dz, *[g.clone() for g in grads]]   # custom ops return no aliased outputs


@_bwd.register_fake
def _(dy, z, mask, params, saved, outgoing):
    return [z.new_empty(z.shape)] + [p.new_empty(p.shape, dtype=torch.float32) for p in params]


def _setup_context(ctx, inputs, output):
    z, mask, params, outgoing, _ = inputs
    ctx.save_for_backward(z, mask, *params, *output[1:])
    ctx.n_params = len(params)
    ctx.outgoing = outgoing


def _unpack(ctx):
    z, mask, *rest = ctx.saved_tensors
    return z, mask, list(rest[:ctx.n_params]), list(rest[ctx.n_params:])


def _backward(ctx, dy, *_saved_grads):
    z, mask, params, saved = _unpack(ctx)
    dz, *grads = _bwd(dy, z, mask, params, saved, ctx.outgoing)
    return dz, None, [g.to(p.dtype) for p, g in zip(params, grads)], None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _TriMulEager(torch.autograd.Function):
    """Eager calls: the same launchers and saved tensors as the custom ops, without the custom-op
    dispatcher's host time (see layer_norm._LayerNormEager)."""

    @staticmethod
    def forward(ctx, z, mask, outgoing, eps, *params):
        out = _kernels().forward(z, mask, list(params), outgoing, eps)
        ctx.save_for_backward(z, mask, *params, *out[1:])
        ctx.n_params = len(params)
        ctx.outgoing = outgoing
        return out[0]

    @staticmethod
    def backward(ctx, dy):
        z, mask, params, saved = _unpack(ctx)
        need = ctx.needs_input_grad
        dz, grads = _kernels().backward(dy, z, mask, params, *saved, ctx.outgoing)
        return (dz if need[0] else None, None, None, None,
                *[g.to(p.dtype) if need[4 + i] else None for i, (p, g) in enumerate(zip(params, grads))])


def triangle_multiplication_triton(z: Tensor, mask: Tensor | None, params: TriMulParams, *,
                                   direction: str = "outgoing", eps: float = 1e-5) -> Tensor:
    """The Triton path, without dispatch (callers have checked :func:`supports`). Under torch.compile
    the custom ops (opaque graph nodes); in eager the autograd Function (less host overhead)."""
    outgoing = direction == "outgoing"
    if torch.compiler.is_compiling():
        return _fwd(z, mask, list(params), outgoing, float(eps))[0]
    return _TriMulEager.apply(z, mask, outgoing, float(eps), *params)


def triangle_multiplication(z: Tensor, mask: Tensor | None, params: TriMulParams, *,
                            direction: str = "outgoing", eps: float = 1e-5, impl: str = "reference") -> Tensor:
    """AF2 Suppl. Alg. 11/12 update; see :func:`triangle_multiplication_reference`. Under bf16 autocast an
    fp32 pair activation is cast to bf16 for the Triton path (its projections run in bf16, as the
    reference's autocast Linears do)."""
    zt = autocast_input(z)
    if _dispatch.resolve("triangle_multiplication", impl,
                         lambda: supports(zt, mask, params, direction)) == "triton":
        return triangle_multiplication_triton(zt, mask, params, direction=direction, eps=eps)
    return triangle_multiplication_reference(z, mask, params, direction=direction, eps=eps)
