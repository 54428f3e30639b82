"""The model-ready AF2 batch as torch tensors (no model code is imported here).

:func:`foldforge.data.transforms.make_af2_batch` returns numpy arrays; :meth:`AF2Batch.from_numpy`
wraps them without copying, :func:`collate` stacks samples along a new leading batch dimension.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Mapping, Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class AF2Batch:
    """One AF2 training sample (or a batch of them, with a leading batch dim ``B`` after :func:`collate`).

    Shapes of one sample, with R = recycling copies (``DataConfig.num_recycle_copies``), N_c =
    ``max_msa_clusters``, N_e = ``max_extra_msa``, T = ``max_templates``, L = ``crop_size``:

    Sequence
      aatype                       int8    [L]            AF2 residue type (X = 20), 0 in padding
      residue_index                int32   [L]            position in the full chain sequence
      seq_mask                     float32 [L]            1 for real residues
      seq_length                   int32   []             number of real residues
      resolution                   float32 []             experimental resolution (0 if unknown)
    MSA cluster centres (one independent sample per recycling copy)
      msa                          int8    [R, N_c, L]    after masked-MSA corruption (mask token 22)
      true_msa                     int8    [R, N_c, L]    before corruption (masked-MSA target)
      bert_mask                    float32 [R, N_c, L]    1 where a position was selected for corruption
      msa_mask                     float32 [R, N_c, L]    1 for real rows x real residues
      msa_has_deletion             float32 [R, N_c, L]    deletion count > 0
      msa_deletion_value           float32 [R, N_c, L]    2/pi * arctan(deletions / 3)
      cluster_profile              float32 [R, N_c, L, 23] class distribution of the cluster
      cluster_deletion_mean        float32 [R, N_c, L]    2/pi * arctan(mean cluster deletions / 3)
    Extra MSA
      extra_msa                    int8    [R, N_e, L]
      extra_msa_mask               float32 [R, N_e, L]
      extra_has_deletion           float32 [R, N_e, L]
      extra_deletion_value         float32 [R, N_e, L]
    Templates
      template_aatype              int8    [T, L]
      template_all_atom_positions  float32 [T, L, 37, 3]
      template_all_atom_mask       float32 [T, L, 37]
      template_mask                float32 [T]            1 for real templates
      template_sum_probs           float32 [T]
      template_pseudo_beta         float32 [T, L, 3]      (+ _mask [T, L]) CB, or CA for glycine
      template_backbone_frame      float32 [T, L, 4, 4]   (+ _mask [T, L]) N-CA-C frame (Alg. 21)
      template_torsion_angles_sin_cos, template_alt_torsion_angles_sin_cos  float32 [T, L, 7, 2]
      template_torsion_angles_mask float32 [T, L, 7]
      use_clamped_fape             float32 []             1: clamp backbone FAPE this sample (p = 0.9)
    Structure
      all_atom_positions           float32 [L, 37, 3]
      all_atom_mask                float32 [L, 37]
    Ground-truth targets (``foldforge.data.targets``; None when the record has none)
      atom14_gt_positions          float32 [L, 14, 3]
      atom14_gt_exists             float32 [L, 14]
      atom14_atom_exists           float32 [L, 14]
      residx_atom14_to_atom37      int32   [L, 14]
      residx_atom37_to_atom14      int32   [L, 37]
      atom37_atom_exists           float32 [L, 37]
      atom14_atom_is_ambiguous     float32 [L, 14]
      atom14_alt_gt_positions      float32 [L, 14, 3]
      atom14_alt_gt_exists         float32 [L, 14]
      rigidgroups_gt_frames        float32 [L, 8, 4, 4]
      rigidgroups_gt_exists        float32 [L, 8]
      rigidgroups_group_exists     float32 [L, 8]
      rigidgroups_group_is_ambiguous float32 [L, 8]
      rigidgroups_alt_gt_frames    float32 [L, 8, 4, 4]
      torsion_angles_sin_cos       float32 [L, 7, 2]
      alt_torsion_angles_sin_cos   float32 [L, 7, 2]
      torsion_angles_mask          float32 [L, 7]
      pseudo_beta                  float32 [L, 3]
      pseudo_beta_mask             float32 [L]
    """

    aatype: torch.Tensor
    residue_index: torch.Tensor
    seq_mask: torch.Tensor
    seq_length: torch.Tensor
    resolution: torch.Tensor
    msa: torch.Tensor
    true_msa: torch.Tensor
    bert_mask: torch.Tensor
    msa_mask: torch.Tensor
    msa_has_deletion: torch.Tensor
    msa_deletion_value: torch.Tensor
    cluster_profile: torch.Tensor
    cluster_deletion_mean: torch.Tensor
    extra_msa: torch.Tensor
    extra_msa_mask: torch.Tensor
    extra_has_deletion: torch.Tensor
    extra_deletion_value: torch.Tensor
    template_aatype: torch.Tensor
    template_all_atom_positions: torch.Tensor
    template_all_atom_mask: torch.Tensor
    template_mask: torch.Tensor
    template_sum_probs: torch.Tensor
    use_clamped_fape: torch.Tensor
    all_atom_positions: torch.Tensor
    all_atom_mask: torch.Tensor
    template_pseudo_beta: Optional[torch.Tensor] = None
    template_pseudo_beta_mask: Optional[torch.Tensor] = None
    template_backbone_frame: Optional[torch.Tensor] = None
    template_backbone_frame_mask: Optional[torch.Tensor] = None
    template_torsion_angles_sin_cos: Optional[torch.Tensor] = None
    template_alt_torsion_angles_sin_cos: Optional[torch.Tensor] = None
    template_torsion_angles_mask: Optional[torch.Tensor] = None
    atom14_gt_positions: Optional[torch.Tensor] = None
    atom14_gt_exists: Optional[torch.Tensor] = None
    atom14_atom_exists: Optional[torch.Tensor] = None
    residx_atom14_to_atom37: Optional[torch.Tensor] = None
    residx_atom37_to_atom14: Optional[torch.Tensor] = None
    atom37_atom_exists: Optional[torch.Tensor] = None
    atom14_atom_is_ambiguous: Optional[torch.Tensor] = None
    atom14_alt_gt_positions: Optional[torch.Tensor] = None
    atom14_alt_gt_exists: Optional[torch.Tensor] = None
    rigidgroups_gt_frames: Optional[torch.Tensor] = None
    rigidgroups_gt_exists: Optional[torch.Tensor] = None
    rigidgroups_group_exists: Optional[torch.Tensor] = None
    rigidgroups_group_is_ambiguous: Optional[torch.Tensor] = None
    rigidgroups_alt_gt_frames: Optional[torch.Tensor] = None
    torsion_angles_sin_cos: Optional[torch.Tensor] = None
    alt_torsion_angles_sin_cos: Optional[torch.Tensor] = None
    torsion_angles_mask: Optional[torch.Tensor] = None
    pseudo_beta: Optional[torch.Tensor] = None
    pseudo_beta_mask: Optional[torch.Tensor] = None

    # ---- construction ----

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def required_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.default is dataclasses.MISSING)

    @classmethod
    def from_numpy(cls, d: Mapping[str, np.ndarray]) -> "AF2Batch":
        """Wrap the arrays of :func:`make_af2_batch` as tensors sharing their memory (no copy)."""
        names = set(cls.field_names())
        unknown = sorted(set(d) - names)
        if unknown:
            raise KeyError(f"AF2Batch has no field for {unknown}; add a field (and its shape) to AF2Batch")
        missing = [k for k in cls.required_names() if k not in d]
        if missing:
            raise KeyError(f"AF2Batch.from_numpy: missing {missing}")
        return cls(**{k: torch.from_numpy(np.asarray(v)) for k, v in d.items()})

    # ---- access ----

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that are present (targets that are None are left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def _map(self, fn) -> "AF2Batch":
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.as_dict().items()})

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "AF2Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "AF2Batch":
        """Page-locked copies (DataLoader(pin_memory=True) calls this in its pinning thread)."""
        return self._map(lambda t: t.pin_memory())


def collate(batches: Sequence[AF2Batch]) -> AF2Batch:
    """Stack samples along a new leading batch dim (all samples must have the same fields present)."""
    if not batches:
        raise ValueError("collate: empty list")
    first = batches[0]
    out = {}
    for f in fields(AF2Batch):
        values = [getattr(b, f.name) for b in batches]
        present = [v is not None for v in values]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"collate: field {f.name!r} is missing in some samples")
        out[f.name] = torch.stack(values)
    return dataclasses.replace(first, **out)
