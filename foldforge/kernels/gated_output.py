"""Gated output projection of AF2 attention: Linear(sigmoid(g) * o) (AF2 Suppl. Alg. 7 lines 4 and 7).

``impl="triton"`` runs :mod:`foldforge.kernels._gated_output_triton` (the gate as the GEMM's prologue;
backward without writing sigmoid(g) * o) through ``torch.library`` custom ops joined by
``register_autograd``, so it stays whole under ``torch.compile(fullgraph=True)``; eager calls go through a
lighter ``torch.autograd.Function``. Saved for backward: o, g and the weight only (inputs).
"""
from __future__ import annotations

import torch
from torch import Tensor

from foldforge.kernels import _dispatch, _launch
from foldforge.kernels._utils import linear


def gated_output_reference(o: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``o`` and ``g`` broadcast to ``[*, C_hidden]`` (gate logits before the sigmoid);
    returns ``[*, C_out]``. In global attention (Alg. 19) ``o`` is ``[*, 1, C_hidden]`` against a
    per-sequence gate ``[*, S, C_hidden]``."""
    return linear(torch.sigmoid(g) * o, weight, bias)


def gemm_dtype(g: Tensor) -> torch.dtype:
    """The projection's dtype, as in the reference: autocast's when enabled for g's device, else g's."""
    if torch.is_autocast_enabled(g.device.type):
        return torch.get_autocast_dtype(g.device.type)
    return g.dtype


def supports(o: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether the Triton path handles these inputs: a CUDA tensor (or any under ``TRITON_INTERPRET=1``);
    o and g of one fp16/bf16/fp32 dtype; g ``[*, K]`` (1 <= K <= 1024) and o of g's shape or broadcasting
    to it (the global-attention case ``[*, 1, K]`` against ``[*, S, K]``); weight ``[N, K]``, bias ``[N]``,
    all on g's device."""
    if g.dim() == 0 or g.dtype not in _launch.TRITON_DTYPES or o.dtype != g.dtype:
        return False
    if not 1 <= g.shape[-1] <= _launch.MAX_WIDTH or o.shape[-1:] != g.shape[-1:] or o.dim() > g.dim():
        return False
    try:
        if torch.broadcast_shapes(o.shape, g.shape) != g.shape:
            return False
    except RuntimeError:
        return False
    if not _launch.device_ok(g) or o.device != g.device or gemm_dtype(g) not in _launch.TRITON_DTYPES:
        return False
    if g.is_cuda and gemm_dtype(g) == torch.float32 and g.shape[-1] > 256:
        # compiled fp32 at K = 384/768 measured above 2x eager fp32's error on an H100 (one long FMA chain
        # per output): outside the three-way rule, so these stay on the reference
        return False
    if weight.dim() != 2 or weight.shape[1] != g.shape[-1] or weight.shape[0] < 1:
        return False
    for p, shape in ((weight, weight.shape), (bias, weight.shape[:1])):
        if p is not None and (p.shape != shape or p.device != g.device or p.dtype not in _launch.TRITON_DTYPES):
            return False
    return _launch.triton_available()


def _kernels():
    from foldforge.kernels import _gated_output_triton   # lazy: Triton only on the first launch
    return _gated_output_triton


# ---------------------------------------------------------------- custom ops (forward, backward)
@torch.library.custom_op("foldforge::gated_output_fwd", mutates_args=())
def _fwd(o: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    return _kernels().forward(o, g, weight, bias, out_dtype)


@_fwd.register_fake
def _(o, g, weight, bias, out_dtype):
    return g.new_empty((*g.shape[:-1], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("foldforge::gated_output_bwd", mutates_args=())
def _bwd(dy: Tensor, o: Tensor, g: Tensor, weight: Tensor, need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    do, dg, dw, db = _kernels().backward(dy, o, g, weight, need_db=need_db)
    return do, dg, dw, (db if db is not None else g.new_empty(0, dtype=torch.float32))


@_bwd.register_fake
def _(dy, o, g, weight, need_db):
    f32 = torch.float32
    return (o.new_empty(o.shape), g.new_empty(g.shape), g.new_empty(weight.shape, dtype=f32),
            g.new_empty(weight.shape[0] if need_db else 0, dtype=f32))


def _setup_context(ctx, inputs, output):
    o, g, weight, bias, _ = inputs
    ctx.save_for_backward(o, g, weight)
    ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)


def _grads(ctx, do, dg, dw, db):
    w_dt, b_dt = ctx.dtypes
    need = ctx.needs_input_grad
    return (do if need[0] else None, dg if need[1] else None, dw.to(w_dt) if need[2] else None,
            db.to(b_dt) if b_dt is not None and need[3] else None, None)


def _backward(ctx, dy):
    o, g, weight = ctx.saved_tensors
    need_db = ctx.dtypes[1] is not None and ctx.needs_input_grad[3]
    return _grads(ctx, *_bwd(dy, o, g, weight, need_db))


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _GatedOutputEager(torch.autograd.Function):
    """Eager calls: the same launchers and saved tensors as the custom ops, without the custom-op
    dispatcher's host time (see layer_norm._LayerNormEager)."""

    @staticmethod
    def forward(ctx, o, g, weight, bias, out_dtype):
        y = _kernels().forward(o, g, weight, bias, out_dtype)
        _setup_context(ctx, (o, g, weight, bias, out_dtype), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        o, g, weight = ctx.saved_tensors
        need_db = ctx.dtypes[1] is not None and ctx.needs_input_grad[3]
        return _grads(ctx, *_kernels().backward(dy, o, g, weight, need_db=need_db))


def gated_output_triton(o: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The Triton path, without dispatch (callers have checked :func:`supports`)."""
    if torch.compiler.is_compiling():
        return _fwd(o, g, weight, bias, gemm_dtype(g))
    return _GatedOutputEager.apply(o, g, weight, bias, gemm_dtype(g))


def gated_output(o: Tensor, g: Tensor, weight: Tensor, bias: Tensor | None, *,
                 impl: str = "reference") -> Tensor:
    """Linear(sigmoid(g) * o); see :func:`gated_output_reference`."""
    if _dispatch.resolve("gated_output", impl, lambda: supports(o, g, weight, bias)) == "triton":
        return gated_output_triton(o, g, weight, bias)
    return gated_output_reference(o, g, weight, bias)
