"""Triton residual add with shared dropout, ``out = x + update * keep / (1 - p)``, forward and backward.

The keep mask is never stored: mask entry ``e`` (its index in the mask tensor, whose shape has size 1
along the shared dim) is ``tl.rand(seed, e) >= p`` (Philox), and backward regenerates it from the 8-byte
seed. The seed is a one-element int64 tensor drawn from the caller's torch generator on the device (no
host sync), hence reproducible with a fixed generator.

The update is seen as ``[NB, I, J, C]`` (NB = the leading dims; I, J = 1 where absent), rows
``r = (b I + i) J + j``. Philox (ten rounds of 32-bit multiplies per draw) costs more than the memory
traffic of the element it would mask, so each program draws its mask tile once and streams every row
that shares it -- one draw per mask entry and program, not per element:

* MODE 1 (SHARED 1: along dim -3, row-wise): a program owns a ``[BLOCK_R, BLOCK_C]`` tile of mask entries
  ``(b, j, c)`` and loops over a run of ``steps`` rows i.
* MODE 2 (SHARED 2: along dim -2, column-wise): a program owns one mask row ``(b, i)`` (``BLOCK_C``
  entries) and loops over ``steps`` tiles of ``BLOCK_R`` consecutive rows j, broadcasting it.
* MODE 0 (SHARED 0, independent elements, or a shared extent J too short for a tile worth the name): one
  tile of ``BLOCK_R`` consecutive rows, each element drawing its own mask entry.

Each element of x and update is read once and the output written once (a streaming kernel); the runs
are sized so that a few programs per SM keep enough loads in flight. Rows of x and update are addressed
in place through :func:`_launch.row_layout`; the output is contiguous. Backward is the same kernel
without x: ``d(update) = dY * keep * scale``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from foldforge.kernels import _launch
from foldforge.kernels._layer_norm_triton import _bound, _row_offsets
from foldforge.kernels._transition_triton import to_dtype


@triton.jit
def _stream_tile(X, U, Out, rows, row_ok, cs, c_ok, keep, C, xD1, xD2, xs0, xs1, xs2, uD1, uD2, us0, us1,
                 us2, scale, HAS_X: tl.constexpr, RNE: tl.constexpr):
    """``Out[rows] = X[rows] + where(keep, U[rows] * scale, 0)`` for one tile (rows int64; without X:
    the scaled, masked U)."""
    mask = row_ok[:, None] & c_ok[None, :]
    u_off = _row_offsets(rows, uD1, uD2, us0, us1, us2)
    u = tl.load(U + u_off[:, None] + cs[None, :], mask=mask, other=0.0).to(tl.float32)
    out = tl.where(keep, u * scale, 0.0)
    if HAS_X:
        x_off = _row_offsets(rows, xD1, xD2, xs0, xs1, xs2)
        out = tl.load(X + x_off[:, None] + cs[None, :], mask=mask, other=0.0).to(tl.float32) + out
    tl.store(Out + (rows * C)[:, None] + cs[None, :], to_dtype(out, Out, RNE), mask=mask)


# Extents that change with the crop are not specialised (one binary for every crop); C and the strides
# are (16-byte accesses).
@triton.jit(do_not_specialize=["NB", "I", "J", "n_jb", "n_chunks", "steps"])
def _kernel(X, U, Out, Seed, NB, I, J, C, n_jb, n_cb, n_chunks, steps,
            xD1, xD2, xs0, xs1, xs2, uD1, uD2, us0, us1, us2, p, scale,
            HAS_X: tl.constexpr, SHARED: tl.constexpr, MODE: tl.constexpr, OFF64: tl.constexpr,
            RNE: tl.constexpr, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid % n_cb
    t = pid // n_cb
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = _bound(cs, C, EVEN_C)
    seed = tl.load(Seed)
    if MODE == 0:
        # rows r of one tile; row r's mask row: r (independent), (b, j) (SHARED 1) or (b, i) (SHARED 2)
        rows = t * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = _bound(rows, NB * I * J, EVEN_R)
        if OFF64:
            r = rows.to(tl.int64)
        else:
            r = rows
        if SHARED == 1:
            mrow = (r // (I * J)) * J + r % J
        elif SHARED == 2:
            mrow = r // J
        else:
            mrow = r
        keep = tl.rand(seed, mrow[:, None] * C + cs[None, :]) >= p
        _stream_tile(X, U, Out, rows.to(tl.int64), row_ok, cs, c_ok, keep, C, xD1, xD2, xs0, xs1, xs2,
                     uD1, uD2, us0, us1, us2, scale, HAS_X, RNE)
    elif MODE == 2:
        # program = (mask row (b, i), chunk of j tiles, column block); the mask row is drawn once
        chunk = t % n_chunks
        mrow = t // n_chunks
        if OFF64:
            e = mrow.to(tl.int64) * C + cs
        else:
            e = mrow * C + cs
        keep = (tl.rand(seed, e) >= p)[None, :]
        row0 = mrow.to(tl.int64) * J
        for jb in range(chunk * steps, tl.minimum(chunk * steps + steps, n_jb)):
            js = jb * BLOCK_R + tl.arange(0, BLOCK_R)
            _stream_tile(X, U, Out, row0 + js, _bound(js, J, EVEN_R), cs, c_ok, keep, C, xD1, xD2, xs0, xs1,
                         xs2, uD1, uD2, us0, us1, us2, scale, HAS_X, RNE)
    else:
        # program = (chunk of rows i, batch b, j tile, column block); mask entries (b, j, c) drawn once
        jb = t % n_jb
        t2 = t // n_jb
        b = t2 % NB
        chunk = t2 // NB
        js = jb * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = _bound(js, J, EVEN_R)
        if OFF64:
            e = (b.to(tl.int64) * J + js)[:, None] * C + cs[None, :]
        else:
            e = (b * J + js)[:, None] * C + cs[None, :]
        keep = tl.rand(seed, e) >= p
        for i in range(chunk * steps, tl.minimum(chunk * steps + steps, I)):
            rows = (b.to(tl.int64) * I + i) * J + js
            _stream_tile(X, U, Out, rows, row_ok, cs, c_ok, keep, C, xD1, xD2, xs0, xs1, xs2,
                         uD1, uD2, us0, us1, us2, scale, HAS_X, RNE)


def _geometry(shape: torch.Size, shared: int) -> tuple[int, int, int, int, bool]:
    """(rows M, width C, I, J, 64-bit mask offsets) of a ``[*, I, J, C]`` tensor (I, J = 1 where absent)."""
    c = shape[-1] if len(shape) else 1
    m = int(torch.Size(shape[:-1]).numel()) if len(shape) else 1
    i = shape[-3] if len(shape) >= 3 else 1
    j = shape[-2] if len(shape) >= 2 else 1
    return m, c, i, j, m * c >= 2**31 - 1


def bucket(c: int) -> str:
    """Tuned-table key: the column tile ``BLOCK_C`` (next power of two of C, 16..256)."""
    return str(min(256, max(16, _launch.next_pow2(c))))


def _config(device: torch.device, c: int) -> dict:
    """Tiles of ~2048 elements (16 values a thread at 4 warps), 4 programs per SM."""
    key = bucket(c)
    bc = int(key)
    cfg = _launch.tuned(device, "dropout", key) or {}
    return {"BLOCK_R": max(1, 2048 // bc), "num_warps": 4, "programs_per_sm": 4, **cfg, "BLOCK_C": bc}


def plan(shape: torch.Size, shared: int, cfg: dict, sms: int) -> dict:
    """Kernel arguments and the 1-D grid for an update of ``shape`` (host arithmetic only).

    The shared axis is walked in runs of ``steps`` (rows i, or tiles of j for SHARED 2) sized so that the
    grid has about ``programs_per_sm * sms`` programs: long runs at large crops (one Philox draw per mask
    entry and ~``I / steps`` programs), short ones where the tensor is small."""
    m, c, i, j, off64 = _geometry(shape, shared)
    nb = m // (i * j)
    block_c = cfg["BLOCK_C"]
    n_cb = triton.cdiv(c, block_c)
    block_r = min(cfg["BLOCK_R"], _launch.next_pow2(j))
    mode = shared if shared and 4 * block_r >= cfg["BLOCK_R"] else 0
    if mode == 0:                               # one tile of rows per program (and column block)
        block_r = cfg["BLOCK_R"]
        n_jb = triton.cdiv(m, block_r)          # row tiles
        outer, extent, steps, even_r = n_jb * n_cb, 1, 1, m % block_r == 0
    else:
        n_jb = triton.cdiv(j, block_r)
        even_r = j % block_r == 0
        if mode == 2:   # programs per mask row x column block; runs over j tiles
            outer, extent = nb * i * n_cb, n_jb
        else:           # programs per mask tile; runs over rows i
            outer, extent = nb * n_jb * n_cb, i
        steps = min(extent, max(1, triton.cdiv(extent * outer, max(1, cfg["programs_per_sm"] * sms))))
    n_chunks = triton.cdiv(extent, steps)
    grid = _launch.check_grid((outer * n_chunks,))
    return {"grid": grid, "NB": nb, "I": i, "J": j, "C": c, "n_jb": n_jb, "n_cb": n_cb, "n_chunks": n_chunks,
            "steps": steps, "SHARED": shared, "MODE": mode, "OFF64": off64, "EVEN_R": even_r,
            "EVEN_C": c % block_c == 0, "BLOCK_R": block_r, "BLOCK_C": block_c}


def draw_seed(device: torch.device, generator: torch.Generator | None) -> Tensor:
    """One int64 seed on ``device``, drawn from ``generator`` (or the device's default generator) without
    a host synchronisation."""
    gdev = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=gdev, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def _launch_kernel(x: Tensor | None, u: Tensor, out: Tensor, seed: Tensor, p: float, shared: int) -> None:
    cfg = _config(u.device, u.shape[-1])
    k = plan(u.shape, shared, cfg, _launch.sm_count(u.device))
    grid = k.pop("grid")
    has_x = x is not None
    u, (ud1, ud2), (us0, us1, us2) = _launch.rows_2d(u)
    if has_x:
        x, (xd1, xd2), (xs0, xs1, xs2) = _launch.rows_2d(x)
    else:
        x, (xd1, xd2), (xs0, xs1, xs2) = u, (ud1, ud2), (us0, us1, us2)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    _kernel[grid](x, u, out, seed, k.pop("NB"), k.pop("I"), k.pop("J"), k.pop("C"), k.pop("n_jb"),
                  k.pop("n_cb"), k.pop("n_chunks"), k.pop("steps"), xd1, xd2, xs0, xs1, xs2, ud1, ud2, us0, us1,
                  us2, float(p), scale, HAS_X=has_x, RNE=_launch.interpreting(), **k,
                  num_warps=cfg["num_warps"])


def forward(x: Tensor, update: Tensor, seed: Tensor, p: float, shared: int) -> Tensor:
    out = torch.empty(update.shape, dtype=update.dtype, device=update.device)
    if out.numel():
        _launch_kernel(x, update, out, seed, p, shared)
    return out


def backward(dy: Tensor, seed: Tensor, p: float, shared: int) -> Tensor:
    """``d(update)`` (contiguous); dY is read in place whatever its row layout."""
    du = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    if du.numel():
        _launch_kernel(None, dy, du, seed, p, shared)
    return du
