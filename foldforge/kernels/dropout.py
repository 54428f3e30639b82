"""Residual add with shared dropout: ``x + dropout(update)`` (AF2 Suppl. 1.11.6).

AF2 shares one dropout mask along a whole axis: "row-wise" dropout (MSA row attention, triangle
multiplication, starting-node triangle attention) uses one mask for all rows, i.e. the mask has size 1
along dim -3; "column-wise" (ending-node triangle attention) has size 1 along dim -2.

``impl="triton"`` runs :mod:`foldforge.kernels._dropout_triton`: mask generation (Philox from a seed drawn
from the given generator), sharing, scale and residual add in one pass; backward regenerates the mask
from the saved 8-byte seed instead of saving it. Both implementations are reproducible with a fixed
generator, but they draw different masks (torch's generator stream vs Philox counters).
"""
from __future__ import annotations

import torch
from torch import Tensor

from foldforge.kernels import _dispatch, _launch


def bias_dropout_residual_reference(x: Tensor, update: Tensor, *, p: float, shared_dim: int | None,
                                    training: bool, generator: torch.Generator | None = None) -> Tensor:
    """``x + update * keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)`` broadcast along ``shared_dim``."""
    _check_p(p)
    if not training or p == 0.0:
        return x + update
    shape = list(update.shape)
    if shared_dim is not None:
        shape[shared_dim] = 1
    keep = torch.rand(shape, generator=generator, device=update.device) >= p   # [*, 1 on shared_dim, ...]
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    return x + update * (keep.to(update.dtype) * scale)


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")


def _shared_code(ndim: int, shared_dim: int | None) -> int | None:
    """0 = independent, 1 = shared along dim -3, 2 = along dim -2; None for any other dim."""
    if shared_dim is None:
        return 0
    if not -ndim <= shared_dim < ndim:
        return None
    d = shared_dim % ndim
    return {ndim - 3: 1, ndim - 2: 2}.get(d)


def supports(x: Tensor, update: Tensor, shared_dim: int | None) -> bool:
    """Whether the Triton path handles these inputs: x and update of one shape and fp16/bf16/fp32 dtype on
    a CUDA device (or any under ``TRITON_INTERPRET=1``), last dim contiguous or not, mask shared along
    dim -3, dim -2 or nothing."""
    if update.dim() == 0 or x.shape != update.shape or x.dtype != update.dtype:
        return False
    if update.dtype not in _launch.TRITON_DTYPES or x.device != update.device or not _launch.device_ok(update):
        return False
    if _shared_code(update.dim(), shared_dim) is None:
        return False
    return _launch.triton_available()


def _kernels():
    from foldforge.kernels import _dropout_triton   # lazy: Triton only on the first launch
    return _dropout_triton


# ---------------------------------------------------------------- custom ops (forward, backward)
@torch.library.custom_op("foldforge::dropout_residual_fwd", mutates_args=())
def _fwd(x: Tensor, update: Tensor, seed: Tensor, p: float, shared: int) -> Tensor:
    return _kernels().forward(x, update, seed, p, shared)


@_fwd.register_fake
def _(x, update, seed, p, shared):
    return update.new_empty(update.shape)


@torch.library.custom_op("foldforge::dropout_residual_bwd", mutates_args=())
def _bwd(dy: Tensor, seed: Tensor, p: float, shared: int) -> Tensor:
    return _kernels().backward(dy, seed, p, shared)


@_bwd.register_fake
def _(dy, seed, p, shared):
    return dy.new_empty(dy.shape)


def _setup_context(ctx, inputs, output):
    _, _, seed, p, shared = inputs
    ctx.save_for_backward(seed)
    ctx.p, ctx.shared = p, shared


def _backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    du = _bwd(dy, seed, ctx.p, ctx.shared) if ctx.needs_input_grad[1] else None
    return dy if ctx.needs_input_grad[0] else None, du, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _DropoutResidualEager(torch.autograd.Function):
    """Eager calls: the same launchers without the custom-op dispatcher's host time."""

    @staticmethod
    def forward(ctx, x, update, seed, p, shared):
        _setup_context(ctx, (x, update, seed, p, shared), None)
        return _kernels().forward(x, update, seed, p, shared)

    @staticmethod
    def backward(ctx, dy):
        (seed,) = ctx.saved_tensors
        du = _kernels().backward(dy, seed, ctx.p, ctx.shared) if ctx.needs_input_grad[1] else None
        return dy if ctx.needs_input_grad[0] else None, du, None, None, None


def bias_dropout_residual_triton(x: Tensor, update: Tensor, *, p: float, shared_dim: int | None,
                                 generator: torch.Generator | None = None) -> Tensor:
    """The Triton path in training, without dispatch (callers have checked :func:`supports`)."""
    shared = _shared_code(update.dim(), shared_dim)
    seed = _kernels().draw_seed(update.device, generator)
    if torch.compiler.is_compiling():
        return _fwd(x, update, seed, float(p), shared)
    return _DropoutResidualEager.apply(x, update, seed, float(p), shared)


def bias_dropout_residual(x: Tensor, update: Tensor, *, p: float, shared_dim: int | None, training: bool,
                          generator: torch.Generator | None = None, impl: str = "reference") -> Tensor:
    """``x + update * keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)`` broadcast along ``shared_dim``.

    Args:
        x, update: same shape ``[*, R, C_ax, C]``.
        p: drop probability in [0, 1].
        shared_dim: dim along which the mask is shared (-3 row-wise, -2 column-wise), or None for
            independent elements.
        training: no dropout when False (and when p == 0): ``x + update`` whatever ``impl``.
        generator: torch.Generator on ``update``'s device, for reproducible masks (None: the device's
            default generator).
        impl: "reference" | "auto" | "triton" (``KernelConfig``).
    """
    _check_p(p)
    if not training or p == 0.0:
        _dispatch.validate_impl(impl)
        return x + update
    if _dispatch.resolve("dropout", impl, lambda: supports(x, update, shared_dim)) == "triton":
        return bias_dropout_residual_triton(x, update, p=p, shared_dim=shared_dim, generator=generator)
    return bias_dropout_residual_reference(x, update, p=p, shared_dim=shared_dim, training=training,
                                           generator=generator)
