"""Triton LayerNorm (foldforge.kernels.layer_norm, impl="triton"): outputs and gradients of x, weight
and bias against the reference under the three-way rule (fp64 / same low precision), strided inputs,
determinism, supports() and dispatch. On the CPU the kernels run in the Triton interpreter."""
import pytest
import torch

from foldforge import kernels as K
from foldforge.bench.shapes import LAYER_NORM_SHAPES
from foldforge.kernels import _launch
from foldforge.kernels.layer_norm import layer_norm_reference, layer_norm_triton, supports
from foldforge.testing import assert_close_to_reference
from tests.kernels._triton_env import DEVICE, F64, HAS_CUDA, gen, interpreter_scope, leaves, randn


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    yield from interpreter_scope()


WIDTHS = (8, 16, 64, 128, 256, 384, 768)
ROWS = (1, 7, 1000)


def _check(x, w, b, dy, *, name, eps=1e-5, weights_dtype=None):
    """Kernel vs reference in x's dtype vs reference in fp64, for y, dx, dw, db."""
    lowp = x.dtype
    ker = leaves(x, w, b, dtype=None)
    if weights_dtype is not None:
        ker[1:] = leaves(w, b, dtype=weights_dtype)
    y = layer_norm_triton(*ker, eps)
    y.backward(dy)
    ref = leaves(*ker)
    y_ref = layer_norm_reference(*ref, eps)
    y_ref.backward(dy)
    hp = leaves(x, w, b, dtype=F64)
    y_hp = layer_norm_reference(*hp, eps)
    y_hp.backward(dy.to(F64))
    assert y.dtype == lowp and y.shape == x.shape
    assert_close_to_reference(y, y_ref, y_hp, name=f"{name} y")
    for label, a, r, h in zip(("dx", "dw", "db"), ker, ref, hp):
        if a is not None:
            assert a.grad.dtype == a.dtype
            assert_close_to_reference(a.grad, r.grad, h.grad, name=f"{name} {label}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_matches_reference(width, rows, dtype):
    if rows == 1000 and width >= 384 and not HAS_CUDA:
        rows = 250            # interpreter time; 1000 rows are covered at the narrower widths
    g = gen(width * 7 + rows)
    x = randn(rows, width, g=g, dtype=dtype, scale=2.0, shift=0.5)     # non-zero mean: two-pass variance
    w = randn(width, g=g, dtype=dtype, shift=1.0)
    b = randn(width, g=g, dtype=dtype)
    dy = randn(rows, width, g=g, dtype=dtype)
    _check(x, w, b, dy, name=f"[{rows},{width}] {dtype}")


def test_fp32_master_weights_bf16_activations():
    g = gen(1)
    x = randn(3, 37, 64, g=g, dtype=torch.bfloat16)
    w, b = randn(64, g=g, dtype=torch.bfloat16, shift=1.0), randn(64, g=g, dtype=torch.bfloat16)
    _check(x, w, b, randn(3, 37, 64, g=g, dtype=torch.bfloat16), name="fp32 weights", weights_dtype=torch.float32)


def test_no_affine_and_weight_only():
    g = gen(2)
    x = randn(7, 5, 32, g=g, dtype=torch.bfloat16)
    dy = randn(7, 5, 32, g=g, dtype=torch.bfloat16)
    _check(x, None, None, dy, name="no affine")
    _check(x, randn(32, g=g, dtype=torch.bfloat16), None, dy, name="weight only")


@pytest.mark.parametrize("layout", ["row_slice", "pair_transposed", "uncollapsible", "last_dim_strided"])
def test_strided_inputs(layout):
    g = gen(3)
    c = 64
    if layout == "row_slice":          # rows padded in memory: [7, 9, 64] view of [7, 9, 96]
        x = randn(7, 9, 96, g=g, dtype=torch.bfloat16)[..., 16:16 + c]
    elif layout == "pair_transposed":  # z^T of the pair representation [B, L, L, c] (starting-node swap)
        x = randn(2, 11, 11, c, g=g, dtype=torch.bfloat16).transpose(1, 2)
    elif layout == "uncollapsible":    # four leading dims that cannot merge: copied, still correct
        x = randn(2, 3, 4, 5, c, g=g, dtype=torch.bfloat16).permute(3, 1, 0, 2, 4)
    else:                              # last dim not contiguous: copied, still correct
        x = randn(5, 2 * c, g=g, dtype=torch.bfloat16)[:, ::2]
    assert not x.is_contiguous()
    if layout in ("row_slice", "pair_transposed"):
        assert _launch.row_layout(x) is not None          # addressed in place, no copy
    w, b = randn(c, g=g, dtype=torch.bfloat16, shift=1.0), randn(c, g=g, dtype=torch.bfloat16)
    _check(x, w, b, randn(*x.shape, g=g, dtype=torch.bfloat16), name=layout)


def test_backward_is_deterministic():
    g = gen(4)
    x, w, b = (randn(1000, 128, g=g), randn(128, g=g), randn(128, g=g))
    dy = randn(1000, 128, g=g)
    grads = []
    for _ in range(2):
        xs = leaves(x, w, b)
        layer_norm_triton(*xs).backward(dy)
        grads.append([t.grad.clone() for t in xs])
    for a, b_ in zip(*grads):
        assert torch.equal(a, b_)


def test_supports_false_cases(monkeypatch):
    x = torch.randn(4, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    assert supports(x, w, w) and supports(x, None, None)
    assert not supports(x.double(), w, w)                            # fp64 stays on the reference
    assert not supports(x.to(torch.int32), None, None)
    assert not supports(torch.randn(4, 1025, device=DEVICE), None, None)
    assert not supports(torch.randn(4, 0, device=DEVICE), None, None)
    assert not supports(x, torch.ones(32, device=DEVICE), None)      # weight of the wrong width
    assert not supports(x, w.double(), None)
    assert not supports(torch.tensor(1.0, device=DEVICE), None, None)
    monkeypatch.setattr(_launch, "_INTERPRET", False)                # a CPU tensor without the interpreter
    assert not supports(torch.randn(4, 64), None, None)


def test_impl_triton_raises_and_auto_falls_back():
    x = torch.randn(3, 64, dtype=F64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="layer_norm"):
        K.layer_norm(x, None, None, impl="triton")
    torch.testing.assert_close(K.layer_norm(x, None, None, impl="auto"), layer_norm_reference(x, None, None))


def test_auto_uses_triton_where_supported():
    g = gen(5)
    x = randn(9, 48, g=g, dtype=torch.bfloat16)
    w, b = randn(48, g=g, dtype=torch.float32), randn(48, g=g, dtype=torch.float32)
    out = K.layer_norm(x, w, b, impl="auto")
    assert torch.equal(out, layer_norm_triton(x, w, b))


def test_empty_rows():
    x = torch.randn(0, 3, 64, device=DEVICE, requires_grad=True)
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    y = layer_norm_triton(x, w, None)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_torch_compile_fullgraph():
    """The custom ops trace as single nodes: no graph break, forward and backward match eager."""
    g = gen(6)
    x, w, b = randn(2, 7, 32, g=g), randn(32, g=g), randn(32, g=g)
    dy = randn(2, 7, 32, g=g)

    def f(x, w, b):
        return K.layer_norm(x * 2.0, w, b, impl="triton") + 1.0

    eager, comp = leaves(x, w, b), leaves(x, w, b)
    f(*eager).backward(dy)
    torch.compile(f, fullgraph=True, backend="aot_eager")(*comp).backward(dy)
    for a, c in zip(eager, comp):
        assert torch.equal(a.grad, c.grad)


# ---------------------------------------------------------------- GPU: canonical shapes
@pytest.mark.gpu
@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES, ids=[s.name for s in LAYER_NORM_SHAPES])
def test_canonical_shapes_gpu(shape):
    g = gen(7)
    x = randn(shape.rows, shape.c_in, g=g, dtype=torch.bfloat16, scale=2.0, shift=0.5)
    w = randn(shape.c_in, g=g, dtype=torch.float32, shift=1.0)
    b = randn(shape.c_in, g=g, dtype=torch.float32)
    _check(x, w, b, randn(shape.rows, shape.c_in, g=g, dtype=torch.bfloat16), name=shape.name)
