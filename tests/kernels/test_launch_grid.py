"""Launch geometry at crop 2048 (host arithmetic only, no tensors are allocated): every grid within CUDA's
per-axis limits (axis 0 < 2^31, axes 1 and 2 <= 65535), dropout runs that cover the shared axis exactly once
with one Philox draw per mask entry and program, and the helpers that guard launches."""
import math

import pytest
import torch

from foldforge.kernels import _launch

CROP = 2048
SMS = 132            # H100 / H200


def test_check_grid_limits():
    assert _launch.check_grid((2**31 - 1, 65535, 65535)) == (2**31 - 1, 65535, 65535)
    assert _launch.check_grid([3]) == (3,)
    for bad in [(0,), (2**31,), (1, 65536), (1, 1, 65536)]:
        with pytest.raises(ValueError, match="axis"):
            _launch.check_grid(bad)


@pytest.mark.parametrize("dims, shared, reuse", [
    ((CROP, CROP, 128), 1, 100),          # pair stack, row-wise (triangle multiplication / starting node)
    ((CROP, CROP, 128), 2, 100),          # pair stack, column-wise (ending node)
    ((512, CROP, 256), 1, 100),           # MSA row attention
    ((5120, CROP, 64), 1, 100),           # extra-MSA row attention
    ((CROP, CROP, 128), 0, 1),            # independent elements: one draw each
    ((4, CROP, CROP, 128), 1, 100),       # 2^31 elements: 64-bit mask counters
], ids=["pair_row", "pair_col", "msa_row", "extra_msa_row", "independent", "batch4_pair_row"])
def test_dropout_plan_at_crop_2048(dims, shared, reuse):
    from foldforge.kernels import _dropout_triton as D
    cfg = D._config(torch.device("cpu"), dims[-1])
    k = D.plan(torch.Size(dims), shared, cfg, SMS)
    (programs,) = k["grid"]
    elements = math.prod(dims)
    assert 2 * SMS <= programs < 2**31
    assert k["MODE"] == shared
    extent = {0: 1, 1: k["I"], 2: k["n_jb"]}[shared]
    assert (k["n_chunks"] - 1) * k["steps"] < extent <= k["n_chunks"] * k["steps"]      # each row once
    draws = programs * (k["BLOCK_C"] if shared == 2 else k["BLOCK_R"] * k["BLOCK_C"])
    assert draws * reuse <= elements, (draws, elements)
    assert k["OFF64"] == (elements >= 2**31 - 1)
    assert k["EVEN_R"] and k["EVEN_C"]                    # power-of-two crops and widths: unmasked tiles


def test_outer_product_mean_grid_at_crop_2048():
    from foldforge.kernels import _outer_product_mean_triton as T
    cfg = T.default_config(32)
    assert T.fwd_grid(1, CROP, cfg) == ((CROP // cfg["BI"]) * (CROP // cfg["BJ"]), 1)
    assert T.fwd_grid(2, CROP + 1, cfg)[1] == 2


@pytest.mark.parametrize("rows, k, n", [(CROP * CROP, 128, 128), (5120 * CROP, 64, 64), (512 * CROP, 256, 256)],
                         ids=["tri_att", "extra_msa", "msa_row"])
def test_gated_output_grids_at_crop_2048(rows, k, n):
    from foldforge.kernels import _gated_output_triton as G
    cfg = G.default_config(k, n)
    gr = G.grids(rows, k, n, cfg, SMS)
    assert gr["fwd"] == (math.ceil(rows / cfg["fwd"]["BLOCK_M"]) * gr["n_tiles"],)
    assert gr["bwd_dx"] == (math.ceil(rows / cfg["bwd_dx"]["BLOCK_M"]) * gr["k_tiles"],)
    wn, wk, splits = gr["bwd_dw"]
    assert splits * gr["tiles_per_split"] * cfg["bwd_dw"]["BLOCK_M"] >= rows
    assert wn * wk * splits <= cfg["bwd_dw"]["programs_per_sm"] * SMS


def test_triangle_tiles_at_crop_2048():
    """Crop 2048: every kernel's row tiles stay inside one pair matrix (the vectorised channel-major path).
    The pre-activation gradient ``[L^2, 4C + c_z]`` has 2.7e9 > 2^31 elements at C = c_z = 128; its
    kernels address rows in int64 (``rows.to(tl.int64) * NP``)."""
    from foldforge.kernels import _triangle_mult_triton as T
    for c in T.default_config(128, 128).values():
        assert T._even_ll(CROP, c)
        assert math.ceil(CROP * CROP / c["BLOCK_M"]) < 2**31
    assert CROP * CROP * (4 * 128 + 128) > 2**31
    assert not T._even_ll(37, T.default_config(32, 32)["proj_fwd"])
