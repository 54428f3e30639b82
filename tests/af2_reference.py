"""Load AF2 reference feature dicts (raw AlphaFold2 data-pipeline output) for parity tests.

The reference files are pickles of ``{name: numpy array}``. They are read with a restricted
unpickler that resolves only the globals numpy needs to rebuild arrays (``_reconstruct``,
``ndarray``, ``dtype``, ``scalar``); any other global (a class, a function such as ``os.system``)
raises ``pickle.UnpicklingError`` before it could be called. This is the only place in the project
that reads a pickle.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

# (module, name) -> object. Both the numpy 1.x ("numpy.core") and 2.x ("numpy._core") spellings map
# to the installed objects, so no deprecated module is imported while loading.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_mod, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED_GLOBALS[(_mod, "scalar")] = _multiarray.scalar


class RestrictedNumpyUnpickler(pickle.Unpickler):
    """Unpickler that only allows numpy's array/scalar reconstruction globals."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is not allowed in an AF2 reference feature dict"
            ) from None


def load_af2_feature_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an AF2 raw feature dict (``features.pkl``-style) with the restricted unpickler."""
    with open(path, "rb") as f:
        obj = RestrictedNumpyUnpickler(f).load()
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj
