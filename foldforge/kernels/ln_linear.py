"""Linear(LayerNorm(x)): one fused op where the normalised tensor is consumed by one projection only
(e.g. the pair bias of AF2 Suppl. Alg. 7 line 3, LayerNorm(z) -> Linear(c_z -> H)), so the
normalised ``[*, L, L, c_z]`` tensor never needs to be written to memory.

``impl="triton"`` runs :mod:`foldforge.kernels._ln_linear_triton` through ``torch.library`` custom ops
(forward, backward; ``register_autograd``), so it stays whole under ``torch.compile(fullgraph=True)``.
Saved for backward: x, the weights and the per-row mean/rstd -- never the LayerNorm output.
"""
from __future__ import annotations

import torch
from torch import Tensor

from foldforge.kernels import _dispatch, _launch
from foldforge.kernels._utils import linear
from foldforge.kernels.layer_norm import layer_norm_reference


def ln_linear_reference(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, weight: Tensor,
                        bias: Tensor | None, *, eps: float = 1e-5) -> Tensor:
    """``[*, C_in] -> [*, C_out]``: fp32-statistics LayerNorm, then a linear layer in x's dtype."""
    return linear(layer_norm_reference(x, ln_weight, ln_bias, eps), weight, bias)


def gemm_dtype(x: Tensor) -> torch.dtype:
    """The dtype the projection runs in, as in the reference: autocast's dtype when autocast is on for
    x's device (``F.linear`` casts its inputs), else x's own dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def supports(x: Tensor, weight: Tensor, ln_weight: Tensor | None = None, ln_bias: Tensor | None = None,
             bias: Tensor | None = None) -> bool:
    """Whether the Triton path handles these inputs: a CUDA tensor (or any under ``TRITON_INTERPRET=1``),
    fp16/bf16/fp32 activations and GEMM dtype, ``1 <= C_in <= 1024``, weight ``[C_out, C_in]``,
    LayerNorm parameters ``[C_in]``, bias ``[C_out]``, all on x's device."""
    if x.dim() == 0 or x.dtype not in _launch.TRITON_DTYPES or not 1 <= x.shape[-1] <= _launch.MAX_WIDTH:
        return False
    if not _launch.device_ok(x) or gemm_dtype(x) not in _launch.TRITON_DTYPES:
        return False
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] < 1:
        return False
    for p, shape in ((weight, weight.shape), (ln_weight, x.shape[-1:]), (ln_bias, x.shape[-1:]),
                     (bias, weight.shape[:1])):
        if p is not None and (p.shape != shape or p.device != x.device or p.dtype not in _launch.TRITON_DTYPES):
            return False
    return _launch.triton_available()


def _kernels():
    from foldforge.kernels import _ln_linear_triton   # lazy: Triton only on the first launch
    return _ln_linear_triton


