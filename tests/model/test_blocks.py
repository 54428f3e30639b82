"""Shared Evoformer/Pairformer blocks (foldforge.model): shapes, forward+backward, chunking, kernel
routing from KernelConfig, AF2 init, and parameter counts at the MLPerf sizes against OpenFold's layout."""
import pytest
import torch

from foldforge.config import EvoformerConfig, KernelConfig, ModelConfig
from foldforge.model.attention import Attention
from foldforge.model.dropout import DropoutResidual
from foldforge.model.msa import MSAColumnAttention, MSAColumnGlobalAttention, MSARowAttentionWithPairBias
from foldforge.model.opm import OuterProductMean
from foldforge.model.primitives import Linear
from foldforge.model.transition import Transition
from foldforge.model.triangle import TriangleAttention, TriangleMultiplication

KC = KernelConfig()
B, S, L, C_M, C_Z, H, D = 2, 5, 7, 16, 8, 2, 4


def _randomize(module, seed=0):
    """AF2's "final"/"gating" inits make fresh blocks return exactly 0; tests need non-trivial weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(noise / max(1, p.shape[-1]) ** 0.5)
    return module


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, S, L, C_M, generator=g)
    z = torch.randn(B, L, L, C_Z, generator=g)
    msa_mask = (torch.rand(B, S, L, generator=g) > 0.2).float()
    msa_mask[1, -1] = 0                       # a padding MSA row
    msa_mask[:, :, -1] = 0                    # a padding residue
    pair_mask = torch.ones(B, L, L)
    pair_mask[:, -1, :] = pair_mask[:, :, -1] = 0
    return m, z, msa_mask, pair_mask


def _blocks(kc=KC):
    """(name, module, forward(module, inputs, chunk_size) -> output, expected shape, chunkable)."""
    return [
        ("msa_row_attention", MSARowAttentionWithPairBias(C_M, C_Z, D, H, kc),
         lambda mod, m, z, mm, pm, c: mod(m, z, mm, chunk_size=c), (B, S, L, C_M), True),
        ("msa_column_attention", MSAColumnAttention(C_M, D, H, kc),
         lambda mod, m, z, mm, pm, c: mod(m, mm, chunk_size=c), (B, S, L, C_M), True),
        ("msa_column_global_attention", MSAColumnGlobalAttention(C_M, D, H, kc),
         lambda mod, m, z, mm, pm, c: mod(m, mm, chunk_size=c), (B, S, L, C_M), True),
        ("msa_transition", Transition(C_M, 4, kc),
         lambda mod, m, z, mm, pm, c: mod(m, mm), (B, S, L, C_M), False),
        ("outer_product_mean", OuterProductMean(C_M, C_Z, 3, kc),
         lambda mod, m, z, mm, pm, c: mod(m, mm, chunk_size=c), (B, L, L, C_Z), True),
        ("tri_mul_outgoing", TriangleMultiplication(C_Z, 6, "outgoing", kc),
         lambda mod, m, z, mm, pm, c: mod(z, pm), (B, L, L, C_Z), False),
        ("tri_mul_incoming", TriangleMultiplication(C_Z, 6, "incoming", kc),
         lambda mod, m, z, mm, pm, c: mod(z, pm), (B, L, L, C_Z), False),
        ("tri_att_starting", TriangleAttention(C_Z, D, H, "starting", kc),
         lambda mod, m, z, mm, pm, c: mod(z, pm, chunk_size=c), (B, L, L, C_Z), True),
        ("tri_att_ending", TriangleAttention(C_Z, D, H, "ending", kc),
         lambda mod, m, z, mm, pm, c: mod(z, pm, chunk_size=c), (B, L, L, C_Z), True),
        ("pair_transition_swiglu", Transition(C_Z, 2, kc, activation="swiglu"),
         lambda mod, m, z, mm, pm, c: mod(z, pm), (B, L, L, C_Z), False),
    ]


@pytest.mark.parametrize("idx", range(len(_blocks())), ids=[b[0] for b in _blocks()])
def test_block_forward_backward_chunking(idx):
    name, mod, fwd, shape, chunkable = _blocks()[idx]
    _randomize(mod, seed=idx)
    m, z, mm, pm = _inputs(idx)
    m.requires_grad_()
    z.requires_grad_()
    out = fwd(mod, m, z, mm, pm, None)
    assert out.shape == shape and torch.isfinite(out).all(), name
    assert out.abs().max() > 0, name
    out.square().sum().backward()
    for pname, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"
    assert any(t.grad is not None and t.grad.abs().max() > 0 for t in (m, z)), name
    if chunkable:
        for chunk in (1, 3):
            torch.testing.assert_close(fwd(mod, m, z, mm, pm, chunk), out, rtol=1e-6, atol=1e-6)


def test_fresh_blocks_return_zero_update():
    """AF2 Suppl. 1.11.4: "final" init of output layers makes every residual block start as identity."""
    m, z, mm, pm = _inputs()
    for name, mod, fwd, _, _ in _blocks():
        assert (fwd(mod, m, z, mm, pm, None) == 0).all(), name


def test_attention_matches_explicit_formula():
    mod = _randomize(Attention(C_M, C_M, D, H))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, S, L, C_M, generator=g)
    bias = torch.randn(B, 1, H, L, L, generator=g)
    mask = torch.rand(B, S, L, generator=g) > 0.3
    mask[..., 0] = True                                  # no fully masked rows: OpenFold's -1e9 bias agrees
    q = (x @ mod.linear_q.weight.T).view(B, S, L, H, D).permute(0, 1, 3, 2, 4)
    k = (x @ mod.linear_k.weight.T).view(B, S, L, H, D).permute(0, 1, 3, 2, 4)
    v = (x @ mod.linear_v.weight.T).view(B, S, L, H, D).permute(0, 1, 3, 2, 4)
    a = q @ k.transpose(-1, -2) / D ** 0.5 + bias + 1e9 * (mask[:, :, None, None, :].float() - 1)
    o = (torch.softmax(a, -1) @ v).permute(0, 1, 3, 2, 4).reshape(B, S, L, H * D)
    o = torch.sigmoid(mod.linear_g(x)) * o
    torch.testing.assert_close(mod(x, x, bias, mask), mod.linear_o(o), rtol=1e-5, atol=1e-6)


def test_triangle_attention_ending_is_starting_on_transpose():
    start = _randomize(TriangleAttention(C_Z, D, H, "starting", KC))
    end = TriangleAttention(C_Z, D, H, "ending", KC)
    end.load_state_dict(start.state_dict())
    _, z, _, pm = _inputs(4)
    pm[0, 2, 3] = 0                                      # asymmetric mask
    expect = start(z.transpose(1, 2), pm.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(end(z, pm), expect)


def test_padding_residue_does_not_leak_into_row_attention():
    mod = _randomize(MSARowAttentionWithPairBias(C_M, C_Z, D, H, KC))
    m, z, mm, _ = _inputs(5)
    out = mod(m, z, mm)
    m2, z2 = m.clone(), z.clone()
    m2[:, :, -1] += 3.0                                  # residue L-1 is masked in every row
    z2[:, :, -1] -= 3.0                                  # only bias entries towards the masked key
    torch.testing.assert_close(mod(m2, z2, mm)[:, :, :-1], out[:, :, :-1])


def test_transition_mask_zeroes_update():
    mod = _randomize(Transition(C_M, 2, KC))
    m, _, mm, _ = _inputs(6)
    out = mod(m, mm)
    assert (out[mm == 0] == 0).all() and torch.equal(out[mm == 1], mod(m)[mm == 1])


def test_kernel_impl_comes_from_kernel_config():
    m, z, mm, pm = _inputs(7)
    auto = _randomize(MSARowAttentionWithPairBias(C_M, C_Z, D, H, KernelConfig(attention="auto")))
    ref = MSARowAttentionWithPairBias(C_M, C_Z, D, H, KC)
    ref.load_state_dict(auto.state_dict())
    assert torch.equal(auto(m, z, mm), ref(m, z, mm))
    triton = MSARowAttentionWithPairBias(C_M, C_Z, D, H, KernelConfig(attention="triton"))
    with pytest.raises(NotImplementedError, match="evo_attention"):
        triton(m, z, mm)
    with pytest.raises(NotImplementedError, match="triangle_multiplication"):
        TriangleMultiplication(C_Z, 4, "outgoing", KernelConfig(triangle_mult="triton"))(z, pm)
    with pytest.raises(NotImplementedError, match="ln_linear"):
        MSAColumnAttention(C_M, D, H, KernelConfig(layer_norm="triton"))(m, mm)
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        OuterProductMean(C_M, C_Z, 4, KernelConfig(outer_product_mean="cuda"))


def test_linear_inits():
    torch.manual_seed(0)
    w = Linear(512, 256).weight
    assert abs(w.std().item() - 512 ** -0.5) < 0.05 * 512 ** -0.5 and w.abs().max() <= 2.01 * 512 ** -0.5 / 0.8796
    assert abs(Linear(512, 256, init="relu").weight.std().item() - (2 / 512) ** 0.5) < 0.05 * (2 / 512) ** 0.5
    gate = Linear(8, 4, init="gating")
    assert (gate.weight == 0).all() and (gate.bias == 1).all()
    final = Linear(8, 4, init="final")
    assert (final.weight == 0).all() and (final.bias == 0).all()
    assert Linear(8, 4, bias=False, init="glorot").bias is None
    with pytest.raises(ValueError):
        Linear(8, 4, init="xavier")


def test_dropout_residual_module():
    mod = DropoutResidual(0.25, shared_dim=-3)
    x, upd = torch.zeros(2, 6, 7, 8), torch.ones(2, 6, 7, 8)
    out = mod(x, upd, generator=torch.Generator().manual_seed(0))
    assert (out == out[:, :1]).all() and (out == 0).any()     # row-wise: one mask for all rows
    mod.eval()
    assert torch.equal(mod(x, upd), x + upd)


def test_autocast_bf16_smoke():
    mod = _randomize(TriangleAttention(C_Z, D, H, "starting", KC))
    _, z, _, pm = _inputs(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(z, pm)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- parameter counts (MLPerf sizes)
def _lin(i, o, bias=True):
    return i * o + (o if bias else 0)


def _attn(c, hd):
    """OpenFold Attention: q/k/v without bias, linear_o and linear_g with bias."""
    return 3 * _lin(c, hd, False) + _lin(hd, c) + _lin(c, hd)


def test_parameter_counts_at_mlperf_sizes():
    mc, ev, ex = ModelConfig(), EvoformerConfig(), ModelConfig().extra_msa
    c_m, c_z, c_e = mc.c_m, mc.c_z, mc.c_e
    hd_msa, hd_pair = ev.msa_heads * ev.msa_head_dim, ev.pair_heads * ev.pair_head_dim
    hd_ext = ex.msa_heads * ex.msa_head_dim
    n, ct, co = ev.transition_n, ev.tri_mul_dim, ev.opm_dim
    rows = [
        ("MSA row attention w/ pair bias",
         MSARowAttentionWithPairBias(c_m, c_z, ev.msa_head_dim, ev.msa_heads, KC),
         2 * c_m + 2 * c_z + _lin(c_z, ev.msa_heads, False) + _attn(c_m, hd_msa)),
        ("MSA column attention", MSAColumnAttention(c_m, ev.msa_head_dim, ev.msa_heads, KC),
         2 * c_m + _attn(c_m, hd_msa)),
        ("MSA column global attention (c_e)", MSAColumnGlobalAttention(c_e, ex.msa_head_dim, ex.msa_heads, KC),
         2 * c_e + _lin(c_e, hd_ext, False) + 2 * _lin(c_e, ex.msa_head_dim, False) + _lin(c_e, hd_ext)
         + _lin(hd_ext, c_e)),
        ("MSA transition", Transition(c_m, n, KC), 2 * c_m + _lin(c_m, n * c_m) + _lin(n * c_m, c_m)),
        ("outer product mean", OuterProductMean(c_m, c_z, co, KC), 2 * c_m + 2 * _lin(c_m, co) + _lin(co * co, c_z)),
        ("triangle multiplication", TriangleMultiplication(c_z, ct, "outgoing", KC),
         2 * c_z + 4 * _lin(c_z, ct) + _lin(c_z, c_z) + 2 * ct + _lin(ct, c_z)),
        ("triangle attention", TriangleAttention(c_z, ev.pair_head_dim, ev.pair_heads, "starting", KC),
         2 * c_z + _lin(c_z, ev.pair_heads, False) + _attn(c_z, hd_pair)),
        ("pair transition", Transition(c_z, n, KC), 2 * c_z + _lin(c_z, n * c_z) + _lin(n * c_z, c_z)),
    ]
    counts = {}
    print()
    for name, mod, formula in rows:
        counts[name] = sum(p.numel() for p in mod.parameters())
        print(f"  {name:38s} {counts[name]:>9,d}")
        assert counts[name] == formula, name
    assert list(counts.values()) == [329984, 328704, 13568, 526080, 148160, 99584, 82944, 131968]
    block = sum(counts.values()) - counts["MSA column global attention (c_e)"] + counts["triangle multiplication"] \
        + counts["triangle attention"]
    print(f"  {'Evoformer block (Alg. 6)':38s} {block:>9,d}  x{ev.num_blocks} = {block * ev.num_blocks:,d}")
    assert block == 1_829_952


def test_parameter_names_follow_openfold():
    names = set(dict(MSARowAttentionWithPairBias(8, 4, 2, 2, KC).named_parameters()))
    assert names == {"layer_norm_m.weight", "layer_norm_m.bias", "layer_norm_z.weight", "layer_norm_z.bias",
                     "linear_z.weight", "mha.linear_q.weight", "mha.linear_k.weight", "mha.linear_v.weight",
                     "mha.linear_o.weight", "mha.linear_o.bias", "mha.linear_g.weight", "mha.linear_g.bias"}
    names = {k.split(".")[0] for k in dict(TriangleMultiplication(8, 4, "incoming", KC).named_parameters())}
    assert names == {"layer_norm_in", "linear_a_p", "linear_a_g", "linear_b_p", "linear_b_g", "linear_g",
                     "layer_norm_out", "linear_z"}
    names = set(dict(MSAColumnGlobalAttention(8, 2, 2, KC).named_parameters()))
    assert names == {"layer_norm_m.weight", "layer_norm_m.bias"} | {
        f"global_attention.{n}" for n in ("linear_q.weight", "linear_k.weight", "linear_v.weight",
                                           "linear_g.weight", "linear_g.bias", "linear_o.weight", "linear_o.bias")}
    assert set(dict(OuterProductMean(8, 4, 2, KC).named_parameters())) == {
        f"{m}.{p}" for m in ("layer_norm", "linear_1", "linear_2", "linear_out") for p in ("weight", "bias")}
    assert set(dict(TriangleAttention(8, 2, 2, "ending", KC).named_parameters())) == {
        "layer_norm.weight", "layer_norm.bias", "linear.weight", "mha.linear_q.weight", "mha.linear_k.weight",
        "mha.linear_v.weight", "mha.linear_o.weight", "mha.linear_o.bias", "mha.linear_g.weight", "mha.linear_g.bias"}


def test_blocks_trace_without_graph_breaks():
    """torch.compile(fullgraph=True) of the glue: kernel dispatch and its logging must not break graphs."""
    m, z, mm, pm = _inputs(9)
    for mod, args in [(_randomize(MSARowAttentionWithPairBias(C_M, C_Z, D, H, KernelConfig(attention="auto"))),
                       (m, z, mm)),
                      (_randomize(TriangleMultiplication(C_Z, 4, "incoming", KC)), (z, pm))]:
        compiled = torch.compile(mod, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(*args), mod(*args))
