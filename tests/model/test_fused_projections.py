"""With a non-reference LayerNorm, the attention blocks run LayerNorm + all their input projections as one
fused LN-Linear (foldforge.model.attention.Attention.forward_layer_norm). Same parameters, same math: the
fused blocks (Triton kernels through the interpreter on CPU) must match the reference blocks, outputs and
every parameter gradient, on inputs with padding (and the transposed pair tensor of ending-node attention)."""
import pytest
import torch

from foldforge.config import KernelConfig
from foldforge.kernels import _dispatch
from foldforge.model.msa import MSAColumnAttention, MSARowAttentionWithPairBias
from foldforge.model.triangle import TriangleAttention
from tests.kernels._triton_env import DEVICE, HAS_CUDA, interpreter_scope
from tests.model.test_blocks import C_M, C_Z, D, H, _inputs, _randomize


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    yield from interpreter_scope()


def _blocks(kc):
    return {
        "row": MSARowAttentionWithPairBias(C_M, C_Z, D, H, kc),
        "col": MSAColumnAttention(C_M, D, H, kc),
        "start": TriangleAttention(C_Z, D, H, "starting", kc),
        "end": TriangleAttention(C_Z, D, H, "ending", kc),
    }


@pytest.mark.parametrize("name", ["row", "col", "start", "end"])
def test_fused_layer_norm_projections_match_reference(name):
    m, z, msa_mask, pair_mask = (t.to(DEVICE) for t in _inputs(3))
    ref = _randomize(_blocks(KernelConfig())[name], seed=1).to(DEVICE)
    fused = _blocks(KernelConfig(layer_norm="triton"))[name].to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    args = {"row": lambda: (m, z, msa_mask), "col": lambda: (m, msa_mask),
            "start": lambda: (z, pair_mask), "end": lambda: (z, pair_mask)}[name]
    _dispatch.reset_resolutions()
    out_f = fused(*args())
    assert _dispatch.resolutions()["ln_linear"] == ["triton"]
    out_r = ref(*args())
    tol = 1e-4 if HAS_CUDA else 1e-5       # fp32 GEMMs differ in blocking between the two paths
    torch.testing.assert_close(out_f, out_r, rtol=tol, atol=tol)
    dy = torch.randn_like(out_r)
    g_f = torch.autograd.grad(out_f, list(fused.parameters()), dy, allow_unused=True)
    g_r = torch.autograd.grad(out_r, list(ref.parameters()), dy, allow_unused=True)
    for (pname, _), a, b in zip(ref.named_parameters(), g_f, g_r):
        assert (a is None) == (b is None), pname
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=10 * tol, msg=lambda s: f"{pname}: {s}")