# ---------------------------------------------------------------- custom ops (forward, backward)
@torch.library.custom_op("foldforge::ln_linear_fwd", mutates_args=())
def _fwd(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, weight: Tensor, bias: Tensor | None,
         eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().forward(x, ln_weight, ln_bias, weight, bias, eps, out_dtype)


@_fwd.register_fake
def _(x, ln_weight, ln_bias, weight, bias, eps, out_dtype):
    m = x.numel() // x.shape[-1]
    return (x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype),
            x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("foldforge::ln_linear_bwd", mutates_args=())
def _bwd(dy: Tensor, x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, weight: Tensor,
         mean: Tensor, rstd: Tensor, need_dlw: bool, need_dlb: bool,
         need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dlw, dlb, dw, db = _kernels().backward(dy, x, ln_weight, ln_bias, weight, mean, rstd,
                                               need_dlw=need_dlw, need_dlb=need_dlb, need_db=need_db)
    def empty():   # custom ops return neither None nor aliased outputs
        return x.new_empty(0, dtype=torch.float32)
    return (dx, empty() if dlw is None else dlw, empty() if dlb is None else dlb, dw,
            empty() if db is None else db)


@_bwd.register_fake
def _(dy, x, ln_weight, ln_bias, weight, mean, rstd, need_dlw, need_dlb, need_db):
    k, n = x.shape[-1], weight.shape[0]
    f32 = torch.float32
    return (x.new_empty(x.shape), x.new_empty(k if need_dlw else 0, dtype=f32),
            x.new_empty(k if need_dlb else 0, dtype=f32), x.new_empty((n, k), dtype=f32),
            x.new_empty(n if need_db else 0, dtype=f32))


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, weight, bias, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, mean, rstd)
    ctx.dtypes = tuple(None if p is None else p.dtype for p in (ln_weight, ln_bias, weight, bias))


def _backward(ctx, dy, _dmean, _drstd):
    x, ln_weight, ln_bias, weight, mean, rstd = ctx.saved_tensors
    lw_dt, lb_dt, w_dt, b_dt = ctx.dtypes
    need = ctx.needs_input_grad
    need_dlw, need_dlb, need_db = lw_dt is not None and need[1], lb_dt is not None and need[2], \
        b_dt is not None and need[4]
    dx, dlw, dlb, dw, db = _bwd(dy, x, ln_weight, ln_bias, weight, mean, rstd, need_dlw, need_dlb, need_db)
    return (dx, dlw.to(lw_dt) if need_dlw else None, dlb.to(lb_dt) if need_dlb else None,
            dw.to(w_dt) if need[3] else None, db.to(b_dt) if need_db else None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _LnLinearEager(torch.autograd.Function):
    """Eager calls: the same launchers and saved tensors as the custom ops, without the custom-op
    dispatcher's ~25 us of host time per call (see layer_norm._LayerNormEager)."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, weight, bias, eps, out_dtype):
        y, mean, rstd = _kernels().forward(x, ln_weight, ln_bias, weight, bias, eps, out_dtype)
        _setup_context(ctx, (x, ln_weight, ln_bias, weight, bias, eps, out_dtype), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, ln_weight, ln_bias, weight, mean, rstd = ctx.saved_tensors
        lw_dt, lb_dt, w_dt, b_dt = ctx.dtypes
        need = ctx.needs_input_grad
        need_dlw, need_dlb, need_db = lw_dt is not None and need[1], lb_dt is not None and need[2], \
            b_dt is not None and need[4]
        dx, dlw, dlb, dw, db = _kernels().backward(dy, x, ln_weight, ln_bias, weight, mean, rstd,
                                                   need_dlw=need_dlw, need_dlb=need_dlb, need_db=need_db)
        return (dx, dlw.to(lw_dt) if need_dlw else None, dlb.to(lb_dt) if need_dlb else None,
                dw.to(w_dt) if need[3] else None, db.to(b_dt) if need_db else None, None, None)


def ln_linear_triton(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, weight: Tensor,
                     bias: Tensor | None, *, eps: float = 1e-5) -> Tensor:
    """The Triton path, without dispatch (callers have checked :func:`supports`). Under torch.compile
    the custom ops (opaque graph nodes); in eager the autograd Function (less host overhead)."""
    if torch.compiler.is_compiling():
        return _fwd(x, ln_weight, ln_bias, weight, bias, float(eps), gemm_dtype(x))[0]
    return _LnLinearEager.apply(x, ln_weight, ln_bias, weight, bias, float(eps), gemm_dtype(x))


def ln_linear(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, weight: Tensor,
              bias: Tensor | None, *, eps: float = 1e-5, impl: str = "reference") -> Tensor:
    """Linear(LayerNorm(x)); see :func:`ln_linear_reference`."""
    if _dispatch.resolve("ln_linear", impl,
                         lambda: supports(x, weight, ln_weight, ln_bias, bias)) == "triton":
        return ln_linear_triton(x, ln_weight, ln_bias, weight, bias, eps=eps)
    return ln_linear_reference(x, ln_weight, ln_bias, weight, bias, eps=eps)
