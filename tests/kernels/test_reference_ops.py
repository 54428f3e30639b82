"""Reference kernels (foldforge.kernels): semantics against naive loops, masks, chunking, dispatch,
and the three-way tolerance helper (foldforge.testing)."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from foldforge import kernels as K
from foldforge.kernels import _dispatch
from foldforge.testing import assert_close_to_reference

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g, dtype=F64, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


# ---------------------------------------------------------------- evo_attention
def _naive_attention(q, k, v, bias, mask, scale):
    """Per (batch, row, head, query) loop; masked keys are excluded from the softmax by indexing."""
    B, S, Lq, H, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for s in range(S):
            for h in range(H):
                for i in range(Lq):
                    keys = torch.nonzero(mask[b, s]).flatten() if mask is not None else torch.arange(k.shape[2])
                    if len(keys) == 0:
                        continue
                    logits = torch.stack([q[b, s, i, h] @ k[b, s, j, h] * scale for j in keys])
                    if bias is not None:
                        logits = logits + bias[b, 0, h, i, keys]
                    p = torch.softmax(logits, 0)
                    out[b, s, i, h] = (p[:, None] * v[b, s, keys, h]).sum(0)
    return out


@pytest.mark.parametrize("L", [1, 7, 37])
@pytest.mark.parametrize("D", [8, 16, 24, 32])
def test_evo_attention_matches_naive_loop(L, D):
    g = _gen(L * 100 + D)
    B, S, H = 2, 2, 2
    q, k, v = (_randn(B, S, L, H, D, g=g) for _ in range(3))
    bias = _randn(B, 1, H, L, L, g=g, scale=3.0)
    mask = torch.rand(B, S, L, generator=g) > 0.3
    mask[0, 1] = False                                        # one fully masked row
    out = K.evo_attention(q, k, v, bias, mask)
    ref = _naive_attention(q, k, v, bias, mask, D ** -0.5)
    assert out.shape == (B, S, L, H, D) and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert (out[0, 1] == 0).all()


def test_evo_attention_no_bias_no_mask_matches_sdpa():
    g = _gen(1)
    q, k, v = (_randn(3, 4, 7, 2, 8, g=g) for _ in range(3))
    out = K.evo_attention(q, k, v, scale=0.3)
    ref = F.scaled_dot_product_attention(q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3),
                                         scale=0.3).transpose(-2, -3)
    torch.testing.assert_close(out, ref)


def test_evo_attention_fully_masked_rows_finite_grads():
    g = _gen(2)
    q, k, v = (_randn(1, 3, 7, 2, 8, g=g).requires_grad_() for _ in range(3))
    bias = _randn(1, 1, 2, 7, 7, g=g, scale=1e4).requires_grad_()     # large biases too
    mask = torch.ones(1, 3, 7, dtype=torch.bool)
    mask[:, 1] = False
    mask[:, 2, 3:] = False
    out = K.evo_attention(q, k, v, bias, mask)
    assert torch.isfinite(out).all() and (out[:, 1] == 0).all()
    out.square().sum().backward()
    for t in (q, k, v, bias):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, 1] == 0).all() and (k.grad[:, 1] == 0).all() and (v.grad[:, 1] == 0).all()
    assert (v.grad[:, 2, 3:] == 0).all()                              # masked keys get no gradient


def test_evo_attention_bf16_output_dtype_and_mask_type():
    g = _gen(3)
    q, k, v = (_randn(1, 2, 7, 2, 8, g=g, dtype=torch.bfloat16) for _ in range(3))
    out = K.evo_attention(q, k, v, _randn(1, 1, 2, 7, 7, g=g, dtype=torch.float32))
    assert out.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="bool"):
        K.evo_attention(q, k, v, mask=torch.ones(1, 2, 7))


@pytest.mark.parametrize("bias_rows", [1, 5])
def test_evo_attention_chunked_equals_unchunked(bias_rows):
    g = _gen(4)
    q, k, v = (_randn(2, 5, 7, 2, 8, g=g).requires_grad_() for _ in range(3))
    bias = _randn(2, bias_rows, 2, 7, 7, g=g).requires_grad_()
    mask = torch.rand(2, 5, 7, generator=g) > 0.2
    outs, grads = [], []
    for chunk in (None, 2, 5, 64):
        out = K.evo_attention(q, k, v, bias, mask, chunk_size=chunk)
        outs.append(out)
        grads.append(torch.autograd.grad(out.sin().sum(), (q, k, v, bias)))
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-13)
        for a, b in zip(grad, grads[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_evo_attention_bias_grad_is_sum_over_rows():
    g = _gen(5)
    S = 4
    q, k, v = (_randn(2, S, 7, 2, 8, g=g) for _ in range(3))
    bias = _randn(2, 1, 2, 7, 7, g=g).requires_grad_()
    bias_full = bias.detach().expand(2, S, 2, 7, 7).clone().requires_grad_()
    (K.evo_attention(q, k, v, bias).cos().sum()).backward()
    (K.evo_attention(q, k, v, bias_full).cos().sum()).backward()
    torch.testing.assert_close(bias.grad, bias_full.grad.sum(1, keepdim=True))


def test_evo_attention_cross_lengths_and_extra_batch_dims():
    g = _gen(6)
    q = _randn(2, 3, 2, 5, 2, 8, g=g)                 # [B1, B2, S, Lq, H, D]
    k, v = _randn(2, 3, 2, 7, 2, 8, g=g), _randn(2, 3, 2, 7, 2, 8, g=g)
    bias = _randn(3, 1, 2, 5, 7, g=g)                 # broadcast over B1
    mask = torch.rand(2, 3, 2, 7, generator=g) > 0.3
    out = K.evo_attention(q, k, v, bias, mask, chunk_size=1)
    flat = _naive_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                            bias.expand(2, 3, 1, 2, 5, 7).flatten(0, 1), mask.flatten(0, 1), 8 ** -0.5)
    torch.testing.assert_close(out.flatten(0, 1), flat)


# ---------------------------------------------------------------- global attention
def test_global_attention_matches_loop_and_masks():
    g = _gen(7)
    N, S, H, D = 3, 6, 4, 8
    q, k, v = _randn(N, H, D, g=g), _randn(N, S, D, g=g), _randn(N, S, D, g=g)
    mask = torch.rand(N, S, generator=g) > 0.4
    mask[1] = False
    out = K.global_attention(q, k, v, mask)
    for n in range(N):
        keys = torch.nonzero(mask[n]).flatten()
        for h in range(H):
            if len(keys) == 0:
                assert (out[n, h] == 0).all()
                continue
            p = torch.softmax(k[n, keys] @ q[n, h] / math.sqrt(D), 0)
            torch.testing.assert_close(out[n, h], p @ v[n, keys])
    torch.testing.assert_close(K.global_attention(q, k, v, mask, chunk_size=2), out, rtol=0, atol=0)


# ---------------------------------------------------------------- layer norm, ln_linear, gated output
def test_layer_norm_fp32_statistics_and_dtype():
    g = _gen(8)
    x = _randn(4, 7, 16, g=g, scale=3.0) + 100.0
    w, b = _randn(16, g=g), _randn(16, g=g)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(K.layer_norm(x, w, b), (x - mu) / torch.sqrt(var + 1e-5) * w + b)
    xb = x.to(torch.bfloat16)
    yb = K.layer_norm(xb, w.float(), b.float())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, K.layer_norm(xb.double(), w, b).to(torch.bfloat16))


def test_ln_linear_and_gated_output():
    g = _gen(9)
    x = _randn(3, 5, 16, g=g)
    lw, lb, w, b = _randn(16, g=g), _randn(16, g=g), _randn(4, 16, g=g), _randn(4, g=g)
    torch.testing.assert_close(K.ln_linear(x, lw, lb, w, b, eps=1e-5), F.linear(K.layer_norm(x, lw, lb), w, b))
    torch.testing.assert_close(K.ln_linear(x, lw, lb, w, None), F.linear(K.layer_norm(x, lw, lb), w))
    o, gl = _randn(3, 1, 16, g=g), _randn(3, 5, 16, g=g)          # o broadcast over the gate's rows
    torch.testing.assert_close(K.gated_output(o, gl, w, b), (1 / (1 + torch.exp(-gl)) * o) @ w.T + b)


# ---------------------------------------------------------------- transition
def _transition_params(c, hidden, g, bias=True):
    return K.TransitionParams(_randn(c, g=g), _randn(c, g=g), _randn(hidden, c, g=g) / c ** 0.5,
                              _randn(hidden, g=g) if bias else None,
                              _randn(c, hidden // (1 if bias else 2), g=g) / c ** 0.5,
                              _randn(c, g=g) if bias else None)


def test_transition_relu_and_swiglu():
    g = _gen(10)
    x = _randn(2, 5, 8, g=g)
    p = _transition_params(8, 32, g)
    h = F.layer_norm(x, (8,), p.layer_norm_weight, p.layer_norm_bias)
    expect = torch.clamp(h @ p.linear_1_weight.T + p.linear_1_bias, min=0) @ p.linear_2_weight.T + p.linear_2_bias
    torch.testing.assert_close(K.transition(x, p, activation="relu"), expect)
    p = _transition_params(8, 64, g, bias=False)                  # c -> 2 * 4c, then 4c -> c
    h = F.layer_norm(x, (8,), p.layer_norm_weight, p.layer_norm_bias)
    a, b = (h @ p.linear_1_weight.T).split(32, dim=-1)
    expect = (a * torch.sigmoid(a) * b) @ p.linear_2_weight.T
    torch.testing.assert_close(K.transition(x, p, activation="swiglu"), expect)
    with pytest.raises(ValueError, match="activation"):
        K.transition(x, p, activation="gelu")


# ---------------------------------------------------------------- triangle multiplication
def _trimul_params(c_z, c, g):
    shapes = [(c_z,), (c_z,)] + [(c, c_z), (c,)] * 4 + [(c_z, c_z), (c_z,), (c,), (c,), (c_z, c), (c_z,)]
    return K.TriMulParams(*(_randn(*s, g=g) / (s[-1] ** 0.5 if len(s) == 2 else 1.0) for s in shapes))


def test_triangle_multiplication_outgoing_matches_loop():
    g = _gen(11)
    L, c_z, c = 5, 6, 4
    z, p = _randn(L, L, c_z, g=g), _trimul_params(c_z, c, g)
    mask = (torch.rand(L, L, generator=g) > 0.3).double()
    x = F.layer_norm(z, (c_z,), p.layer_norm_in_weight, p.layer_norm_in_bias)
    def proj(name):
        return x @ getattr(p, f"linear_{name}_weight").T + getattr(p, f"linear_{name}_bias")

    a = mask[..., None] * torch.sigmoid(proj("a_g")) * proj("a_p")
    b = mask[..., None] * torch.sigmoid(proj("b_g")) * proj("b_p")
    t = torch.zeros(L, L, c, dtype=F64)
    for i in range(L):
        for j in range(L):
            t[i, j] = sum(a[i, k] * b[j, k] for k in range(L))    # AF2 Alg. 11 line 4
    t = F.layer_norm(t, (c,), p.layer_norm_out_weight, p.layer_norm_out_bias)
    expect = torch.sigmoid(proj("g")) * (t @ p.linear_z_weight.T + p.linear_z_bias)
    torch.testing.assert_close(K.triangle_multiplication(z, mask, p, direction="outgoing"), expect)


def test_triangle_multiplication_incoming_is_transposed_outgoing():
    """Alg. 12 on z is Alg. 11 on z^T, transposed back, with the roles of the a and b projections swapped:
    incoming_ij = sum_k a_ki b_kj, while outgoing(z^T)^T_ij = sum_k a_kj b_ki."""
    g = _gen(12)
    z, p = _randn(2, 7, 7, 8, g=g), _trimul_params(8, 4, g)
    mask = torch.rand(2, 7, 7, generator=g) > 0.3
    swapped = p._replace(linear_a_p_weight=p.linear_b_p_weight, linear_a_p_bias=p.linear_b_p_bias,
                         linear_a_g_weight=p.linear_b_g_weight, linear_a_g_bias=p.linear_b_g_bias,
                         linear_b_p_weight=p.linear_a_p_weight, linear_b_p_bias=p.linear_a_p_bias,
                         linear_b_g_weight=p.linear_a_g_weight, linear_b_g_bias=p.linear_a_g_bias)
    incoming = K.triangle_multiplication(z, mask, p, direction="incoming")
    zt, mt = z.transpose(1, 2), mask.transpose(1, 2)
    outgoing_t = K.triangle_multiplication(zt, mt, swapped, direction="outgoing").transpose(1, 2)
    torch.testing.assert_close(incoming, outgoing_t)
    # with the same (unswapped) weights the relation does not hold
    assert not torch.allclose(incoming, K.triangle_multiplication(zt, mt, p, direction="outgoing").transpose(1, 2))
    assert not torch.allclose(incoming, K.triangle_multiplication(z, mask, p, direction="outgoing"))


def test_triangle_multiplication_masked_residue_does_not_leak():
    g = _gen(13)
    z, p = _randn(7, 7, 8, g=g), _trimul_params(8, 4, g)
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[3, :] = mask[:, 3] = False                              # residue 3 is padding
    z2 = z.clone()
    z2[3, :] += 5.0
    z2[:, 3] -= 5.0
    for direction in ("outgoing", "incoming"):
        o1 = K.triangle_multiplication(z, mask, p, direction=direction)
        o2 = K.triangle_multiplication(z2, mask, p, direction=direction)
        keep = mask[..., None].expand_as(o1)
        torch.testing.assert_close(o1[keep], o2[keep])


# ---------------------------------------------------------------- outer product mean
def _opm_params(c_m, c, c_z, g):
    return K.OPMParams(_randn(c_m, g=g), _randn(c_m, g=g), _randn(c, c_m, g=g), _randn(c, g=g),
                       _randn(c, c_m, g=g), _randn(c, g=g), _randn(c_z, c * c, g=g) / c, _randn(c_z, g=g))


def test_outer_product_mean_masked_normalisation():
    g = _gen(14)
    S, L, c_m, c, c_z = 5, 4, 6, 3, 5
    m, p = _randn(S, L, c_m, g=g), _opm_params(c_m, c, c_z, g)
    mask = (torch.rand(S, L, generator=g) > 0.3).double()
    x = F.layer_norm(m, (c_m,), p.layer_norm_weight, p.layer_norm_bias)
    a = x @ p.linear_1_weight.T + p.linear_1_bias
    b = x @ p.linear_2_weight.T + p.linear_2_bias
    expect = torch.zeros(L, L, c_z, dtype=F64)
    for i in range(L):
        for j in range(L):
            rows = [s for s in range(S) if mask[s, i] and mask[s, j]]
            outer = sum((torch.outer(a[s, i], b[s, j]) for s in rows), torch.zeros(c, c, dtype=F64))
            expect[i, j] = (outer.flatten() @ p.linear_out_weight.T + p.linear_out_bias) / (len(rows) + 1e-3)
    out = K.outer_product_mean(m, mask, p)
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(K.outer_product_mean(m, mask, p, chunk_size=3), out, rtol=0, atol=1e-13)
    # appending fully masked MSA rows changes nothing: they add to neither the sum nor the count
    m_pad = torch.cat([m, _randn(3, L, c_m, g=g)])
    mask_pad = torch.cat([mask, torch.zeros(3, L, dtype=F64)])
    torch.testing.assert_close(K.outer_product_mean(m_pad, mask_pad.bool(), p), out)


# ---------------------------------------------------------------- dropout
@pytest.mark.parametrize("shared_dim", [-3, -2])
def test_dropout_mask_shared_along_axis_and_reproducible(shared_dim):
    x, upd = torch.zeros(2, 6, 7, 8), torch.ones(2, 6, 7, 8)
    out = K.bias_dropout_residual(x, upd, p=0.25, shared_dim=shared_dim, training=True, generator=_gen(0))
    assert set(out.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    first = out.select(shared_dim, 0).unsqueeze(shared_dim)
    assert (out == first).all()                                   # same mask along shared_dim
    assert not (out == out[..., :1]).all()                        # but not along the channels
    again = K.bias_dropout_residual(x, upd, p=0.25, shared_dim=shared_dim, training=True, generator=_gen(0))
    other = K.bias_dropout_residual(x, upd, p=0.25, shared_dim=shared_dim, training=True, generator=_gen(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    frac = (out == 0).float().mean().item()
    assert 0.1 < frac < 0.4


def test_dropout_eval_and_p0_are_plain_residual():
    g = _gen(15)
    x, upd = _randn(2, 3, 4, 5, g=g), _randn(2, 3, 4, 5, g=g)
    assert torch.equal(K.bias_dropout_residual(x, upd, p=0.5, shared_dim=-3, training=False), x + upd)
    assert torch.equal(K.bias_dropout_residual(x, upd, p=0.0, shared_dim=None, training=True), x + upd)
    with pytest.raises(ValueError):
        K.bias_dropout_residual(x, upd, p=1.5, shared_dim=None, training=True)


# ---------------------------------------------------------------- dispatch
def test_dispatch_reference_auto_triton(caplog):
    g = _gen(16)
    q, k, v = (_randn(1, 2, 7, 2, 8, g=g) for _ in range(3))
    _dispatch._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="foldforge.kernels"):
        ref = K.evo_attention(q, k, v, impl="reference")
        auto = K.evo_attention(q, k, v, impl="auto")
        K.evo_attention(q, k, v, impl="auto")
    assert torch.equal(ref, auto)
    msgs = [r.getMessage() for r in caplog.records if "evo_attention" in r.getMessage()]
    assert msgs == ["kernel evo_attention: impl='reference' -> reference",
                    "kernel evo_attention: impl='auto' -> reference"]     # each resolution logged once
    with pytest.raises(NotImplementedError, match="Triton kernel for evo_attention not available yet"):
        K.evo_attention(q, k, v, impl="triton")
    with pytest.raises(NotImplementedError, match="triangle_multiplication"):
        K.triangle_multiplication(_randn(4, 4, 6, g=g), None, _trimul_params(6, 4, g), impl="triton")
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        K.layer_norm(q, None, None, impl="cuda")


# ---------------------------------------------------------------- the three-way helper
def _toy_op(x, w):
    """A softmax-weighted projection: enough arithmetic that bf16 rounding shows."""
    return torch.softmax(x @ w, dim=-1) @ w.T


def test_three_way_helper_on_toy_op():
    g = _gen(17)
    x, w = _randn(64, 32, g=g), _randn(32, 48, g=g) / 6
    hp = _toy_op(x, w)
    lp = _toy_op(x.bfloat16(), w.bfloat16())
    good = _toy_op(x.float(), w.float()).bfloat16()               # fp32 inside, bf16 out: a good kernel
    err, bound = assert_close_to_reference(good, lp, hp, name="toy")
    assert err <= bound
    bad = (hp * 1.05).bfloat16()                                  # 5% off: far beyond bf16 rounding
    with pytest.raises(AssertionError, match="toy: max"):
        assert_close_to_reference(bad, lp, hp, name="toy")
    nan = good.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_reference(nan, lp, hp, name="toy")
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_close_to_reference(good[1:], lp, hp, name="toy")
    # the floor: with an exact low-precision reference, only floor * max|hp| is allowed
    exact = hp.bfloat16().double()
    assert_close_to_reference(exact.bfloat16(), exact, exact, name="exact")
    with pytest.raises(AssertionError):
        assert_close_to_reference((exact + exact.abs().max() * 0.02).bfloat16(), exact, exact, name="floor")
