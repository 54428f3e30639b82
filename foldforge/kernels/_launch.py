"""Launch-time helpers shared by the Triton ops: where a kernel may run, how a strided tensor is
addressed by rows, and the committed block sizes (``tuned/<gpu-slug>.json``).

Nothing here touches CUDA or Triton at import (DESIGN.md convention 6): the GPU name, the SM count
and the tuned table are read on the first launch and cached per device.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WIDTH = 1024            # one row (or one GEMM K) is held in registers as a single tile
MAX_GRID = (2**31 - 1, 65535, 65535)    # CUDA's launch limits per grid axis (x, y, z)
# GPUs of one architecture (same SM, shared memory and compiler target) whose committed tables stand in for
# each other, per op, where a GPU has no entry of its own: H100 block sizes compile and run on an H200
# unchanged and are measured choices, where the fallback would be the untuned heuristic.
_SAME_ARCH = {"nvidia-h200": ("nvidia-h100-80gb-hbm3",)}
_TUNED_DIR = Path(__file__).with_name("tuned")
_INTERPRET: bool | None = None
_TABLES: dict[str, dict] = {}
_SMS: dict[int, int] = {}
_SLUGS: dict[int, str] = {}


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``).

    Read once: Triton itself decides interpret-or-compile when a kernel is first defined, so a later
    change of the variable would not take effect anyway.
    """
    global _INTERPRET
    if _INTERPRET is None:
        _INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return _INTERPRET


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def device_ok(t: Tensor) -> bool:
    """A Triton kernel can run on tensors of this device: CUDA, or CPU under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def dot_args(dtype: torch.dtype, *, follow_torch_tf32: bool) -> dict:
    """``tl.dot`` launch arguments shared by the kernels: ``DOT_F32`` and ``PREC``.

    Triton 3.9's interpreter multiplies bf16 dot operands as their raw 16-bit storage, so under the
    interpreter operands already rounded to the GEMM dtype go to ``tl.dot`` as fp32 (``DOT_F32``): the same
    products, accumulated in fp32 as on the GPU. 16-bit operands use tensor cores either way. fp32 operands:
    IEEE products, or -- with ``follow_torch_tf32`` -- TF32 when torch's matmul TF32 switch is on (the kernels
    that mirror a torch matmul follow its setting; the fused pair/transition kernels always use IEEE, since
    TF32 is a 16-bit-class precision they offer as bf16).
    """
    tf32 = dtype != torch.float32 or (follow_torch_tf32 and torch.backends.cuda.matmul.allow_tf32)
    return {"DOT_F32": interpreting(), "PREC": "tf32" if tf32 else "ieee"}


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    """``grid`` unchanged, after checking it against CUDA's per-axis limits (:data:`MAX_GRID`): an axis
    beyond them fails at launch as an invalid argument or, worse, shows up later as an illegal memory
    access. Kernels put their large extents on axis 0 (program ids folded there); this guards the rest."""
    for axis, (n, limit) in enumerate(zip(grid, MAX_GRID)):
        if not 1 <= n <= limit:
            raise ValueError(f"launch grid {tuple(grid)}: axis {axis} = {n} is outside CUDA's 1..{limit}")
    return tuple(grid)


def gemm_weight(w: Tensor, dtype: torch.dtype) -> Tensor:
    """A weight matrix in the GEMM dtype, contiguous: fp32 master weights are rounded once per call (to
    nearest even, as the kernels rounded each tile) instead of every program re-reading the fp32 matrix
    from L2 -- half the bytes on the operand path. A no-op for weights already in that dtype and layout."""
    return w.to(dtype=dtype, memory_format=torch.contiguous_format)


def row_layout(x: Tensor) -> tuple[Tensor, tuple[int, int], tuple[int, int, int]] | None:
    """Address the rows of ``x`` ``[*, C]`` (last dim contiguous) without copying.

    Leading dims are collapsed where memory allows (size-1 dims dropped; dim i merged into i+1 when
    ``stride[i] == stride[i+1] * size[i+1]``). Up to three collapsed dims remain addressable: row ``r``
    starts at ``i0*s0 + i1*s1 + i2*s2`` with ``(i0, i1, i2)`` = ``r`` unravelled over ``(*, d1, d2)``.
    This covers contiguous tensors, row/column slices and the ``[B, L, L, C]`` pair tensor transposed
    in its two residue dims. Returns ``(x, (d1, d2), (s0, s1, s2))`` or None (caller copies).
    """
    if x.dim() == 0 or x.stride(-1) != 1 and x.shape[-1] != 1:
        return None
    dims = [(s, st) for s, st in zip(x.shape[:-1], x.stride()[:-1]) if s != 1]
    merged: list[list[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 3:
        return None
    while len(merged) < 3:
        merged.insert(0, [1, 0])
    (_, s0), (d1, s1), (d2, s2) = merged
    return x, (d1, d2), (s0, s1, s2)


def rows_2d(x: Tensor) -> tuple[Tensor, tuple[int, int], tuple[int, int, int]]:
    """:func:`row_layout`, copying only when the layout is not addressable (rare: > 3 leading dims
    that cannot be merged, or a non-contiguous last dim)."""
    lay = row_layout(x)
    if lay is None:
        lay = row_layout(x.contiguous())
        assert lay is not None
    return lay


def gpu_slug(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``; ``"interpreter"`` on the CPU."""
    if device.type != "cuda":
        return "interpreter"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SLUGS:
        _SLUGS[idx] = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(idx).lower()).strip("-")
    return _SLUGS[idx]


def sm_count(device: torch.device) -> int:
    """Multiprocessors of the device (queried at the first launch, cached); 4 under the interpreter,
    so CPU tests exercise the multi-tile loops of the persistent kernels."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def tuned(device: torch.device, op: str, key: str) -> dict | None:
    """The committed launch parameters for ``op`` at bucket ``key`` on this GPU, or None (the caller's
    default heuristic). Tables live in ``tuned/<gpu-slug>.json``; read once per GPU name. An op absent from
    this GPU's table is looked up in the tables of the same architecture (:data:`_SAME_ARCH`)."""
    slug = gpu_slug(device)
    for name in (slug, *_SAME_ARCH.get(slug, ())):
        ops = _table(name).get(op)
        if ops is not None:   # the first table that tunes this op decides, also for a bucket it lacks
            entry = ops.get(key)
            return dict(entry) if entry is not None else None
    return None


def _table(slug: str) -> dict:
    if slug not in _TABLES:
        path = _TUNED_DIR / f"{slug}.json"
        _TABLES[slug] = json.loads(path.read_text()) if path.is_file() else {}
    return _TABLES[slug]


def set_tuned_override(slug: str, table: dict | None) -> None:
    """Replace the table of one GPU in this process (block-size sweeps in the benchmark; tests)."""
    if table is None:
        _TABLES.pop(slug, None)
    else:
        _TABLES[slug] = table
