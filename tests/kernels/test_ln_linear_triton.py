"""Triton Linear(LayerNorm(x)) (foldforge.kernels.ln_linear, impl="triton"), both designs ("fused": LN in
the GEMM prologue, "hybrid": transient LN output + cuBLAS): outputs and gradients of x, the LayerNorm
weight/bias and the linear weight/bias against the reference under the three-way rule, autocast,
strided inputs, determinism, supports() and dispatch. On the CPU the kernels run in the interpreter."""
import pytest
import torch

from foldforge import kernels as K
from foldforge.bench.shapes import LN_LINEAR_SHAPES
from foldforge.kernels import _launch
from foldforge.kernels.ln_linear import ln_linear_reference, ln_linear_triton, supports
from foldforge.testing import assert_close_to_reference
from tests.kernels._triton_env import DEVICE, F64, HAS_CUDA, gen, interpreter_scope, leaves, randn



@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    yield from interpreter_scope()


# (C_in, C_out): every AF2/AF3 width, with output widths from 4 heads to the 128 -> 512 projections
WIDTHS = ((8, 4), (16, 8), (64, 64), (128, 40), (256, 8), (384, 48), (768, 32))
ROWS = (1, 7, 1000)


@pytest.fixture
def design(request):
    """Force one design through the tuned table of this device for the test's duration."""
    from foldforge.kernels import _ln_linear_triton as T
    name = request.param
    slug = _launch.gpu_slug(DEVICE)
    saved = _launch._TABLES.get(slug)

    def force(k, n, **overrides):
        cfg = T.default_config(k, n)
        cfg["design"] = name
        cfg.update(overrides)
        _launch.set_tuned_override(slug, {"ln_linear": {T.bucket(k, n): cfg}})
    force.name = name
    yield force
    _launch.set_tuned_override(slug, saved)


def _inputs(rows, k, n, g, dtype, bias=True, ln_affine=True):
    x = randn(rows, k, g=g, dtype=dtype, scale=2.0, shift=0.5)
    lw = randn(k, g=g, dtype=dtype, shift=1.0) if ln_affine else None
    lb = randn(k, g=g, dtype=dtype) if ln_affine else None
    w = randn(n, k, g=g, dtype=dtype, scale=k ** -0.5)
    b = randn(n, g=g, dtype=dtype) if bias else None
    return x, lw, lb, w, b


def _check(x, lw, lb, w, b, dy, *, name, autocast=False):
    """Kernel vs reference in the low precision vs reference in fp64, for y and every gradient."""
    ker = leaves(x, lw, lb, w, b)
    ref = leaves(x, lw, lb, w, b)
    hp = leaves(x, lw, lb, w, b, dtype=F64)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        y = ln_linear_triton(*ker)
        y_ref = ln_linear_reference(*ref)
    y.backward(dy)
    y_ref.backward(dy)
    y_hp = ln_linear_reference(*hp)
    y_hp.backward(dy.to(F64))
    assert y.dtype == y_ref.dtype == dy.dtype and y.shape == y_ref.shape
    assert_close_to_reference(y, y_ref, y_hp, name=f"{name} y")
    for label, a, r, h in zip(("dx", "d_ln_w", "d_ln_b", "dw", "db"), ker, ref, hp):
        if a is not None:
            assert a.grad.dtype == a.dtype and a.grad.shape == a.shape
            assert_close_to_reference(a.grad, r.grad, h.grad, name=f"{name} {label}")


