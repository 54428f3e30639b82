"""Triton Linear(sigmoid(g) * o) (foldforge.kernels.gated_output, impl="triton"): outputs and the gradients of
o, g, the weight and the bias against the reference under the three-way rule, fp32 and bf16, strided inputs,
the global-attention broadcast o [*, 1, K] vs g [*, S, K], autocast, determinism, supports() and dispatch."""
import pytest
import torch

from foldforge import kernels as K
from foldforge.bench.shapes import GATED_OUTPUT_SHAPES
from foldforge.kernels import _launch
from foldforge.kernels.gated_output import gated_output_reference, gated_output_triton, supports
from foldforge.testing import assert_close_to_reference
from tests.kernels._triton_env import DEVICE, F64, HAS_CUDA, gen, interpreter_scope, leaves, randn


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    yield from interpreter_scope()


# (K = heads x head dim, N = output width): every AF2/AF3 width
WIDTHS = ((8, 16), (16, 8), (64, 64), (128, 128), (256, 256), (384, 48), (768, 32))
ROWS = (1, 7, 1000)


def _check(o, g, w, b, dy, *, name, autocast=False):
    ker, ref, hp = leaves(o, g, w, b), leaves(o, g, w, b), leaves(o, g, w, b, dtype=F64)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        y = gated_output_triton(*ker)
        y_ref = gated_output_reference(*ref)
    y.backward(dy)
    y_ref.backward(dy)
    gated_output_reference(*hp).backward(dy.to(F64))
    assert y.dtype == y_ref.dtype == dy.dtype and y.shape == y_ref.shape
    assert_close_to_reference(y, y_ref, gated_output_reference(*hp), name=f"{name} y")
    for label, a, r, h in zip(("do", "dg", "dw", "db"), ker, ref, hp):
        if a is not None:
            assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, label
            assert_close_to_reference(a.grad, r.grad, h.grad, name=f"{name} {label}")


def _inputs(rows, k, n, g, dtype, bias=True):
    return (randn(rows, k, g=g, dtype=dtype), randn(rows, k, g=g, dtype=dtype, scale=2.0),
            randn(n, k, g=g, dtype=dtype, scale=k ** -0.5), randn(n, g=g, dtype=dtype) if bias else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kn", WIDTHS, ids=[f"{k}x{n}" for k, n in WIDTHS])
def test_matches_reference(kn, rows, dtype):
    k, n = kn
    if HAS_CUDA and dtype == torch.float32 and k > 256:
        pytest.skip("fp32 at K > 256 runs the reference on CUDA (gated_output.supports)")
    if not HAS_CUDA and rows == 1000 and k > 64:
        rows = 37             # interpreter time; 1000 rows are covered at K <= 64
    g = gen(k * 11 + rows)
    o, gl, w, b = _inputs(rows, k, n, g, dtype)
    _check(o, gl, w, b, randn(rows, n, g=g, dtype=dtype), name=f"[{rows},{k}->{n}] {dtype}")


def test_no_bias_and_strided():
    """Gate/output views with a row stride (a slice of a wider projection) and a transposed pair layout."""
    g = gen(1)
    base = randn(2, 6, 6, 96, g=g, dtype=torch.bfloat16)
    o, gl = base[..., :32].transpose(1, 2), base[..., 64:]
    assert not o.is_contiguous() and _launch.row_layout(o) is not None
    w = randn(24, 32, g=g, dtype=torch.bfloat16, scale=32 ** -0.5)
    _check(o, gl, w, None, randn(2, 6, 6, 24, g=g, dtype=torch.bfloat16), name="strided, no bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_global_attention_broadcast(dtype):
    """AF2 Alg. 19: o [*, N_res, 1, K] against per-sequence gates [*, N_res, S, K]; d(o) sums over S."""
    g = gen(2)
    o = randn(5, 1, 64, g=g, dtype=dtype)
    gl = randn(5, 9, 64, g=g, dtype=dtype, scale=2.0)
    w, b = randn(32, 64, g=g, dtype=dtype, scale=0.125), randn(32, g=g, dtype=dtype)
    assert supports(o, gl, w, b)
    _check(o, gl, w, b, randn(5, 9, 32, g=g, dtype=dtype), name=f"broadcast {dtype}")


def test_autocast_fp32_inputs_fp32_weights():
    g = gen(3)
    o, gl, w, b = _inputs(21, 64, 48, g, torch.float32)
    _check(o, gl, w, b, randn(21, 48, g=g, dtype=torch.bfloat16), name="autocast", autocast=True)


def test_backward_is_deterministic():
    g = gen(4)
    ins = _inputs(500, 64, 32, g, torch.bfloat16)
    dy = randn(500, 32, g=g, dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        xs = leaves(*ins)
        gated_output_triton(*xs).backward(dy)
        grads.append([t.grad.clone() for t in xs])
    for a, c in zip(*grads):
        assert torch.equal(a, c)


def test_supports_false_cases(monkeypatch):
    o, gl, w, b = (t.float() for t in _inputs(4, 32, 8, gen(5), torch.float32))
    assert supports(o, gl, w, b) and supports(o, gl, w)
    assert not supports(o.double(), gl.double(), w)
    assert not supports(o.bfloat16(), gl, w)                             # mixed dtypes
    assert not supports(o, gl[:, :16], w)                                # width mismatch
    assert not supports(o.expand(2, 4, 32), gl, w)                       # g would broadcast
    assert not supports(o, gl, w[:, :16])
    assert not supports(o, gl, w, b[:4])
    monkeypatch.setattr(_launch, "_INTERPRET", False)
    assert not supports(o.cpu(), gl.cpu(), w.cpu())


def test_impl_triton_raises_and_auto_falls_back():
    o, gl, w, b = (t.double() for t in _inputs(3, 16, 8, gen(6), torch.float32))
    with pytest.raises(NotImplementedError, match="gated_output"):
        K.gated_output(o, gl, w, b, impl="triton")
    torch.testing.assert_close(K.gated_output(o, gl, w, b, impl="auto"), gated_output_reference(o, gl, w, b))


def test_auto_uses_triton_where_supported():
    ins = _inputs(9, 32, 16, gen(7), torch.bfloat16)
    assert torch.equal(K.gated_output(*ins, impl="auto"), gated_output_triton(*ins))


def test_torch_compile_fullgraph():
    g = gen(8)
    ins = _inputs(14, 32, 16, g, torch.float32)
    dy = randn(2, 7, 16, g=g)

    def f(o, gl, w, b):
        return K.gated_output(o.view(2, 7, 32) * 2.0, gl.view(2, 7, 32), w, b, impl="triton") + 1.0

    eager, comp = leaves(*ins), leaves(*ins)
    f(*eager).backward(dy)
    torch.compile(f, fullgraph=True, backend="aot_eager")(*comp).backward(dy)
    for a, c in zip(eager, comp):
        assert torch.equal(a.grad, c.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GATED_OUTPUT_SHAPES, ids=[s.name for s in GATED_OUTPUT_SHAPES])
def test_canonical_shapes_gpu(shape):
    g = gen(9)
    o, gl, w, b = _inputs(shape.rows, shape.c_in, shape.c_out, g, torch.bfloat16)
    _check(o, gl, w.float(), b.float(), randn(shape.rows, shape.c_out, g=g, dtype=torch.bfloat16), name=shape.name)
