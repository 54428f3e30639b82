"""Triton transition (foldforge.kernels.transition, impl="triton"): LayerNorm -> up -> ReLU | SwiGLU -> down
with the hidden activation recomputed in backward. Outputs and the gradients of x, the LayerNorm weight/bias
and both linear weights/biases against the reference under the three-way rule, fp32 and bf16, strided
inputs, autocast, determinism, supports() and dispatch. On the CPU the kernels run in the interpreter."""
import pytest
import torch

from foldforge import kernels as K
from foldforge.bench.shapes import TRANSITION_SHAPES
from foldforge.kernels import _launch
from foldforge.kernels.transition import TransitionParams, supports, transition_reference, transition_triton
from foldforge.testing import assert_close_to_reference
from tests.kernels._triton_env import DEVICE, F64, HAS_CUDA, gen, interpreter_scope, leaves, randn


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    yield from interpreter_scope()


# (c, n, rows): every AF2/AF3 width; the hidden width n c and the row count shrink as c grows (interpreter)
CASES = ((8, 4, 1), (8, 4, 1000), (16, 4, 7), (64, 4, 37), (128, 4, 7), (256, 2, 5), (384, 2, 3), (768, 1, 2))


def _params(c, n, g, dtype, activation, bias=True, ln_affine=True):
    h = n * c
    h1 = 2 * h if activation == "swiglu" else h
    return TransitionParams(
        randn(c, g=g, dtype=dtype, shift=1.0) if ln_affine else None,
        randn(c, g=g, dtype=dtype) if ln_affine else None,
        randn(h1, c, g=g, dtype=dtype, scale=c ** -0.5),
        randn(h1, g=g, dtype=dtype, scale=0.5) if bias else None,
        randn(c, h, g=g, dtype=dtype, scale=h ** -0.5),
        randn(c, g=g, dtype=dtype) if bias else None)


def _check(x, p, dy, activation, *, name, autocast=False):
    """Kernel vs reference in the low precision vs reference in fp64, for y and every gradient."""
    ker, ref, hp = leaves(x, *p), leaves(x, *p), leaves(x, *p, dtype=F64)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        y = transition_triton(ker[0], TransitionParams(*ker[1:]), activation=activation)
        y_ref = transition_reference(ref[0], TransitionParams(*ref[1:]), activation=activation)
    y.backward(dy)
    y_ref.backward(dy)
    y_hp = transition_reference(hp[0], TransitionParams(*hp[1:]), activation=activation)
    y_hp.backward(dy.to(F64))
    assert y.dtype == y_ref.dtype == dy.dtype and y.shape == y_ref.shape == x.shape
    assert_close_to_reference(y, y_ref, y_hp, name=f"{name} y")
    for label, a, r, h in zip(("dx",) + TransitionParams._fields, ker, ref, hp):
        if a is not None:
            assert a.grad is not None and a.grad.dtype == a.dtype and a.grad.shape == a.shape, label
            assert_close_to_reference(a.grad, r.grad, h.grad, name=f"{name} d{label}")


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"c{c}n{n}r{r}" for c, n, r in CASES])
def test_matches_reference(case, dtype, activation):
    c, n, rows = case
    if dtype == torch.float32 and HAS_CUDA:
        # supports() is False for fp32 GEMMs (the reference runs): one IEEE FMA chain per up-projection
        # measured ~4x eager fp32's error on an H200. test_fp32_gpu checks the routing.
        pytest.skip("fp32 GEMMs are not routed to the kernel on the GPU")
    if dtype == torch.float32 and c > 256:
        # measured in the interpreter: fp32 kernel/eager error ratios of 1.1-2.4 at c = 384-768 over 6 seeds
        # (three chained fp32 products, vs MKL's sgemm); not the training precision. GPU: test_fp32_gpu.
        pytest.skip("fp32 at c > 256 sits at the three-way bound in the interpreter")
    if rows == 1000 and activation == "swiglu" and not HAS_CUDA:
        rows = 129            # interpreter time; 1000 rows are covered by ReLU
    g = gen(c * 7 + rows)
    x = randn(rows, c, g=g, dtype=dtype, scale=2.0, shift=0.5)
    p = _params(c, n, g, dtype, activation)
    _check(x, p, randn(rows, c, g=g, dtype=dtype), activation, name=f"{activation} [{rows},{c}] n={n} {dtype}")


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_optional_parameters(activation):
    """The model's SwiGLU has no biases; LayerNorm without affine parameters as well."""
    g = gen(1)
    x = randn(9, 32, g=g, dtype=torch.bfloat16)
    dy = randn(9, 32, g=g, dtype=torch.bfloat16)
    _check(x, _params(32, 2, g, torch.bfloat16, activation, bias=False), dy, activation, name="no biases")
    _check(x, _params(32, 2, g, torch.bfloat16, activation, ln_affine=False), dy, activation, name="no LN affine")


