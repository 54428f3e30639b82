"""Canonical shapes, declared once; tests, benchmarks and tuning read this table.

The AF2 data shapes come from the presets, so a preset and its benchmark shape cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass

from foldforge.config import DataConfig
from foldforge.presets import af2_initial


@dataclass(frozen=True)
class AF2Shapes:
    name: str
    crop: int          # N_res
    n_clust: int       # MSA cluster centres (the Evoformer sees n_clust + n_templ template-angle rows)
    n_extra: int       # extra-MSA rows
    n_templ: int
    copies: int        # recycling copies of the MSA features (max recycling iterations + 1)

    @classmethod
    def from_data(cls, name: str, d: DataConfig) -> "AF2Shapes":
        return cls(name, d.crop_size, d.max_msa_clusters, d.max_extra_msa, d.max_templates, d.num_recycle_copies)


# MLPerf HPC OpenFold closed division (AF2 initial training, ScaleFold's measured configuration)
AF2_MLPERF = AF2Shapes.from_data("af2_mlperf", af2_initial().data)


# ---------------------------------------------------------------- per-op shapes (kernel tests, bench ops)
@dataclass(frozen=True)
class OpShape:
    """One activation tensor as a kernel sees it: ``rows`` = product of the leading dims, ``c_in`` the
    normalised width, ``c_out`` the projection width (LayerNorm+Linear only)."""
    name: str
    family: str        # "af2" | "af3"
    rows: int
    c_in: int
    c_out: int = 0
    use: str = ""


_AF2_MODEL = af2_initial().model
_AF2_MSA_ROWS = AF2_MLPERF.n_clust + AF2_MLPERF.n_templ   # 124 cluster rows + 4 template-angle rows = 128
_AF3_CROP, _AF3_C_Z, _AF3_C_S = 384, 128, 384             # AF3 Suppl. initial training: crop 384, c_z 128, c_s 384
_PAIR2 = AF2_MLPERF.crop ** 2
_PAIR3 = _AF3_CROP ** 2

LAYER_NORM_SHAPES = (
    OpShape("af2_pair", "af2", _PAIR2, _AF2_MODEL.c_z, use="pair stack LayerNorm, [256*256, 128]"),
    OpShape("af2_msa", "af2", _AF2_MSA_ROWS * AF2_MLPERF.crop, _AF2_MODEL.c_m, use="MSA stack, [128*256, 256]"),
    OpShape("af2_extra_msa", "af2", AF2_MLPERF.n_extra * AF2_MLPERF.crop, _AF2_MODEL.c_e,
            use="extra-MSA stack, [1024*256, 64]"),
    OpShape("af3_pair", "af3", _PAIR3, _AF3_C_Z, use="Pairformer pair, [384*384, 128]"),
    OpShape("af3_single", "af3", _AF3_CROP, _AF3_C_S, use="Pairformer single, [384, 384]"),
)

LN_LINEAR_SHAPES = (
    OpShape("af2_pair_qkvg", "af2", _PAIR2, _AF2_MODEL.c_z, 4 * 128,
            use="triangle attention q/k/v/g (4 x 4 heads x 32); same shape as the pair transition up 128->512"),
    OpShape("af2_pair_bias", "af2", _PAIR2, _AF2_MODEL.c_z, 8,
            use="MSA row attention pair bias, LayerNorm(z) -> 8 heads (AF2 Suppl. Alg. 7 line 3)"),
    OpShape("af2_msa_q", "af2", _AF2_MSA_ROWS * AF2_MLPERF.crop, _AF2_MODEL.c_m, 256,
            use="MSA row attention q (8 heads x 32)"),
    OpShape("af2_extra_msa_q", "af2", AF2_MLPERF.n_extra * AF2_MLPERF.crop, _AF2_MODEL.c_e, 64,
            use="extra-MSA row attention q (8 heads x 8)"),
    OpShape("af3_pair_qkvg", "af3", _PAIR3, _AF3_C_Z, 4 * 128, use="AF3 triangle attention q/k/v/g, crop 384"),
    OpShape("af3_single_q", "af3", _AF3_CROP, _AF3_C_S, _AF3_C_S, use="AF3 single attention q (16 heads x 24)"),
)

# tiny shapes for `bench ops --quick` (CPU schema checks)
QUICK_LAYER_NORM_SHAPES = (OpShape("quick", "quick", 64, 32, use="CPU smoke test"),)
QUICK_LN_LINEAR_SHAPES = (OpShape("quick", "quick", 64, 32, 16, use="CPU smoke test"),)


# ---------------------------------------------------------------- transition, gated output, dropout (issue 7)
@dataclass(frozen=True)
class TransitionShape:
    """LayerNorm -> Linear(c -> n c) -> activation -> Linear(n c -> c) on ``rows`` rows."""
    name: str
    family: str
    rows: int
    c: int
    n: int
    activation: str    # "relu" (AF2 Alg. 9/15) | "swiglu" (AF3 Alg. 11)
    use: str = ""


@dataclass(frozen=True)
class DropoutShape:
    """Residual add with shared dropout on an update of shape ``dims`` (``[*, I, J, C]``)."""
    name: str
    family: str
    dims: tuple
    p: float
    shared_dim: int | None
    use: str = ""


TRANSITION_SHAPES = (
    TransitionShape("af2_pair_transition", "af2", _PAIR2, _AF2_MODEL.c_z, 4, "relu",
                    use="AF2 pair transition (Alg. 15), [256*256, 128], n = 4"),
    TransitionShape("af2_msa_transition", "af2", _AF2_MSA_ROWS * AF2_MLPERF.crop, _AF2_MODEL.c_m, 4, "relu",
                    use="AF2 MSA transition (Alg. 9), [128*256, 256], n = 4"),
    TransitionShape("af3_pair_transition", "af3", _PAIR3, _AF3_C_Z, 4, "swiglu",
                    use="AF3 pair transition (Alg. 11), [384*384, 128], n = 4"),
    TransitionShape("af3_single_transition", "af3", _AF3_CROP, _AF3_C_S, 4, "swiglu",
                    use="AF3 single transition (Alg. 11), [384, 384], n = 4"),
)

# gated output: c_in = gate/hidden width (heads x head dim), c_out = the projection's output width
GATED_OUTPUT_SHAPES = (
    OpShape("af2_tri_att_gate", "af2", _PAIR2, 4 * 32, _AF2_MODEL.c_z,
            use="AF2 triangle attention output, o, g [256*256, 4 x 32] -> c_z 128"),
    OpShape("af2_msa_row_gate", "af2", _AF2_MSA_ROWS * AF2_MLPERF.crop, 8 * 32, _AF2_MODEL.c_m,
            use="AF2 MSA row attention output, o, g [128*256, 8 x 32] -> c_m 256"),
    OpShape("af3_tri_att_gate", "af3", _PAIR3, 4 * 32, _AF3_C_Z,
            use="AF3 triangle attention output, o, g [384*384, 4 x 32] -> c_z 128"),
)

DROPOUT_SHAPES = (
    DropoutShape("af2_pair_dropout_row", "af2", (AF2_MLPERF.crop, AF2_MLPERF.crop, _AF2_MODEL.c_z), 0.25, -3,
                 use="AF2 pair stack row-wise dropout, [256, 256, 128], p = 0.25"),
    DropoutShape("af2_msa_dropout_row", "af2", (_AF2_MSA_ROWS, AF2_MLPERF.crop, _AF2_MODEL.c_m), 0.15, -3,
                 use="AF2 MSA row attention dropout, [128, 256, 256], p = 0.15"),
)

QUICK_TRANSITION_SHAPES = (TransitionShape("quick", "quick", 64, 32, 2, "relu", use="CPU smoke test"),)
QUICK_GATED_OUTPUT_SHAPES = (OpShape("quick", "quick", 64, 32, 16, use="CPU smoke test"),)
QUICK_DROPOUT_SHAPES = (DropoutShape("quick", "quick", (4, 8, 16), 0.25, -3, use="CPU smoke test"),)


# ---------------------------------------------------------------- attention with pair bias (evo_attention)
@dataclass(frozen=True)
class AttentionShape:
    """One ``evo_attention`` call: q, k, v ``[batch, rows, length, heads, head_dim]``; bias
    ``[batch, 1, heads, length, length]`` shared by the ``rows`` (None when ``bias`` is False); no padding
    mask (all keys valid, as in research/peers.md §4)."""
    name: str
    family: str        # "af2" | "af3"
    rows: int          # S: MSA rows, pair rows (triangle attention), diffusion samples
    length: int        # L: attended length
    heads: int
    head_dim: int
    bias: bool = True
    batch: int = 1
    use: str = ""


_AF2_CROP = AF2_MLPERF.crop
ATTENTION_SHAPES = (
    AttentionShape("tri_256", "af2", _AF2_CROP, _AF2_CROP, _AF2_MODEL.evoformer.pair_heads,
                   _AF2_MODEL.evoformer.pair_head_dim,
                   use="AF2 MLPerf triangle attention (starting/ending node), crop 256"),
    AttentionShape("tri_384", "af3", 384, 384, 4, 32, use="triangle attention, crop 384"),
    AttentionShape("tri_512", "af3", 512, 512, 4, 32, use="triangle attention, crop 512"),
    AttentionShape("tri_768", "af3", 768, 768, 4, 32, use="triangle attention, crop 768"),
    AttentionShape("msa_row_512x384", "af2", 512, 384, 8, 32,
                   use="MSA row attention with pair bias, AF2 fine-tuning (512 clusters x crop 384)"),
    AttentionShape("msa_row_128x256", "af2", _AF2_MSA_ROWS, _AF2_CROP, _AF2_MODEL.evoformer.msa_heads,
                   _AF2_MODEL.evoformer.msa_head_dim,
                   use="AF2 MLPerf MSA row attention with pair bias (128 rows x crop 256)"),
    AttentionShape("extra_msa_1024x256", "af2", AF2_MLPERF.n_extra, _AF2_CROP, 8, 8,
                   use="AF2 MLPerf extra-MSA row attention with pair bias (1024 rows, 8 heads x 8)"),
    AttentionShape("msa_col_256x128", "af2", _AF2_CROP, _AF2_MSA_ROWS, 8, 32, bias=False,
                   use="AF2 MLPerf MSA column attention (256 residues attend over 128 rows), no bias"),
    AttentionShape("af3_single_384", "af3", 1, 384, 16, 24,
                   use="AF3 Pairformer single attention with pair bias (16 heads x 24), crop 384"),
)
QUICK_ATTENTION_SHAPES = (
    AttentionShape("quick", "quick", 2, 16, 2, 16, use="CPU smoke test"),
    AttentionShape("quick_nobias", "quick", 2, 16, 1, 8, bias=False, use="CPU smoke test"),
)


# ---------------------------------------------------------------- pair ops (triangle multiplication, OPM)
@dataclass(frozen=True)
class TriMulShape:
    """One triangle multiplicative update: pair ``[batch, length, length, c_z]``, hidden width ``c_hidden``."""
    name: str
    family: str
    length: int
    c_z: int
    c_hidden: int
    direction: str = "outgoing"
    batch: int = 1
    use: str = ""


@dataclass(frozen=True)
class OPMShape:
    """One outer product mean: MSA ``[batch, n_seq, length, c_m]`` -> pair ``[batch, length, length, c_z]``."""
    name: str
    family: str
    n_seq: int
    length: int
    c_m: int
    c_hidden: int
    c_z: int
    batch: int = 1
    use: str = ""


TRIANGLE_MULT_SHAPES = tuple(
    TriMulShape(f"trimul_{d[:3]}_{n}", "af2" if n == AF2_MLPERF.crop else "af3", n, 128, 128, d,
                use=f"pair stack L={n}, c_z = c_hidden = 128, {d}")
    for n in (256, 384, 512, 768) for d in (("outgoing", "incoming") if n == 384 else ("outgoing",)))

OPM_SHAPES = (
    OPMShape("opm_evoformer", "af2", _AF2_MSA_ROWS, AF2_MLPERF.crop, _AF2_MODEL.c_m, 32, _AF2_MODEL.c_z,
             use="Evoformer OPM: 128 rows x 256 residues, c_m 256 -> c_z 128 (AF2 Suppl. Alg. 10)"),
    OPMShape("opm_extra_msa", "af2", AF2_MLPERF.n_extra, AF2_MLPERF.crop, _AF2_MODEL.c_e, 32, _AF2_MODEL.c_z,
             use="extra-MSA OPM: 1024 rows x 256 residues, c_e 64 -> c_z 128"),
)

QUICK_TRIANGLE_MULT_SHAPES = (TriMulShape("quick", "quick", 12, 16, 16, use="CPU smoke test"),)
QUICK_OPM_SHAPES = (OPMShape("quick", "quick", 6, 10, 16, 8, 16, use="CPU smoke test"),)
