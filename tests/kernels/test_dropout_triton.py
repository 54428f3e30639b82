"""Triton residual add with shared dropout (foldforge.kernels.bias_dropout_residual, impl="triton"): the mask
is shared along the right axis, reproducible with a fixed generator and different with another seed,
keep-rate ~ 1 - p, output and d(update) = mask * scale under the three-way rule with the kernel's own mask
(shapes covering the per-row path, mask tiles reused over runs of rows i or of j tiles, and unmasked
power-of-two tiles), d(x) = dY, strided inputs, eval/p = 0 identity, supports() and dispatch."""
import pytest
import torch

from foldforge import kernels as K
from foldforge.bench.shapes import DROPOUT_SHAPES
from foldforge.kernels.dropout import bias_dropout_residual_reference, supports
from foldforge.testing import assert_close_to_reference
from tests.kernels._triton_env import DEVICE, F64, gen, interpreter_scope, leaves, randn


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    yield from interpreter_scope()


def _dev_gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _mask(shape, p, shared_dim, seed, dtype=torch.float32):
    """The kernel's keep mask times the scale, read off with x = 0 and update = 1."""
    x = torch.zeros(shape, dtype=dtype, device=DEVICE)
    return K.bias_dropout_residual(x, torch.ones_like(x), p=p, shared_dim=shared_dim, training=True,
                                   generator=_dev_gen(seed), impl="triton")


@pytest.mark.parametrize("shared_dim", [-3, -2, None], ids=["row", "col", "none"])
def test_mask_shared_along_axis_and_keep_rate(shared_dim):
    p = 0.25
    m = _mask((2, 40, 48, 16), p, shared_dim, 0)
    assert set(m.unique().tolist()) <= {0.0, torch.tensor(1.0 / (1.0 - p)).item()}   # fp32 scale
    if shared_dim is not None:
        assert torch.equal(m, m.narrow(shared_dim, 0, 1).expand_as(m))
        other = -2 if shared_dim == -3 else -3
        assert not torch.equal(m, m.narrow(other, 0, 1).expand_as(m))       # varies along the other axis
        assert not torch.equal(m[0], m[1])                                   # and over the batch
    else:
        assert not torch.equal(m, m[:, :1].expand_as(m)) and not torch.equal(m, m[:, :, :1].expand_as(m))
    keep = (m > 0).float().mean().item()
    assert abs(keep - (1 - p)) < 0.03, keep


