"""Shared set-up of the Triton kernel tests: run on the GPU where there is one, else on the CPU through the
Triton interpreter.

The interpreter is switched on only while these modules' tests run (:func:`interpreter_scope`, a module-scoped
autouse fixture in each), not for the whole session: elsewhere (tests/model) a CPU tensor must keep meaning
"no Triton path". Triton decides interpret-or-compile when a kernel is defined; our kernel modules are
imported lazily at the first launch, which happens inside the scope."""
import os
import sys

import torch

from foldforge.kernels import _launch

HAS_CUDA = torch.cuda.is_available()


def interpreter_scope():
    """Generator for a fixture: TRITON_INTERPRET=1 on a CPU-only machine for the duration, then restored."""
    if HAS_CUDA:
        yield
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _launch._INTERPRET = None                 # re-read on the next launch check
    _forget_kernel_modules()                  # kernels defined earlier in compile mode are re-defined here
    try:
        yield
    finally:
        _forget_kernel_modules()
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
        _launch._INTERPRET = None

def _forget_kernel_modules() -> None:
    import foldforge.kernels as pkg

    for name in [m for m in sys.modules if m.startswith("foldforge.kernels._") and m.endswith("_triton")]:
        del sys.modules[name]
        pkg.__dict__.pop(name.rsplit(".", 1)[1], None)  # `from pkg import mod` reads the attribute first


DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, dtype=torch.float32, scale=1.0, shift=0.0):
    """Normal draws made on the CPU in fp64 (device-independent values), moved and cast."""
    return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).to(device=DEVICE, dtype=dtype)


def leaves(*tensors, dtype=None):
    """Detached copies (optionally cast) that require grad; None stays None."""
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]
