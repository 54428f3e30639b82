"""Test helpers shared by the kernel and model tests (importable, no test-framework dependency)."""
from __future__ import annotations

import torch
from torch import Tensor


def assert_close_to_reference(out_kernel: Tensor, out_ref_lowp: Tensor, out_ref_highp: Tensor, *, name: str,
                              floor: float | None = None) -> tuple[float, float]:
    """The three-way tolerance rule (DESIGN.md convention 3), for an output or a gradient.

    ``out_kernel``: the implementation under test, in the low precision; ``out_ref_lowp``: the reference
    in the same low precision; ``out_ref_highp``: the reference in high precision (fp64, or fp32 without
    TF32). Passes when everything is finite and

        max|kernel - hp| <= 2 * max|lowp - hp| + floor * max|hp|

    i.e. the kernel may be at most twice as wrong as eager PyTorch in the same dtype, plus a floor
    relative to the output's scale (default: the machine epsilon of the kernel's dtype) for the case
    where the low-precision reference happens to be exact.

    Returns ``(max|kernel - hp|, bound)`` for logging; raises AssertionError with the numbers otherwise.
    """
    if not (out_kernel.shape == out_ref_lowp.shape == out_ref_highp.shape):
        raise AssertionError(f"{name}: shapes differ: kernel {tuple(out_kernel.shape)}, "
                             f"low-precision ref {tuple(out_ref_lowp.shape)}, "
                             f"high-precision ref {tuple(out_ref_highp.shape)}")
    for label, t in (("kernel", out_kernel), ("low-precision reference", out_ref_lowp),
                     ("high-precision reference", out_ref_highp)):
        if not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            raise AssertionError(f"{name}: {label} has {n_bad} non-finite values")
    if out_kernel.numel() == 0:
        return 0.0, 0.0
    if floor is None:
        floor = torch.finfo(out_kernel.dtype).eps if out_kernel.dtype.is_floating_point else 0.0
    hp = out_ref_highp.detach().to(torch.float64)
    err_kernel = (out_kernel.detach().to(torch.float64) - hp).abs().max().item()
    err_lowp = (out_ref_lowp.detach().to(torch.float64) - hp).abs().max().item()
    scale = hp.abs().max().item()
    bound = 2.0 * err_lowp + floor * scale
    if not err_kernel <= bound:
        raise AssertionError(
            f"{name}: max|kernel - hp| = {err_kernel:.3e} exceeds 2 * max|lowp - hp| + floor * max|hp| "
            f"= 2 * {err_lowp:.3e} + {floor:.1e} * {scale:.3e} = {bound:.3e}")
    return err_kernel, bound
