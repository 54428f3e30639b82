"""Small helpers shared by the reference implementations (no op lives here)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for numerically sensitive steps: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` in the activation's dtype.

    Weights are cast to ``x.dtype`` so that bf16 activations work with fp32 master weights outside
    autocast (under autocast the cast is a no-op before autocast's own); gradients flow to the fp32 weight.
    """
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def check_bool_mask(mask: Tensor | None, op: str) -> None:
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor (True = attend), got {mask.dtype}")


def chunk_slices(n: int, chunk_size: int | None):
    """``slice`` objects covering ``range(n)`` in steps of ``chunk_size`` (one slice if None)."""
    if chunk_size is None or chunk_size >= n:
        return [slice(0, n)]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def autocast_input(x: Tensor) -> Tensor:
    """``x`` in the dtype an autocast region computes in: under bf16/fp16 autocast on x's device an fp32
    activation is cast (the reference's first projection would cast it anyway); otherwise x unchanged.
    Fused kernels whose projections read x directly call this so they run the 16-bit GEMMs autocast asks for."""
    dev = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return x.to(torch.get_autocast_dtype(dev))
    return x
