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
