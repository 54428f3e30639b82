import os

import pytest
import torch

# On a CPU-only machine every Triton kernel is defined in interpreter mode, for the whole session: Triton
# decides interpret-or-compile when a kernel function is defined, so switching per module would leave
# kernels defined earlier in compile mode (and unusable). Whether a CPU tensor is *routed* to a Triton
# kernel is a separate switch (foldforge.kernels._launch._INTERPRET), off by default here so tests outside
# tests/kernels keep "CPU tensor = reference path"; kernel tests turn it on (tests/kernels/_triton_env.py).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    from foldforge.kernels import _launch

    _launch._INTERPRET = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
