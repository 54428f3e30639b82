"""Transition (feed-forward) block: LayerNorm -> Linear(c -> n c) -> activation -> Linear(n c -> c).

"relu": AF2 Suppl. Alg. 9 (MSA) and Alg. 15 (pair). "swiglu": AF3 Suppl. Alg. 11, where the first
projection is ``c -> 2 n c`` (no bias) and ``swish(a) * b`` halves it (``a`` = first half).

``impl="triton"`` runs :mod:`foldforge.kernels._transition_triton` through ``torch.library`` custom ops
(forward, backward; ``register_autograd``), so it stays whole under ``torch.compile(fullgraph=True)``;
eager calls use a lighter ``torch.autograd.Function``. Saved for backward: x, the weights and the per-row
mean/rstd -- never the LayerNorm output nor the ``[*, n c]`` hidden activation, which backward recomputes
per row tile.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from foldforge.kernels import _dispatch, _launch
from foldforge.kernels._utils import linear
from foldforge.kernels.ln_linear import gemm_dtype
from foldforge.kernels.layer_norm import layer_norm_reference

ACTIVATIONS = ("relu", "swiglu")


class TransitionParams(NamedTuple):
    """Weights in nn.Linear layout ([out, in]); names match the module's parameter names."""
    layer_norm_weight: Tensor
    layer_norm_bias: Tensor | None
    linear_1_weight: Tensor          # [n c, c] (relu) or [2 n c, c] (swiglu)
    linear_1_bias: Tensor | None
    linear_2_weight: Tensor          # [c, n c]
    linear_2_bias: Tensor | None


def transition_reference(x: Tensor, params: TransitionParams, *, activation: str = "relu",
                         eps: float = 1e-5) -> Tensor:
    """``[*, c] -> [*, c]`` update (no residual, no mask)."""
    p = params
    h = linear(layer_norm_reference(x, p.layer_norm_weight, p.layer_norm_bias, eps),
               p.linear_1_weight, p.linear_1_bias)
    if activation == "relu":
        h = F.relu(h)
    elif activation == "swiglu":
        a, b = h.chunk(2, dim=-1)
        h = F.silu(a) * b
    else:
        raise ValueError(f"transition: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return linear(h, p.linear_2_weight, p.linear_2_bias)


def supports(x: Tensor, params: TransitionParams, activation: str) -> bool:
    """Whether the Triton path handles these inputs: a CUDA tensor (or any under ``TRITON_INTERPRET=1``),
    fp16/bf16/fp32 activations with a 16-bit GEMM dtype (bf16 autocast over fp32 activations and weights
    included), ``1 <= c <= 1024``, ``linear_1_weight`` ``[n c, c]`` (relu) or ``[2 n c, c]`` (swiglu),
    ``linear_2_weight`` ``[c, n c]``, vectors of matching length, all on x's device.

    fp32 GEMMs go to the reference (cuBLAS): the kernel's IEEE fp32 ``tl.dot`` reduces each
    up-projection (K = c) in one FMA chain, two GEMMs deep, which measured 3.9-4.2x eager fp32's output
    error on an H200 (c = 128-256); summing the hidden tiles from zero (``mma``) brings a simulation of
    that FMA order to ~2.4x -- still outside the three-way rule. fp32 is not the training precision;
    :func:`transition_triton` still runs fp32 when called directly (tested in the interpreter)."""
    if activation not in ACTIVATIONS or x.dim() == 0 or x.dtype not in _launch.TRITON_DTYPES:
        return False
    c = x.shape[-1]
    if not 1 <= c <= _launch.MAX_WIDTH or not _launch.device_ok(x):
        return False
    if gemm_dtype(x) not in _launch.TRITON_DTYPES or gemm_dtype(x) == torch.float32:
        return False
    w1, w2 = params.linear_1_weight, params.linear_2_weight
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] != c or w1.shape[0] < 1:
        return False
    if activation == "swiglu" and w1.shape[0] % 2:
        return False
    h = w1.shape[0] // 2 if activation == "swiglu" else w1.shape[0]
    for p, shape in ((params.layer_norm_weight, (c,)), (params.layer_norm_bias, (c,)), (w1, w1.shape),
                     (params.linear_1_bias, w1.shape[:1]), (w2, (c, h)), (params.linear_2_bias, (c,))):
        if p is not None and (p.shape != shape or p.device != x.device or p.dtype not in _launch.TRITON_DTYPES):
            return False
    return _launch.triton_available()


def _kernels():
    from foldforge.kernels import _transition_triton   # lazy: Triton only on the first launch
    return _transition_triton


