"""Shared set-up of the Triton kernel tests: run on the GPU where there is one, else on the CPU through the
Triton interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 for the whole CPU session (Triton fixes interpret-or-compile when a
kernel is defined); CPU tensors are routed to Triton only inside :func:`interpreter_scope` (a module-scoped
autouse fixture in each kernel test module), so elsewhere (tests/model) a CPU tensor keeps meaning "no
Triton path"."""
import torch

from foldforge.kernels import _launch

HAS_CUDA = torch.cuda.is_available()


def interpreter_scope():
    """Generator for a fixture: on a CPU-only machine, route CPU tensors to the Triton kernels (run by the
    interpreter, which tests/conftest.py switched on for the session) for the duration, then restore."""
    if HAS_CUDA:
        yield
        return
    before = _launch._INTERPRET
    _launch._INTERPRET = True
    try:
        yield
    finally:
        _launch._INTERPRET = before


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
