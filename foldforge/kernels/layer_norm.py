"""LayerNorm over the last dim with fp32 statistics (used before nearly every AF2/AF3 projection).

``impl="triton"`` runs :mod:`foldforge.kernels._layer_norm_triton` through two ``torch.library`` custom
ops (forward, backward) joined by ``register_autograd``, so ``torch.compile(fullgraph=True)`` keeps
them as opaque nodes instead of breaking the graph. Only the per-row mean and 1/std (8 bytes a row)
are saved for backward, besides the input itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from foldforge.kernels import _dispatch, _launch
from foldforge.kernels._utils import acc_dtype


def layer_norm_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """``[*, C] -> [*, C]``: statistics and affine in fp32 (fp64 stays fp64), output in x's dtype.

    bf16 statistics would lose ~3 significant digits on the variance of c_z = 128 channels; every
    AF2 implementation keeps LayerNorm in fp32 under mixed precision.
    """
    acc = acc_dtype(x.dtype)
    y = F.layer_norm(x.to(acc), x.shape[-1:],
                     None if weight is None else weight.to(acc),
                     None if bias is None else bias.to(acc), eps)
    return y.to(x.dtype)


def supports(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether the Triton kernel handles these inputs: a CUDA tensor (or any tensor under
    ``TRITON_INTERPRET=1``), fp16/bf16/fp32, row width 1..1024, affine parameters of shape ``[C]`` on
    the same device in a supported dtype."""
    if x.dim() == 0 or not 1 <= x.shape[-1] <= _launch.MAX_WIDTH or x.dtype not in _launch.TRITON_DTYPES:
        return False
    if not _launch.device_ok(x):
        return False
    for p in (weight, bias):
        if p is not None and (p.shape != x.shape[-1:] or p.device != x.device
                              or p.dtype not in _launch.TRITON_DTYPES):
            return False
    return _launch.triton_available()


def _kernels():
    from foldforge.kernels import _layer_norm_triton   # lazy: Triton only on the first launch
    return _layer_norm_triton


# ---------------------------------------------------------------- custom ops (forward, backward)
@torch.library.custom_op("foldforge::layer_norm_fwd", mutates_args=())
def _ln_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().forward(x, weight, bias, eps)


@_ln_fwd.register_fake
def _(x, weight, bias, eps):
    m = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("foldforge::layer_norm_bwd", mutates_args=())
def _ln_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, need_dw: bool,
            need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _kernels().backward(dy, x, weight, mean, rstd, need_dw=need_dw, need_db=need_db)
    def empty():   # custom ops return neither None nor aliased outputs
        return x.new_empty(0, dtype=torch.float32)
    return dx, (dw if dw is not None else empty()), (db if db is not None else empty())


@_ln_bwd.register_fake
def _(dy, x, weight, mean, rstd, need_dw, need_db):
    c = x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(c if need_dw else 0, dtype=torch.float32),
            x.new_empty(c if need_db else 0, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.w_dtype = None if weight is None else weight.dtype
    ctx.b_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = _ln_bwd(dy, x, weight, mean, rstd, need_dw, need_db)
    return (dx, dw.to(ctx.w_dtype) if need_dw else None, db.to(ctx.b_dtype) if need_db else None, None)


_ln_fwd.register_autograd(_backward, setup_context=_setup_context)


class _LayerNormEager(torch.autograd.Function):
    """Eager calls: the same launchers and saved tensors as the custom ops, without the custom-op
    dispatcher, which costs ~25 us of host time per call (dev CPU: 45 us per forward through
    custom_op + register_autograd, ~18 us through this Function); host time bounds small shapes."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = _kernels().forward(x, weight, bias, eps)
        _setup_context(ctx, (x, weight, bias, eps), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        need_dw = weight is not None and ctx.needs_input_grad[1]
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        dx, dw, db = _kernels().backward(dy, x, weight, mean, rstd, need_dw=need_dw, need_db=need_db)
        return (dx, dw.to(ctx.w_dtype) if need_dw else None, db.to(ctx.b_dtype) if need_db else None, None)


def layer_norm_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """The Triton path, without dispatch (callers have checked :func:`supports`). Under torch.compile
    the custom ops (opaque graph nodes); in eager the autograd Function (less host overhead)."""
    if torch.compiler.is_compiling():
        return _ln_fwd(x, weight, bias, float(eps))[0]
    return _LayerNormEager.apply(x, weight, bias, float(eps))


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, *,
               impl: str = "reference") -> Tensor:
    """LayerNorm (AF2 Suppl. 1.11.x "LayerNorm"); see :func:`layer_norm_reference`."""
    if _dispatch.resolve("layer_norm", impl, lambda: supports(x, weight, bias)) == "triton":
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)
