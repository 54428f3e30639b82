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
    # probability that a training sample's backbone FAPE is clamped (AF2 Suppl. 1.11.5)
    clamped_fape_prob: float = 0.9
    # cropping: contiguous by default; with this probability a spatial crop around a random residue
    spatial_crop_prob: float = 0.0
    # AF2 Suppl. 1.2.5 sampling weights: max(min(L, 512), 256) / 512 / cluster size
    weight_length_min: int = 256
    weight_length_max: int = 512

    @property
    def num_recycle_copies(self) -> int:
        return self.max_recycling_iters + 1 if self.resample_msa_in_recycling else 1


@dataclass
class KernelConfig:
    """Implementation per hot op, resolved when the model is built (never per call).

    Values: "reference" (readable eager PyTorch, the baseline in every ablation), "triton", "auto"
    ("triton" where the op's ``supports()`` accepts the inputs, else "reference").
    """

    attention: str = "reference"
    layer_norm: str = "reference"
    triangle_mult: str = "reference"
    outer_product_mean: str = "reference"
    transition: str = "reference"
    gated_output: str = "reference"
    dropout: str = "reference"              # fused bias + shared dropout + residual add


@dataclass
class EvoformerConfig:
    """AF2 Suppl. Alg. 6 stack (also the extra-MSA stack, Alg. 18, with its own sizes).

    The MSA/pair widths come from :class:`ModelConfig` (c_m or c_e, and c_z).
    """

    num_blocks: int = 48
    msa_heads: int = 8
    msa_head_dim: int = 32
    global_column_attention: bool = False   # True in the extra-MSA stack (Alg. 19)
    pair_heads: int = 4
    pair_head_dim: int = 32
    tri_mul_dim: int = 128
    opm_dim: int = 32
    transition_n: int = 4
    msa_dropout: float = 0.15
    pair_dropout: float = 0.25


@dataclass
class TemplateConfig:
    """AF2 Suppl. 1.7.1, Alg. 16-17: template pair stack + pointwise attention + torsion-angle rows."""

    enabled: bool = True
    embed_angles: bool = True               # template torsion angles as extra MSA rows
    c_t: int = 64
    num_blocks: int = 2
    tri_att_heads: int = 4
    tri_att_dim: int = 16
    tri_mul_dim: int = 64
    transition_n: int = 2
    dropout: float = 0.25
    pointwise_heads: int = 4
    pointwise_dim: int = 16
    distogram_min: float = 3.25
    distogram_max: float = 50.75
    distogram_bins: int = 39
    inf: float = 1e5


@dataclass
class StructureConfig:
    """AF2 Suppl. Alg. 20 (shared-weight blocks), IPA Alg. 22."""

    num_blocks: int = 8
    c_ipa: int = 16
    ipa_heads: int = 12
    qk_points: int = 4
    v_points: int = 8
    c_resnet: int = 128
    resnet_blocks: int = 2
    transition_layers: int = 1
    num_angles: int = 7
    trans_scale: float = 10.0
    dropout: float = 0.1
    eps: float = 1e-8
    inf: float = 1e5


@dataclass
class HeadsConfig:
    plddt_bins: int = 50
    plddt_hidden: int = 128
    distogram_bins: int = 64
    masked_msa_classes: int = 23
    experimentally_resolved_atoms: int = 37
    tm_enabled: bool = False
    tm_bins: int = 64


@dataclass
class ModelConfig:
    """The AF2 model (AF2 Suppl. Alg. 2); defaults are the MLPerf HPC OpenFold initial-training model."""

    c_m: int = 256
    c_z: int = 128
    c_s: int = 384
    c_e: int = 64                            # extra-MSA channels (the extra-MSA stack's MSA width)
    relpos_k: int = 32
    target_feat_dim: int = 22
    msa_feat_dim: int = 49
    extra_msa_feat_dim: int = 25
    recycle_min_bin: float = 3.25
    recycle_max_bin: float = 20.75
    recycle_bins: int = 15
    evoformer: EvoformerConfig = field(default_factory=EvoformerConfig)
    extra_msa: EvoformerConfig = field(default_factory=lambda: EvoformerConfig(
        num_blocks=4, msa_head_dim=8, global_column_attention=True))
    template: TemplateConfig = field(default_factory=TemplateConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    checkpoint_blocks: bool = False          # activation checkpointing per block (applied from train/)
    chunk_size: int | None = None            # inference-time chunking of pair/MSA ops (memory bound)


@dataclass
class LossConfig:
    """AF2 Suppl. 1.9 loss terms and weights (MLPerf initial training: violation and exp. resolved 0)."""

    fape_weight: float = 1.0
    fape_backbone_weight: float = 0.5
    fape_sidechain_weight: float = 0.5
    fape_clamp_distance: float = 10.0
    fape_length_scale: float = 10.0
    chi_weight: float = 1.0
    chi_angle_weight: float = 0.5
    chi_angle_norm_weight: float = 0.01
    distogram_weight: float = 0.3
    distogram_min: float = 2.3125
    distogram_max: float = 21.6875
    masked_msa_weight: float = 2.0
    plddt_weight: float = 0.01
    plddt_cutoff: float = 15.0
    min_resolution: float = 0.1
    max_resolution: float = 3.0
    experimentally_resolved_weight: float = 0.0
    violation_weight: float = 0.0
    violation_tolerance_factor: float = 12.0
    clash_overlap_tolerance: float = 1.5
    tm_weight: float = 0.0
    eps: float = 1e-8


@dataclass
class TrainConfig:
    """Optimisation and run control (AF2 Suppl. 1.11.3; MLPerf HPC OpenFold for af2_initial)."""

    lr: float = 1e-3
    schedule: str = "af2"                   # "af2": linear warm-up then x decay_factor every decay_every
                                            # steps after decay_start; "constant": lr after warm-up
    warmup_steps: int = 1000
    decay_start: int = 50_000
    decay_every: int = 50_000
    decay_factor: float = 0.95
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-6
    clip_grad_norm: float = 0.1
    ema_decay: float = 0.999
    batch_size: int = 1                     # per process
    grad_accum: int = 1
    precision: str = "bf16"                 # "bf16" autocast with fp32 master weights, or "fp32"
    max_steps: int = 1000
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    num_workers: int = 2
    seed: int = 0
    max_nonfinite_in_a_row: int = 10        # NaN/Inf guard: stop after this many skipped updates in a row
    target_lddt: float | None = None        # stop when the mean lDDT-Ca of ``target_split`` reaches this
    target_split: str = "val"               # "val": held-out chains; "train": the training chains (below)
    eval_train_chains: int = 0              # also evaluate the EMA weights on this many training chains
                                            # (whole chains, like validation); -1: all of them, 0: none
    val_fraction: float = 0.1               # share of chains held out for validation (at least one)

    def check(self) -> None:
        """Raise ValueError for a value no run can use (checked before a run directory is written)."""
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"train.precision must be 'bf16' or 'fp32', not {self.precision!r}")
        if self.target_split not in ("val", "train"):
            raise ValueError(f"train.target_split must be 'val' or 'train', not {self.target_split!r}")


@dataclass
class RunConfig:
    """Everything a run needs; written beside every run as JSON and read back on resume."""

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _from_dict(cls, d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _from_dict(cls, d: dict):
    """Rebuild a (nested) config dataclass from ``asdict`` output; unknown keys are an error."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key not in hints:
            raise ValueError(f"{cls.__name__} has no field {key!r}")
        default = getattr(cls(), key) if dataclasses.is_dataclass(cls) else None
        if dataclasses.is_dataclass(default):
            value = _from_dict(type(default), value)
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
