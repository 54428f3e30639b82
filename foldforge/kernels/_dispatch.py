"""Resolve ``impl`` ("reference" | "auto" | "triton") for one kernel call, and log the choice once per op.

DESIGN.md convention 2: the implementation is chosen from :class:`foldforge.config.KernelConfig` when the
model is built; modules pass that string to the kernel function on every call. ``"auto"`` falls back to the
reference only where the op's declared ``supports()`` says no -- never by catching an exception -- and
``"triton"`` on inputs the Triton path does not support raises.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

IMPLS = ("reference", "auto", "triton")

_log = logging.getLogger("foldforge.kernels")
_LOGGED: set[tuple[str, str, str]] = set()   # (op, requested, resolved) already logged
_RESOLVED: set[tuple[str, str]] = set()      # (op, resolved) seen since the last reset_resolutions()


def validate_impl(impl: str) -> str:
    """Raise ``ValueError`` for an unknown implementation name; modules call this at build time."""
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel implementation {impl!r}; expected one of {IMPLS}")
    return impl


def resolve(op: str, impl: str, supports: Callable[[], bool], *, auto_triton: bool = True) -> str:
    """The implementation that runs ``op`` for these inputs: "reference" or "triton".

    ``supports`` is the op's capability check bound to the call's inputs; it is only evaluated for
    "auto" and "triton". ``auto_triton=False``: "auto" picks the reference even where the Triton path
    supports the inputs (an op whose kernel measured slower than the reference on these inputs). The
    resolution is logged (INFO, logger ``foldforge.kernels``) the first time each (op, requested, resolved)
    combination occurs in an eager call in this process.
    """
    validate_impl(impl)
    if impl == "reference" or (impl == "auto" and not auto_triton):
        resolved = "reference"
    elif supports():
        resolved = "triton"
    elif impl == "auto":
        resolved = "reference"
    else:
        raise NotImplementedError(
            f"impl='triton': Triton kernel for {op} not available yet for these inputs "
            f"({op}'s supports() returned False); use impl='reference' or impl='auto'")
    key = (op, impl, resolved)
    # Not while torch.compile traces: a logger call would break the graph (fullgraph=True fails).
    if not torch.compiler.is_compiling():
        _RESOLVED.add((op, resolved))
        if key not in _LOGGED:
            _LOGGED.add(key)
            _log.info("kernel %s: impl=%r -> %s", op, impl, resolved)
    return resolved


def resolutions() -> dict[str, list[str]]:
    """Implementations that ran per op (eager calls since the last :func:`reset_resolutions`): what a
    benchmark row reports as "kernels used", so a configuration toggle is checked, not assumed."""
    out: dict[str, list[str]] = {}
    for op, resolved in sorted(_RESOLVED):
        out.setdefault(op, []).append(resolved)
    return out


def reset_resolutions() -> None:
    _RESOLVED.clear()