def test_strided_pair_input():
    """The pair tensor transposed in its residue dims ([B, L, L, c] -> [B, L', L, c]) is read in place."""
    g = gen(3)
    x = randn(2, 5, 5, 32, g=g, dtype=torch.bfloat16).transpose(1, 2)
    assert not x.is_contiguous() and _launch.row_layout(x) is not None
    _check(x, _params(32, 4, g, torch.bfloat16, "relu"), randn(2, 5, 5, 32, g=g, dtype=torch.bfloat16), "relu",
           name="pair transposed")


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_autocast_fp32_activations_fp32_weights(activation):
    """Under bf16 autocast the reference projects in bf16 from fp32 x and fp32 master weights; so do we."""
    g = gen(2)
    x = randn(19, 64, g=g, dtype=torch.float32)
    _check(x, _params(64, 2, g, torch.float32, activation), randn(19, 64, g=g, dtype=torch.bfloat16), activation,
           name="autocast", autocast=True)


def test_backward_is_deterministic():
    g = gen(4)
    x = randn(300, 32, g=g, dtype=torch.bfloat16)
    p = _params(32, 4, g, torch.bfloat16, "swiglu")
    dy = randn(300, 32, g=g, dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        xs = leaves(x, *p)
        transition_triton(xs[0], TransitionParams(*xs[1:]), activation="swiglu").backward(dy)
        grads.append([t.grad.clone() for t in xs if t is not None])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_supports_false_cases(monkeypatch):
    g = gen(5)
    x = randn(4, 16, g=g, dtype=torch.bfloat16)
    p = _params(16, 4, g, torch.float32, "relu")
    ps = _params(16, 4, g, torch.float32, "swiglu")
    assert supports(x, p, "relu") and supports(x, ps, "swiglu")
    assert not supports(x.float(), p, "relu")                               # fp32 GEMM: the reference runs
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert supports(x.float(), p, "relu")                               # ... bf16 under autocast
    assert not supports(x, p, "swiglu")                                       # [64, 16] is [2 * 32, 16]: ...
    assert supports(x, p._replace(linear_2_weight=randn(16, 32, g=g)), "swiglu")   # ... valid with a 32-wide W2
    assert not supports(x, p, "gelu")
    assert not supports(x.double(), p, "relu")
    assert not supports(randn(4, 8, g=g), p, "relu")                         # c mismatch
    assert not supports(x, p._replace(linear_2_weight=randn(16, 32, g=g)), "relu")
    assert not supports(x, p._replace(linear_1_bias=randn(8, g=g)), "relu")
    assert not supports(x, p._replace(layer_norm_weight=randn(8, g=g)), "relu")
    assert not supports(randn(2, 1025, g=g, dtype=torch.bfloat16), _params(1025, 1, g, torch.float32, "relu"),
                        "relu")
    monkeypatch.setattr(_launch, "_INTERPRET", False)
    assert not supports(x.cpu(), TransitionParams(*(t if t is None else t.cpu() for t in p)), "relu")


def test_impl_triton_raises_and_auto_falls_back():
    g = gen(6)
    x = randn(3, 16, g=g, dtype=F64)
    p = _params(16, 2, g, F64, "relu")
    with pytest.raises(NotImplementedError, match="transition"):
        K.transition(x, p, impl="triton")
    torch.testing.assert_close(K.transition(x, p, impl="auto"), transition_reference(x, p))
    with pytest.raises(ValueError, match="activation"):
        K.transition(x, p, activation="gelu", impl="auto")


def test_auto_picks_triton_off_cuda_and_the_reference_on_cuda():
    """impl="auto" keeps the reference transition on CUDA, where the Triton one measured slower; elsewhere
    (the interpreter) it takes Triton wherever supported."""
    g = gen(7)
    x = randn(9, 24, g=g, dtype=torch.bfloat16)
    p = _params(24, 2, g, torch.bfloat16, "swiglu")
    chosen = transition_reference if x.is_cuda else transition_triton
    assert torch.equal(K.transition(x, p, activation="swiglu", impl="auto"), chosen(x, p, activation="swiglu"))


def test_torch_compile_fullgraph():
    g = gen(8)
    x = randn(14, 16, g=g, dtype=torch.bfloat16)
    p = _params(16, 2, g, torch.bfloat16, "relu")
    dy = randn(2, 7, 16, g=g, dtype=torch.bfloat16)

    def f(x, *ps):
        return K.transition(x.view(2, 7, 16) * 2.0, TransitionParams(*ps), impl="triton") + 1.0

    eager, comp = leaves(x, *p), leaves(x, *p)
    f(*eager).backward(dy)
    torch.compile(f, fullgraph=True, backend="aot_eager")(*comp).backward(dy)
    for a, c in zip(eager, comp):
        assert torch.equal(a.grad, c.grad)


# ---------------------------------------------------------------- GPU: canonical shapes
@pytest.mark.gpu
@pytest.mark.parametrize("shape", TRANSITION_SHAPES, ids=[s.name for s in TRANSITION_SHAPES])
def test_canonical_shapes_gpu(shape):
    g = gen(9)
    x = randn(shape.rows, shape.c, g=g, dtype=torch.bfloat16, scale=2.0, shift=0.5)
    p = TransitionParams(*(t.float() if t is not None else None
                           for t in _params(shape.c, shape.n, g, torch.bfloat16, shape.activation)))  # fp32 masters
    _check(x, p, randn(shape.rows, shape.c, g=g, dtype=torch.bfloat16), shape.activation, name=shape.name)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_fp32_routes_to_reference(activation):
    """fp32 GEMMs are not the kernel's (see transition.supports): impl="auto" gives the reference's
    result bit for bit, and impl="triton" refuses."""
    g = gen(10)
    x = randn(33, 32, g=g)
    p = _params(32, 2, g, torch.float32, activation)
    assert not supports(x, p, activation)
    assert torch.equal(K.transition(x, p, activation=activation, impl="auto"),
                       transition_reference(x, p, activation=activation))
    with pytest.raises(NotImplementedError, match="transition"):
        K.transition(x, p, activation=activation, impl="triton")


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_tails_and_splits_stay_in_bounds(activation):
    """Row count off every block size, several row tiles per dx program and several dW row splits (forced
    through small tiles), every operand a view into a NaN-filled buffer: a read past a row, a hidden slice or
    the last row picks up NaN, which reaches an output or gradient; the check runs on fp32 master weights."""
    if HAS_CUDA:
        pytest.skip("interpreter-scale guard test")
    from foldforge.kernels import _transition_triton as T
    g = gen(11)
    rows, c, n = 101, 24, 2     # 7 row tiles: 4 dx programs of 2 tiles; 2 dW splits of 4
    pad = lambda t: torch.nn.functional.pad(t, (0, 8, 0, 3), value=float("nan"))[: t.shape[0], : t.shape[1]]  # noqa: E731
    x = pad(randn(rows, c, g=g, dtype=torch.bfloat16))
    p = TransitionParams(*(t if t is None or t.dim() == 1 else pad(t) for t in _params(c, n, g, torch.float32, activation)))
    dy = randn(rows, c, g=g, dtype=torch.bfloat16)
    cfg = {"fwd": {"BLOCK_M": 16, "BLOCK_H": 16, "num_warps": 4, "num_stages": 1},
           "bwd_dx": {"BLOCK_M": 16, "BLOCK_H": 16, "num_warps": 4, "num_stages": 1, "programs_per_sm": 1},
           "bwd_dw": {"BLOCK_M": 16, "BLOCK_H": 16, "num_warps": 4, "num_stages": 1, "programs_per_sm": 2}}
    orig = T.config
    T.config = lambda *a: cfg
    try:
        _check(x, p, dy, activation, name=f"guard {activation}")
    finally:
        T.config = orig
