"""Triton outer product mean (foldforge.kernels.outer_product_mean, impl="triton"): output and the gradients
of m and of every weight against the reference under the three-way rule (fp64 / same low precision), padded
MSA masks, chunked backward, torch.compile, determinism, supports() and dispatch. On the CPU the kernels run
in the Triton interpreter."""
import pytest
import torch

from foldforge import kernels as K
from foldforge.kernels import _outer_product_mean_triton as T
from foldforge.kernels.outer_product_mean import (
    OPMParams,
    outer_product_mean_reference,
    outer_product_mean_triton,
    supports,
)
from foldforge.testing import assert_close_to_reference
from tests.kernels._triton_env import DEVICE, F64, gen, interpreter_scope, leaves, randn


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    yield from interpreter_scope()


def _params(c_m, c, c_z, g, dtype=torch.float32):
    shapes = ((c_m,), (c_m,), (c, c_m), (c,), (c, c_m), (c,), (c_z, c * c), (c_z,))
    out = []
    for i, s in enumerate(shapes):
        scale = s[1] ** -0.5 if len(s) == 2 else 0.3
        out.append(randn(*s, g=g, dtype=dtype, scale=scale, shift=1.0 if i == 0 else 0.0))
    return OPMParams(*out)


def _msa_mask(b, s, length, g):
    """Padded residues (last quarter of the last batch entry), padded MSA rows and random holes."""
    mask = torch.rand(b, s, length, generator=g) > 0.2
    mask[-1, :, length - length // 4:] = False
    mask[-1, s - s // 3:, :] = False
    return mask.to(DEVICE)


def _check(m, mask, params, dy, *, name):
    lowp = m.dtype
    ker = leaves(m, *params)
    out = outer_product_mean_triton(ker[0], mask, OPMParams(*ker[1:]))
    out.backward(dy)
    ref = leaves(m, *params)
    out_ref = outer_product_mean_reference(ref[0], mask, OPMParams(*ref[1:]))
    out_ref.backward(dy)
    hp = leaves(m, *params, dtype=F64)
    out_hp = outer_product_mean_reference(hp[0], mask, OPMParams(*hp[1:]))
    out_hp.backward(dy.to(F64))
    assert out.dtype == lowp and out.shape == out_ref.shape
    assert_close_to_reference(out, out_ref, out_hp, name=f"{name} out")
    for label, a, r, h in zip(("dm",) + tuple(f"d{f}" for f in OPMParams._fields), ker, ref, hp):
        assert a.grad.dtype == a.dtype
        assert_close_to_reference(a.grad, r.grad, h.grad, name=f"{name} {label}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [1, 7, 37])
def test_matches_reference(length, dtype):
    g = gen(10 + length)
    b, s, c_m, c, c_z = (2, 5, 24, 8, 16) if length < 37 else (1, 16, 32, 8, 32)
    m = randn(b, s, length, c_m, g=g, dtype=dtype, scale=2.0, shift=0.3)
    mask = _msa_mask(b, s, length, g) if length > 1 else None
    dy = randn(b, length, length, c_z, g=g, dtype=dtype)
    _check(m, mask, _params(c_m, c, c_z, g), dy, name=f"L={length} {dtype}")


@pytest.mark.parametrize("c", [32, 12])
def test_hidden_widths(c):
    """c_hidden = 32 (AF2/AF3; 4 x 4 residue tiles) and a non-power-of-two width (padded to 16)."""
    g = gen(c)
    m = randn(1, 6, 9, 16, g=g, dtype=torch.bfloat16)
    _check(m, _msa_mask(1, 6, 9, g), _params(16, c, 16, g), randn(1, 9, 9, 16, g=g, dtype=torch.bfloat16),
           name=f"c={c}")


def test_chunked_backward(monkeypatch):
    """Several residue chunks in the backward (the [chunk, L, C*C] buffers), bf16 weights, sliced MSA."""
    monkeypatch.setattr(T, "CHUNK_ELEMENTS", 3 * 13 * 64)          # 3 residues per chunk at L = 13, C = 8
    assert T.chunk_rows(13, 8, 1) == 3
    g = gen(3)
    m = randn(1, 7, 13, 40, g=g, dtype=torch.bfloat16)[..., 4:36]    # rows padded in memory
    assert not m.is_contiguous()
    _check(m, _msa_mask(1, 7, 13, g), _params(32, 8, 16, g, torch.bfloat16),
           randn(1, 13, 13, 16, g=g, dtype=torch.bfloat16), name="chunked")


def test_grouped_block_order(monkeypatch):
    """Groups of 3 i blocks (the last group short: 10 blocks at L = 37) walk the j blocks together; every
    (i, j) block is computed once (compared against the reference like any other shape), the batch on axis 1."""
    cfg = {**T.default_config(8), "BI": 4, "BJ": 4, "GROUP": 3}
    assert T.fwd_grid(2, 37, cfg) == (100, 2)
    monkeypatch.setattr(T, "config", lambda device, c: cfg)
    g = gen(11)
    m = randn(2, 5, 37, 16, g=g, dtype=torch.bfloat16, scale=2.0)
    _check(m, _msa_mask(2, 5, 37, g), _params(16, 8, 16, g), randn(2, 37, 37, 16, g=g, dtype=torch.bfloat16),
           name="grouped order")


def test_backward_is_deterministic():
    g = gen(4)
    m, p = randn(1, 9, 20, 16, g=g, dtype=torch.bfloat16), _params(16, 8, 16, g)
    dy = randn(1, 20, 20, 16, g=g, dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        xs = leaves(m, *p)
        outer_product_mean_triton(xs[0], None, OPMParams(*xs[1:])).backward(dy)
        grads.append([t.grad.clone() for t in xs])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_supports_false_cases():
    g = gen(5)
    m, p = randn(1, 3, 5, 16, g=g), _params(16, 8, 16, g)
    assert supports(m, None, p) and supports(m, torch.ones(1, 3, 5, device=DEVICE), p)
    assert not supports(m.double(), None, p)
    assert not supports(m, None, _params(16, 64, 16, g))                     # c_hidden > 32
    assert not supports(m, torch.ones(1, 3, 4, device=DEVICE), p)
    assert not supports(m, None, p._replace(linear_out_bias=None))
    assert not supports(m, None, p._replace(linear_out_weight=p.linear_out_weight[:, :32]))


def test_dispatch_auto_and_triton():
    g = gen(6)
    m, p = randn(1, 3, 6, 16, g=g), _params(16, 8, 16, g)
    assert torch.equal(K.outer_product_mean(m, None, p, impl="auto"), outer_product_mean_triton(m, None, p))
    md, pd = m.double(), OPMParams(*[t.double() for t in p])
    with pytest.raises(NotImplementedError, match="outer_product_mean"):
        K.outer_product_mean(md, None, pd, impl="triton")
    torch.testing.assert_close(K.outer_product_mean(md, None, pd, impl="auto"),
                               outer_product_mean_reference(md, None, pd))


def test_torch_compile_fullgraph():
    g = gen(7)
    m, p = randn(1, 4, 7, 16, g=g), _params(16, 8, 16, g)
    mask = _msa_mask(1, 4, 7, g)
    dy = randn(1, 7, 7, 16, g=g)

    def f(m, *params):
        return K.outer_product_mean(m * 1.5, mask, OPMParams(*params), impl="triton") + 1.0

    eager, comp = leaves(m, *p), leaves(m, *p)
    f(*eager).backward(dy)
    torch.compile(f, fullgraph=True, backend="aot_eager")(*comp).backward(dy)
    for a, c in zip(eager, comp):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- GPU: canonical shapes
@pytest.mark.gpu
@pytest.mark.parametrize("s, c_m", [(128, 256), (1024, 64)], ids=["evoformer_128x256", "extra_msa_1024x256"])
def test_canonical_shapes_gpu(s, c_m):
    """AF2 Evoformer OPM (128 rows x 256 residues, c_m 256) and extra-MSA OPM (1024 x 256, c_e 64):
    c_hidden 32 -> c_z 128, bf16 activations, fp32 weights."""
    g = gen(8)
    m = randn(1, s, 256, c_m, g=g, dtype=torch.bfloat16, scale=2.0)
    dy = randn(1, 256, 256, 128, g=g, dtype=torch.bfloat16)
    _check(m, _msa_mask(1, s, 256, g), _params(c_m, 32, 128, g), dy, name=f"{s}x256 c_m={c_m}")
