"""Typed configuration. Presets (``foldforge.presets``) are functions that return these dataclasses."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DataConfig:
    """Shapes and sampling of the AF2 training batch (AF2 Suppl. 1.2.6-1.2.8, 1.11.3).

    Defaults are the MLPerf HPC OpenFold closed-division shapes.
    """

    crop_size: int = 256                    # N_res after cropping (padded up to this)
    max_msa_clusters: int = 124             # N_clust cluster centres (MLPerf; OpenFold's own config: 128)
    max_extra_msa: int = 1024               # N_extra rows for the extra-MSA stack
    max_templates: int = 4                  # N_templ templates per sample
    subsample_templates: bool = True        # random start + permutation over the prepared hits
    # MSA block deletion (AF2 Suppl. Alg. 1)
    block_delete_msa: bool = True
    msa_fraction_per_block: float = 0.3
    num_blocks: int = 5
    # masked-MSA (BERT) corruption (AF2 Suppl. 1.9.9): of the selected 15%, 10% uniform, 10% profile,
    # 10% unchanged, the rest replaced by the mask token.
    masked_msa_replace_fraction: float = 0.15
    masked_msa_uniform_prob: float = 0.1
    masked_msa_profile_prob: float = 0.1
    masked_msa_same_prob: float = 0.1
    # recycling: one independently sampled MSA per recycling iteration (resample_msa_in_recycling)
    max_recycling_iters: int = 3
    resample_msa_in_recycling: bool = True
    # cropping: contiguous by default; with this probability a spatial crop around a random residue
    spatial_crop_prob: float = 0.0
    # AF2 Suppl. 1.2.5 sampling weights: max(min(L, 512), 256) / 512 / cluster size
    weight_length_min: int = 256
    weight_length_max: int = 512

    @property
    def num_recycle_copies(self) -> int:
        return self.max_recycling_iters + 1 if self.resample_msa_in_recycling else 1


@dataclass
class RunConfig:
    """Everything a run needs; written beside every run as JSON and read back on resume."""

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        return cls(name=d.get("name", "custom"), data=DataConfig(**d.get("data", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