@pytest.mark.parametrize("design", ["fused", "hybrid"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kn", WIDTHS, ids=[f"{k}x{n}" for k, n in WIDTHS])
def test_matches_reference(kn, rows, dtype, design):
    k, n = kn
    if k > 256 and design.name == "fused":
        pytest.skip("C_in > 256 always runs the hybrid design (covered by the hybrid case)")
    if rows == 1000 and not HAS_CUDA and k != 64:
        rows = 200            # interpreter time; 1000 rows are covered at 64 -> 64
    design(k, n)              # K > 256 falls back to "hybrid" whichever is asked for
    g = gen(k * 13 + rows)
    x, lw, lb, w, b = _inputs(rows, k, n, g, dtype)
    _check(x, lw, lb, w, b, randn(rows, n, g=g, dtype=dtype), name=f"[{rows},{k}->{n}] {dtype}")


@pytest.mark.parametrize("design", ["fused"], indirect=True)
@pytest.mark.parametrize("fuse_dw", [True, False], ids=["dw_in_dx_kernel", "dw_kernel"])
def test_fused_dw_paths(design, fuse_dw):
    """Few output columns: dW/db accumulated inside the dx kernel, or by the separate dW kernel."""
    design(32, 8, fuse_dw=fuse_dw)
    g = gen(8)
    x, lw, lb, w, b = _inputs(300, 32, 8, g, torch.bfloat16)
    _check(x, lw, lb, w, b, randn(300, 8, g=g, dtype=torch.bfloat16), name=f"fuse_dw={fuse_dw}")


@pytest.mark.parametrize("design", ["fused", "hybrid"], indirect=True)
def test_optional_parameters(design):
    g = gen(1)
    design(32, 16)
    x, _, _, w, _ = _inputs(7, 32, 16, g, torch.bfloat16)
    dy = randn(7, 16, g=g, dtype=torch.bfloat16)
    _check(x, None, None, w, None, dy, name="no LN affine, no bias")
    x, lw, lb, w, b = _inputs(7, 32, 16, g, torch.bfloat16)
    _check(x, lw, None, w, b, dy, name="LN weight only")


@pytest.mark.parametrize("design", ["fused", "hybrid"], indirect=True)
def test_autocast_fp32_activations_fp32_weights(design):
    """Under bf16 autocast the reference projects in bf16 from fp32 x and fp32 master weights; so do we."""
    g = gen(2)
    design(64, 24)
    x, lw, lb, w, b = _inputs(33, 64, 24, g, torch.float32)
    _check(x, lw, lb, w, b, randn(33, 24, g=g, dtype=torch.bfloat16), name="autocast", autocast=True)


@pytest.mark.parametrize("design", ["fused", "hybrid"], indirect=True)
def test_strided_pair_input(design):
    """The pair tensor transposed in its residue dims ([B, L, L, c] -> [B, L', L, c]) is read in place."""
    g = gen(3)
    design(32, 8)
    x = randn(2, 9, 9, 32, g=g, dtype=torch.bfloat16).transpose(1, 2)
    assert not x.is_contiguous() and _launch.row_layout(x) is not None
    _, lw, lb, w, b = _inputs(1, 32, 8, g, torch.bfloat16)
    _check(x, lw, lb, w, b, randn(2, 9, 9, 8, g=g, dtype=torch.bfloat16), name="pair transposed")


@pytest.mark.parametrize("design", ["fused", "hybrid"], indirect=True)
def test_backward_is_deterministic(design):
    g = gen(4)
    design(64, 48)
    ins = _inputs(1000, 64, 48, g, torch.bfloat16)
    dy = randn(1000, 48, g=g, dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        xs = leaves(*ins)
        ln_linear_triton(*xs).backward(dy)
        grads.append([t.grad.clone() for t in xs])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_supports_false_cases(monkeypatch):
    x = torch.randn(4, 64, device=DEVICE)
    w = torch.randn(16, 64, device=DEVICE)
    v = torch.ones(64, device=DEVICE)
    assert supports(x, w, v, v, torch.zeros(16, device=DEVICE)) and supports(x, w)
    assert not supports(x.double(), w)
    assert not supports(x, w.double())
    assert not supports(x, torch.randn(16, 32, device=DEVICE))         # C_in mismatch
    assert not supports(x, torch.randn(64, device=DEVICE))             # weight not 2-D
    assert not supports(torch.randn(4, 1025, device=DEVICE), torch.randn(8, 1025, device=DEVICE))
    assert not supports(x, w, torch.ones(32, device=DEVICE))           # LN weight of the wrong width
    assert not supports(x, w, None, None, torch.zeros(8, device=DEVICE))   # bias of the wrong width
    monkeypatch.setattr(_launch, "_INTERPRET", False)
    assert not supports(torch.randn(4, 64), torch.randn(16, 64))


def test_impl_triton_raises_and_auto_falls_back():
    x = torch.randn(3, 64, dtype=F64, device=DEVICE)
    w = torch.randn(8, 64, dtype=F64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="ln_linear"):
        K.ln_linear(x, None, None, w, None, impl="triton")
    torch.testing.assert_close(K.ln_linear(x, None, None, w, None, impl="auto"),
                               ln_linear_reference(x, None, None, w, None))


def test_auto_uses_triton_where_supported():
    g = gen(5)
    x, lw, lb, w, b = _inputs(9, 48, 16, g, torch.bfloat16)
    assert torch.equal(K.ln_linear(x, lw, lb, w, b, impl="auto"), ln_linear_triton(x, lw, lb, w, b))


def test_torch_compile_fullgraph():
    g = gen(6)
    ins = _inputs(14, 32, 16, g, torch.float32)
    dy = randn(2, 7, 16, g=g)

    def f(x, lw, lb, w, b):
        return K.ln_linear(x.view(2, 7, 32) * 2.0, lw, lb, w, b, impl="triton") + 1.0

    eager, comp = leaves(*ins), leaves(*ins)
    f(*eager).backward(dy)
    torch.compile(f, fullgraph=True, backend="aot_eager")(*comp).backward(dy)
    for a, c in zip(eager, comp):
        assert torch.equal(a.grad, c.grad)


# ---------------------------------------------------------------- GPU: canonical shapes
@pytest.mark.gpu
@pytest.mark.parametrize("design", ["fused", "hybrid"], indirect=True)
@pytest.mark.parametrize("shape", LN_LINEAR_SHAPES, ids=[s.name for s in LN_LINEAR_SHAPES])
def test_canonical_shapes_gpu(shape, design):
    design(shape.c_in, shape.c_out)
    g = gen(7)
    x, lw, lb, w, b = _inputs(shape.rows, shape.c_in, shape.c_out, g, torch.bfloat16)
    lw, lb, w, b = (t.float() for t in (lw, lb, w, b))                  # fp32 master weights
    _check(x, lw, lb, w, b, randn(shape.rows, shape.c_out, g=g, dtype=torch.bfloat16), name=shape.name)
