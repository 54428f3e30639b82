"""Implementation resolution (foldforge.kernels._dispatch.resolve)."""
import pytest

from foldforge.kernels import _dispatch


def test_resolve_auto_reference_triton():
    yes, no = (lambda: True), (lambda: False)
    assert _dispatch.resolve("op_x", "reference", yes) == "reference"
    assert _dispatch.resolve("op_x", "auto", yes) == "triton"
    assert _dispatch.resolve("op_x", "auto", no) == "reference"
    assert _dispatch.resolve("op_x", "triton", yes) == "triton"
    with pytest.raises(NotImplementedError, match="op_x"):
        _dispatch.resolve("op_x", "triton", no)
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        _dispatch.resolve("op_x", "fast", yes)


def test_auto_triton_false_keeps_the_reference_for_auto_only():
    """An op measured slower than its reference opts out of "auto"; "triton" still selects its kernel."""
    yes = lambda: True  # noqa: E731
    assert _dispatch.resolve("op_y", "auto", yes, auto_triton=False) == "reference"
    assert _dispatch.resolve("op_y", "triton", yes, auto_triton=False) == "triton"
    _dispatch.reset_resolutions()
    _dispatch.resolve("op_y", "auto", yes, auto_triton=False)
    assert _dispatch.resolutions() == {"op_y": ["reference"]}
