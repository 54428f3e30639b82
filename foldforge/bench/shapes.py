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