# ---------------------------------------------------------------- custom ops (forward, backward)
@torch.library.custom_op("foldforge::transition_fwd", mutates_args=())
def _fwd(x: Tensor, lw: Tensor | None, lb: Tensor | None, w1: Tensor, b1: Tensor | None, w2: Tensor,
         b2: Tensor | None, eps: float, swiglu: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().forward(x, lw, lb, w1, b1, w2, b2, eps, swiglu, out_dtype)


@_fwd.register_fake
def _(x, lw, lb, w1, b1, w2, b2, eps, swiglu, out_dtype):
    m = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(m, dtype=torch.float32),
            x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("foldforge::transition_bwd", mutates_args=())
def _bwd(dy: Tensor, x: Tensor, lw: Tensor | None, lb: Tensor | None, w1: Tensor, b1: Tensor | None, w2: Tensor,
         mean: Tensor, rstd: Tensor, swiglu: bool, need: list[bool]) -> list[Tensor]:
    need_dlw, need_dlb, need_db1, need_db2 = need
    grads = _kernels().backward(dy, x, lw, lb, w1, b1, w2, mean, rstd, swiglu, need_dlw=need_dlw,
                                need_dlb=need_dlb, need_db1=need_db1, need_db2=need_db2)
    # custom ops return neither None nor aliased outputs
    return [x.new_empty(0, dtype=torch.float32) if t is None else t for t in grads]


@_bwd.register_fake
def _(dy, x, lw, lb, w1, b1, w2, mean, rstd, swiglu, need):
    need_dlw, need_dlb, need_db1, need_db2 = need
    c = x.shape[-1]
    f32 = torch.float32
    return [x.new_empty(x.shape), x.new_empty(c if need_dlw else 0, dtype=f32),
            x.new_empty(c if need_dlb else 0, dtype=f32), x.new_empty(w1.shape, dtype=f32),
            x.new_empty(w1.shape[0] if need_db1 else 0, dtype=f32), x.new_empty(w2.shape, dtype=f32),
            x.new_empty(c if need_db2 else 0, dtype=f32)]


def _setup_context(ctx, inputs, output):
    x, lw, lb, w1, b1, w2, b2, _, swiglu, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, lw, lb, w1, b1, w2, mean, rstd)
    ctx.swiglu = swiglu
    ctx.dtypes = tuple(None if p is None else p.dtype for p in (lw, lb, w1, b1, w2, b2))


def _needs(ctx) -> list[bool]:
    lw_dt, lb_dt, _, b1_dt, _, b2_dt = ctx.dtypes
    need = ctx.needs_input_grad
    return [lw_dt is not None and need[1], lb_dt is not None and need[2], b1_dt is not None and need[4],
            b2_dt is not None and need[6]]


def _grads(ctx, grads) -> tuple:
    """Kernel gradients (fp32 for parameters) -> autograd's tuple in the parameters' dtypes."""
    dx, dlw, dlb, dw1, db1, dw2, db2 = grads
    need = ctx.needs_input_grad
    flags = _needs(ctx)
    lw_dt, lb_dt, w1_dt, b1_dt, w2_dt, b2_dt = ctx.dtypes
    return (dx if need[0] else None, dlw.to(lw_dt) if flags[0] else None, dlb.to(lb_dt) if flags[1] else None,
            dw1.to(w1_dt) if need[3] else None, db1.to(b1_dt) if flags[2] else None,
            dw2.to(w2_dt) if need[5] else None, db2.to(b2_dt) if flags[3] else None, None, None, None)


def _backward(ctx, dy, _dmean, _drstd):
    x, lw, lb, w1, b1, w2, mean, rstd = ctx.saved_tensors
    return _grads(ctx, _bwd(dy, x, lw, lb, w1, b1, w2, mean, rstd, ctx.swiglu, _needs(ctx)))


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _TransitionEager(torch.autograd.Function):
    """Eager calls: the same launchers and saved tensors as the custom ops, without the custom-op
    dispatcher's host time (see layer_norm._LayerNormEager)."""

    @staticmethod
    def forward(ctx, x, lw, lb, w1, b1, w2, b2, eps, swiglu, out_dtype):
        y, mean, rstd = _kernels().forward(x, lw, lb, w1, b1, w2, b2, eps, swiglu, out_dtype)
        _setup_context(ctx, (x, lw, lb, w1, b1, w2, b2, eps, swiglu, out_dtype), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lw, lb, w1, b1, w2, mean, rstd = ctx.saved_tensors
        need_dlw, need_dlb, need_db1, need_db2 = _needs(ctx)
        return _grads(ctx, _kernels().backward(dy, x, lw, lb, w1, b1, w2, mean, rstd, ctx.swiglu,
                                               need_dlw=need_dlw, need_dlb=need_dlb, need_db1=need_db1,
                                               need_db2=need_db2))


def transition_triton(x: Tensor, params: TransitionParams, *, activation: str = "relu",
                      eps: float = 1e-5) -> Tensor:
    """The Triton path, without dispatch (callers have checked :func:`supports`). Under torch.compile
    the custom ops (opaque graph nodes); in eager the autograd Function (less host overhead)."""
    p = params
    args = (x, p.layer_norm_weight, p.layer_norm_bias, p.linear_1_weight, p.linear_1_bias, p.linear_2_weight,
            p.linear_2_bias, float(eps), activation == "swiglu", gemm_dtype(x))
    if torch.compiler.is_compiling():
        return _fwd(*args)[0]
    return _TransitionEager.apply(*args)


def transition(x: Tensor, params: TransitionParams, *, activation: str = "relu", eps: float = 1e-5,
               impl: str = "reference") -> Tensor:
    """Transition update (AF2 Suppl. Alg. 9/15, AF3 Suppl. Alg. 11); see :func:`transition_reference`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"transition: activation must be one of {ACTIVATIONS}, got {activation!r}")
    # "auto" runs the reference on CUDA: on an H100 the Triton transition was 0.13-0.59x torch.compile and
    # 0.23-1.3x eager fwd+bwd at the AF2/AF3 shapes (docs/bench_ops_h100_2026-11-22.md); impl="triton"
    # still selects it (it keeps 3-10x less memory)
    if _dispatch.resolve("transition", impl, lambda: supports(x, params, activation),
                         auto_triton=not x.is_cuda) == "triton":
        return transition_triton(x, params, activation=activation, eps=eps)
    return transition_reference(x, params, activation=activation, eps=eps)
