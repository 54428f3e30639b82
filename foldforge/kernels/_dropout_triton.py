"""Triton residual add with shared dropout, ``out = x + update * keep / (1 - p)``, forward and backward.

The keep mask is never stored: element ``(b, i, j, c)`` of a ``[*, I, J, C]`` update draws
``tl.rand(seed, mask_index)`` (Philox, counter = the element's index in the mask tensor, whose shape has
size 1 along the shared dim), so every element sharing a mask entry draws the same number, and backward
regenerates the mask from the 8-byte seed. The seed is a one-element int64 tensor drawn from the caller's
torch generator on the device (no host sync), hence reproducible with a fixed generator.

Rows (``[*, C]``) of x and update are addressed in place through :func:`_launch.row_layout`; the output
is contiguous. SHARED: 0 = independent, 1 = shared along dim -3 (row-wise), 2 = along dim -2 (column-wise).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from foldforge.kernels import _launch
from foldforge.kernels._layer_norm_triton import _row_offsets
from foldforge.kernels._transition_triton import to_dtype


@triton.jit
def _keep(Seed, rows, cs, C, I, J, p, SHARED: tl.constexpr, OFF64: tl.constexpr):
    """Boolean keep mask of a [BLOCK_R, BLOCK_C] tile (row = flat index over the leading dims)."""
    if OFF64:
        r = rows.to(tl.int64)
    else:
        r = rows
    if SHARED == 1:      # mask [*, 1, J, C]: entry (b, j)
        mrow = (r // (I * J)) * J + r % J
    elif SHARED == 2:    # mask [*, I, 1, C]: entry (b, i) = r // J
        mrow = r // J
    else:
        mrow = r
    off = mrow[:, None] * C + cs[None, :]
    seed = tl.load(Seed)
    return tl.rand(seed, off) >= p


@triton.jit(do_not_specialize=["M", "I", "J"])
def _fwd_kernel(X, U, Out, Seed, M, C, I, J, xD1, xD2, xs0, xs1, xs2, uD1, uD2, us0, us1, us2, p, scale,
                SHARED: tl.constexpr, OFF64: tl.constexpr, RNE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cs < C)[None, :]
    x_off = _row_offsets(rows, xD1, xD2, xs0, xs1, xs2)
    u_off = _row_offsets(rows, uD1, uD2, us0, us1, us2)
    x = tl.load(X + x_off[:, None] + cs[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + u_off[:, None] + cs[None, :], mask=mask, other=0.0).to(tl.float32)
    keep = _keep(Seed, rows, cs, C, I, J, p, SHARED, OFF64)
    out = x + tl.where(keep, u * scale, 0.0)
    o_row = rows.to(tl.int64) * C
    tl.store(Out + o_row[:, None] + cs[None, :], to_dtype(out, Out, RNE), mask=mask)


@triton.jit(do_not_specialize=["M", "I", "J"])
def _bwd_kernel(DY, DU, Seed, M, C, I, J, p, scale,
                SHARED: tl.constexpr, OFF64: tl.constexpr, RNE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """d(update) = dY * keep * scale, the mask regenerated from the seed."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cs < C)[None, :]
    off = rows.to(tl.int64)[:, None] * C + cs[None, :]
    dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
    keep = _keep(Seed, rows, cs, C, I, J, p, SHARED, OFF64)
    tl.store(DU + off, to_dtype(tl.where(keep, dy * scale, 0.0), DU, RNE), mask=mask)


def _geometry(shape: torch.Size, shared: int) -> tuple[int, int, int, int, bool]:
    """(rows M, width C, I, J, 64-bit offsets) of a ``[*, I, J, C]`` tensor (I, J = 1 where absent)."""
    c = shape[-1] if len(shape) else 1
    m = int(torch.Size(shape[:-1]).numel()) if len(shape) else 1
    i = shape[-3] if len(shape) >= 3 else 1
    j = shape[-2] if len(shape) >= 2 else 1
    return m, c, i, j, m * c >= 2**31 - 1


def _config(device: torch.device, c: int) -> dict:
    bc = min(256, max(16, _launch.next_pow2(c)))
    cfg = _launch.tuned(device, "dropout", str(bc)) or {"BLOCK_R": max(1, 4096 // bc), "num_warps": 4}
    return {**cfg, "BLOCK_C": bc}


def draw_seed(device: torch.device, generator: torch.Generator | None) -> Tensor:
    """One int64 seed on ``device``, drawn from ``generator`` (or the device's default generator) without
    a host synchronisation."""
    gdev = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=gdev, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def forward(x: Tensor, update: Tensor, seed: Tensor, p: float, shared: int) -> Tensor:
    m, c, i, j, off64 = _geometry(update.shape, shared)
    out = torch.empty(update.shape, dtype=update.dtype, device=update.device)
    if out.numel() == 0:
        return out
    x, (xd1, xd2), (xs0, xs1, xs2) = _launch.rows_2d(x)
    u, (ud1, ud2), (us0, us1, us2) = _launch.rows_2d(update)
    k = _config(update.device, c)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    _fwd_kernel[(triton.cdiv(m, k["BLOCK_R"]), triton.cdiv(c, k["BLOCK_C"]))](
        x, u, out, seed, m, c, i, j, xd1, xd2, xs0, xs1, xs2, ud1, ud2, us0, us1, us2, float(p), scale,
        SHARED=shared, OFF64=off64, RNE=_launch.interpreting(), BLOCK_R=k["BLOCK_R"], BLOCK_C=k["BLOCK_C"], num_warps=k["num_warps"])
    return out


def backward(dy: Tensor, seed: Tensor, p: float, shared: int) -> Tensor:
    m, c, i, j, off64 = _geometry(dy.shape, shared)
    dy = dy.contiguous()
    du = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    if du.numel() == 0:
        return du
    k = _config(dy.device, c)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    _bwd_kernel[(triton.cdiv(m, k["BLOCK_R"]), triton.cdiv(c, k["BLOCK_C"]))](
        dy, du, seed, m, c, i, j, float(p), scale,
        SHARED=shared, OFF64=off64, RNE=_launch.interpreting(), BLOCK_R=k["BLOCK_R"], BLOCK_C=k["BLOCK_C"], num_warps=k["num_warps"])
    return du
