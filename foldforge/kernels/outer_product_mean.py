"""Outer product mean, AF2 Suppl. Alg. 10: the MSA -> pair communication.

    x = LayerNorm(m);  a = mask * (x W_1 + b_1),  b = mask * (x W_2 + b_2)           [*, S, L, C]
    update_ij = (flatten(sum_s a_si (x) b_sj) W_out + b_out) / (n_ij + eps)         [*, L, L, c_z]

with ``n_ij`` the number of MSA rows where both i and j are unmasked and eps = 1e-3. As in AF2 and
OpenFold the division comes after the output projection, so the output bias is divided too.

``impl="triton"`` runs :mod:`foldforge.kernels._outer_product_mean_triton`: the ``[L, L, C*C]`` outer
products are only ever held as register tiles (forward) or ``[chunk, L, C*C]`` slices (backward),
through ``torch.library`` custom ops so it stays whole under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from foldforge.kernels import _dispatch, _launch
from foldforge.kernels._utils import autocast_input, acc_dtype, chunk_slices, linear
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


MAX_C = 32      # c_hidden: the kernel's [BI*C, BJ*C] fp32 accumulator is 128 x 128 at C = 32


def supports(m: Tensor, mask: Tensor | None, params: OPMParams) -> bool:
    """Whether the Triton path handles these inputs: m ``[*, S, L, c_m]`` (S, L >= 1) on CUDA (or any
    device under ``TRITON_INTERPRET=1``), fp16/bf16/fp32, ``c_m <= 1024``, ``c_hidden <= 32``, every
    parameter present with its :class:`OPMParams` shape on m's device, mask None or ``[*, S, L]``."""
    if m.dim() < 3 or m.dtype not in _launch.TRITON_DTYPES or m.numel() == 0 or not _launch.device_ok(m):
        return False
    c_m = m.shape[-1]
    if not c_m <= _launch.MAX_WIDTH or any(p is None for p in params):
        return False
    c, c_z = params.linear_1_weight.shape[0], params.linear_out_weight.shape[0]
    if not 1 <= c <= MAX_C or c_z < 1:
        return False
    shapes = ((c_m,), (c_m,), (c, c_m), (c,), (c, c_m), (c,), (c_z, c * c), (c_z,))
    for p, shape in zip(params, shapes):
        if tuple(p.shape) != shape or p.device != m.device or p.dtype not in _launch.TRITON_DTYPES:
            return False
    if mask is not None and (mask.shape != m.shape[:-1] or mask.device != m.device):
        return False
    return _launch.triton_available()


def _kernels():
    from foldforge.kernels import (
        _outer_product_mean_triton,  # lazy: Triton only on the first launch
    )
    return _outer_product_mean_triton


# ---------------------------------------------------------------- custom ops (forward, backward)
@torch.library.custom_op("foldforge::outer_product_mean_fwd", mutates_args=())
def _fwd(m: Tensor, mask: Tensor | None, params: list[Tensor], eps: float,
         ln_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels().forward(m, mask, params, eps, ln_eps)


@_fwd.register_fake
def _(m, mask, params, eps, ln_eps):
    s, length = m.shape[-3], m.shape[-2]
    nb = m.numel() // (s * length * m.shape[-1])
    c, c_z = params[2].shape[0], params[6].shape[0]
    rows = m.numel() // m.shape[-1]
    f32 = torch.float32
    return (m.new_empty((*m.shape[:-3], length, length, c_z)), m.new_empty(rows, dtype=f32),
            m.new_empty(rows, dtype=f32), m.new_empty((nb, s, length, c)), m.new_empty((nb, s, length, c)),
            m.new_empty((nb, length, length), dtype=f32), m.new_empty((nb, s, length)))


@torch.library.custom_op("foldforge::outer_product_mean_bwd", mutates_args=())
def _bwd(dout: Tensor, m: Tensor, params: list[Tensor], saved: list[Tensor], eps: float) -> list[Tensor]:
    dm, grads = _kernels().backward(dout, m, params, *saved, eps)
    return [dm, *[g.clone() for g in grads]]   # custom ops return no aliased outputs


@_bwd.register_fake
def _(dout, m, params, saved, eps):
    return [m.new_empty(m.shape)] + [p.new_empty(p.shape, dtype=torch.float32) for p in params]


def _save(ctx, m, params, saved, eps):
    ctx.save_for_backward(m, *params, *saved)
    ctx.n_params = len(params)
    ctx.eps = eps


def _unpack(ctx):
    m, *rest = ctx.saved_tensors
    return m, list(rest[:ctx.n_params]), list(rest[ctx.n_params:])


def _setup_context(ctx, inputs, output):
    m, _, params, eps, _ = inputs
    _save(ctx, m, params, output[1:], eps)


def _backward(ctx, dout, *_saved_grads):
    m, params, saved = _unpack(ctx)
    dm, *grads = _bwd(dout, m, params, saved, ctx.eps)
    return dm, None, [g.to(p.dtype) for p, g in zip(params, grads)], None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _OPMEager(torch.autograd.Function):
    """Eager calls: the same launchers and saved tensors as the custom ops, without the custom-op
    dispatcher's host time (see layer_norm._LayerNormEager)."""

    @staticmethod
    def forward(ctx, m, mask, eps, ln_eps, *params):
        out = _kernels().forward(m, mask, list(params), eps, ln_eps)
        _save(ctx, m, params, out[1:], eps)
        return out[0]

    @staticmethod
    def backward(ctx, dout):
        m, params, saved = _unpack(ctx)
        need = ctx.needs_input_grad
        dm, grads = _kernels().backward(dout, m, params, *saved, ctx.eps)
        return (dm if need[0] else None, None, None, None,
                *[g.to(p.dtype) if need[4 + i] else None for i, (p, g) in enumerate(zip(params, grads))])


def outer_product_mean_triton(m: Tensor, mask: Tensor | None, params: OPMParams, *, eps: float = 1e-3,
                              ln_eps: float = 1e-5) -> Tensor:
    """The Triton path, without dispatch (callers have checked :func:`supports`). Under torch.compile
    the custom ops (opaque graph nodes); in eager the autograd Function (less host overhead)."""
    if torch.compiler.is_compiling():
        return _fwd(m, mask, list(params), float(eps), float(ln_eps))[0]
    return _OPMEager.apply(m, mask, float(eps), float(ln_eps), *params)


def outer_product_mean(m: Tensor, mask: Tensor | None, params: OPMParams, *, eps: float = 1e-3,
                       chunk_size: int | None = None, impl: str = "reference") -> Tensor:
    """AF2 Suppl. Alg. 10 pair update; see :func:`outer_product_mean_reference`. ``chunk_size`` applies to
    the reference only (the Triton path never materialises the outer products at full size)."""
    mt = autocast_input(m)   # under bf16 autocast the Triton path's projections run in bf16, as the reference's
    if _dispatch.resolve("outer_product_mean", impl, lambda: supports(mt, mask, params)) == "triton":
        return outer_product_mean_triton(mt, mask, params, eps=eps)
    return outer_product_mean_reference(m, mask, params, eps=eps, chunk_size=chunk_size)