@pytest.mark.parametrize("width", [8, 16, 64, 128, 256, 384, 768])
def test_reproducible_and_seed_dependent(width):
    shape = (3, 5, width) if width >= 256 else (4, 6, width)
    a, b, c = _mask(shape, 0.15, -3, 7), _mask(shape, 0.15, -3, 7), _mask(shape, 0.15, -3, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shared_dim", [-3, -2, None], ids=["row", "col", "none"])
@pytest.mark.parametrize("dims", [(1, 1, 8), (7, 7, 16), (3, 37, 64), (2, 5, 768), (1000, 1, 16), (4, 16, 32),
                                  (2, 2000, 16)], ids=lambda d: "x".join(map(str, d)))
def test_matches_reference_with_kernel_mask(dims, shared_dim, dtype):
    """out = x + update * mask and d(update) = dY * mask against x + update * mask computed in the low
    precision and in fp64 (mask = the kernel's, read off with the same generator seed)."""
    p = 0.3
    g = gen(sum(dims))
    x, u, dy = (randn(*dims, g=g, dtype=dtype) for _ in range(3))
    mask = _mask(dims, p, shared_dim, 3, dtype=torch.float32)
    xk, uk = leaves(x, u)
    out = K.bias_dropout_residual(xk, uk, p=p, shared_dim=shared_dim, training=True, generator=_dev_gen(3),
                                  impl="triton")
    out.backward(dy)
    (xr, ur), (xh, uh) = leaves(x, u), leaves(x, u, dtype=F64)
    ref = xr + ur * mask.to(dtype)
    ref.backward(dy)
    hp = xh + uh * mask.to(F64)
    hp.backward(dy.to(F64))
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to_reference(out, ref, hp, name="out")
    assert_close_to_reference(uk.grad, ur.grad, uh.grad, name="d update")
    assert torch.equal(xk.grad, dy)


def test_strided_inputs():
    g = gen(4)
    x = randn(2, 9, 9, 32, g=g, dtype=torch.bfloat16).transpose(1, 2)      # pair transposed in place
    u = randn(2, 9, 9, 64, g=g, dtype=torch.bfloat16)[..., ::1][..., :32]   # row stride 64
    assert not x.is_contiguous() and not u.is_contiguous()
    mask = _mask(x.shape, 0.25, -2, 5)
    out = K.bias_dropout_residual(x, u, p=0.25, shared_dim=-2, training=True, generator=_dev_gen(5),
                                  impl="triton")
    assert torch.equal(out, (x.float() + u.float() * mask).to(torch.bfloat16))


def test_eval_p0_p1_and_bad_p():
    g = gen(5)
    x, u = randn(3, 4, 16, g=g), randn(3, 4, 16, g=g)
    assert torch.equal(K.bias_dropout_residual(x, u, p=0.5, shared_dim=-3, training=False, impl="triton"), x + u)
    assert torch.equal(K.bias_dropout_residual(x, u, p=0.0, shared_dim=None, training=True, impl="triton"), x + u)
    assert torch.equal(K.bias_dropout_residual(x, u, p=1.0, shared_dim=-3, training=True, impl="triton",
                                               generator=_dev_gen(0)), x)
    with pytest.raises(ValueError):
        K.bias_dropout_residual(x, u, p=1.5, shared_dim=None, training=True, impl="triton")


def test_supports_dispatch_and_reference_default():
    g = gen(6)
    x, u = randn(3, 4, 16, g=g), randn(3, 4, 16, g=g)
    assert supports(x, u, -3) and supports(x, u, -2) and supports(x, u, None) and supports(x, u, 0)
    assert not supports(x, u, -1)                       # sharing along channels: not a layout we generate
    assert not supports(x, u.double(), -3) and not supports(x[:1], u, -3)
    with pytest.raises(NotImplementedError, match="dropout"):
        K.bias_dropout_residual(x.double(), u.double(), p=0.5, shared_dim=-3, training=True, impl="triton")
    # default impl stays the reference (its own generator stream)
    got = K.bias_dropout_residual(x, u, p=0.5, shared_dim=-3, training=True, generator=_dev_gen(1))
    assert torch.equal(got, bias_dropout_residual_reference(x, u, p=0.5, shared_dim=-3, training=True,
                                                            generator=_dev_gen(1)))
    auto = K.bias_dropout_residual(x, u, p=0.5, shared_dim=-3, training=True, generator=_dev_gen(2), impl="auto")
    assert torch.equal(auto, K.bias_dropout_residual(x, u, p=0.5, shared_dim=-3, training=True,
                                                     generator=_dev_gen(2), impl="triton"))


def test_torch_compile_fullgraph():
    """Under torch.compile the seed comes from the default generator (dynamo does not trace a Generator
    argument); the same global seed gives the same mask in eager and compiled code."""
    g = gen(7)
    x, u, dy = randn(2, 6, 16, g=g), randn(2, 6, 16, g=g), randn(2, 6, 16, g=g)

    def f(x, u):
        return K.bias_dropout_residual(x * 2.0, u, p=0.25, shared_dim=-3, training=True, impl="triton") + 1.0

    eager, comp = leaves(x, u), leaves(x, u)
    torch.manual_seed(0)
    out = f(*eager)
    out.backward(dy)
    torch.manual_seed(0)
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*comp)
    out_c.backward(dy)
    assert torch.equal(out, out_c)
    for a, c in zip(eager, comp):
        assert torch.equal(a.grad, c.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", DROPOUT_SHAPES, ids=[s.name for s in DROPOUT_SHAPES])
def test_canonical_shapes_gpu(shape):
    m = _mask(shape.dims, shape.p, shape.shared_dim, 0, dtype=torch.bfloat16)
    assert torch.equal(m, m.narrow(shape.shared_dim, 0, 1).expand_as(m))
    assert abs((m > 0).float().mean().item() - (1 - shape.p)) < 0.02
    g = gen(1)
    x, u = randn(*shape.dims, g=g, dtype=torch.bfloat16), randn(*shape.dims, g=g, dtype=torch.bfloat16)
    out = K.bias_dropout_residual(x, u, p=shape.p, shared_dim=shape.shared_dim, training=True,
                                  generator=_dev_gen(0), impl="triton")
    ref = x + u * m
    assert_close_to_reference(out, ref, x.double() + u.double() * m.double(), name=shape.name)
