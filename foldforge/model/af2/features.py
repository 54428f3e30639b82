"""Model input features built on device from the compact :class:`~foldforge.data.batch.AF2Batch` tensors.

The data pipeline ships residue types as ``int8`` indices and leaves every one-hot to the model, so a
batch crosses PCIe at a fraction of its float size (``msa`` int8 ``[B, R, 124, 256]`` is 127 KB per copy
where its one-hot would be 12 MB). Everything here is a pure function of batch tensors (no weights).

Channel layouts follow AF2 Suppl. 1.2.9 / Table 1 and OpenFold's ``data_transforms.make_msa_feat``,
``feats.build_extra_msa_feat``, ``build_template_pair_feat`` and ``build_template_angle_feat``
(the MLPerf HPC reference uses the same order):

- ``target_feat`` [*, L, 22] = between_segment_residues (0 for one chain) | one_hot(aatype, 21)
- ``msa_feat`` [*, N, L, 49] = one_hot(msa, 23) | has_deletion | deletion_value | cluster_profile (23)
  | cluster_deletion_mean
- ``extra_msa_feat`` [*, N_e, L, 25] = one_hot(extra_msa, 23) | has_deletion | deletion_value
- ``template_pair_feat`` [*, L, L, 88] = distogram (39) | pseudo-beta mask 2-d | aatype_j (22)
  | aatype_i (22) | unit vector x, y, z (3) | backbone mask 2-d, all times the backbone mask 2-d
- ``template_angle_feat`` [*, T, L, 57] = one_hot(aatype, 22) | torsion sin/cos (14) | alt torsion
  sin/cos (14) | torsion mask (7)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from foldforge.data import residue_constants as rc
from foldforge.model.geometry import Rigid

# Batch fields that carry one independently sampled MSA per recycling iteration: [B, R, N, L, ...].
RECYCLED_MSA_KEYS = (
    "msa", "true_msa", "bert_mask", "msa_mask", "msa_has_deletion", "msa_deletion_value",
    "cluster_profile", "cluster_deletion_mean",
    "extra_msa", "extra_msa_mask", "extra_has_deletion", "extra_deletion_value",
)

# OpenFold's monomer config sets template.use_unit_vector = False (the AF2 monomer models too): the three
# unit-vector channels stay in the 88-channel layout but are zero.
USE_TEMPLATE_UNIT_VECTOR = False


def recycle_index(batch: dict[str, Tensor], iteration: int, num_recycles: int) -> int:
    """MSA copy read by ``iteration`` (0..num_recycles) of a forward with ``num_recycles`` no-grad passes.

    Copies are aligned to the END: the gradient pass always reads the last copy R - 1, the no-grad pass
    before it R - 2, and so on (copy 0 for all earlier passes when R is short). The copies are iid
    samples, so which one a pass reads does not matter statistically; aligning to the end means the
    masked-MSA targets of the gradient pass are always ``true_msa[:, -1]`` / ``bert_mask[:, -1]`` (as
    ``losses.af2_loss`` reads them, and as OpenFold, which truncates the batch to num_recycles + 1
    copies), whatever ``num_recycles`` was drawn, and the gradient pass indexes a fixed copy.
    """
    return max(0, batch["msa"].shape[1] - 1 - (num_recycles - iteration))


def target_feat(aatype: Tensor) -> Tensor:
    """``aatype`` int [*, L] -> [*, L, 22]: has_break (always 0, one chain) then one_hot(aatype, 21)."""
    one_hot = F.one_hot(aatype.long().clamp(max=rc.UNK_ID), rc.NUM_RESTYPES_WITH_X).float()
    return F.pad(one_hot, (1, 0))


def msa_feat(batch: dict[str, Tensor], r: int) -> Tensor:
    """Cluster-centre features of recycle copy ``r``: [B, N_clust, L, 49] (AF2 Suppl. 1.2.9)."""
    msa = batch["msa"][:, r].long()
    return torch.cat([
        F.one_hot(msa, 23).float(),
        batch["msa_has_deletion"][:, r, ..., None],
        batch["msa_deletion_value"][:, r, ..., None],
        batch["cluster_profile"][:, r],
        batch["cluster_deletion_mean"][:, r, ..., None],
    ], dim=-1)


def extra_msa_feat(batch: dict[str, Tensor], r: int) -> Tensor:
    """Extra-MSA features of recycle copy ``r``: [B, N_extra, L, 25]."""
    return torch.cat([
        F.one_hot(batch["extra_msa"][:, r].long(), 23).float(),
        batch["extra_has_deletion"][:, r, ..., None],
        batch["extra_deletion_value"][:, r, ..., None],
    ], dim=-1)


def distogram_one_hot(x: Tensor, min_bin: float, max_bin: float, num_bins: int, inf: float) -> Tensor:
    """Pairwise distances of ``x`` [*, L, 3] binned as AF2 does: [*, L, L, num_bins].

    Bin k holds lower_k < d <= lower_{k+1} with lower = linspace(min_bin, max_bin) (compared squared); the
    last bin is open up to sqrt(inf); distances below ``min_bin`` hit no bin (all-zero row).
    """
    x = x.float()
    d2 = (x[..., :, None, :] - x[..., None, :, :]).pow(2).sum(-1, keepdim=True)
    lower = torch.linspace(min_bin, max_bin, num_bins, device=x.device, dtype=x.dtype) ** 2
    upper = torch.cat([lower[1:], lower.new_tensor([inf])])
    return ((d2 > lower) & (d2 < upper)).to(x.dtype)


def pseudo_beta(aatype: Tensor, atom37: Tensor) -> Tensor:
    """CB position, CA for glycine (AF2 Suppl. 1.2.9): ``atom37`` [*, L, 37, 3] -> [*, L, 3]."""
    is_gly = (aatype.long() == rc.restype_order["G"])[..., None]
    return torch.where(is_gly, atom37[..., rc.atom_order["CA"], :], atom37[..., rc.atom_order["CB"], :])


def template_pair_feat(t: dict[str, Tensor], *, min_bin: float, max_bin: float, num_bins: int, inf: float,
                       use_unit_vector: bool = USE_TEMPLATE_UNIT_VECTOR, eps: float = 1e-20) -> Tensor:
    """Pair features of ONE template (AF2 Suppl. 1.7.1 Table 1; OpenFold ``build_template_pair_feat``).

    ``t`` holds the template's tensors without the template axis: ``template_pseudo_beta`` [*, L, 3],
    ``template_pseudo_beta_mask`` [*, L], ``template_aatype`` [*, L], ``template_backbone_frame``
    [*, L, 4, 4], ``template_backbone_frame_mask`` [*, L]. Returns [*, L, L, num_bins + 49].
    """
    pb_mask = t["template_pseudo_beta_mask"].float()
    pb_mask_2d = pb_mask[..., :, None] * pb_mask[..., None, :]
    dgram = distogram_one_hot(t["template_pseudo_beta"], min_bin, max_bin, num_bins, inf)
    aa = F.one_hot(t["template_aatype"].long(), rc.NUM_RESTYPES_WITH_X + 1).to(dgram.dtype)  # [*, L, 22]
    n = aa.shape[-2]
    bb_mask = t["template_backbone_frame_mask"].float()
    bb_mask_2d = bb_mask[..., :, None] * bb_mask[..., None, :]                           # [*, L, L]
    if use_unit_vector:
        frames = Rigid.from_tensor_4x4(t["template_backbone_frame"].float())
        # [*, L_i, L_j, 3]: CA_j expressed in the backbone frame of residue i
        vec = frames.unsqueeze(-1).invert_apply(frames.trans[..., None, :, :])
        inv_dist = torch.rsqrt(eps + vec.pow(2).sum(-1)) * bb_mask_2d
        unit = vec * inv_dist[..., None]
    else:
        unit = dgram.new_zeros(bb_mask_2d.shape + (3,))
    feat = torch.cat([
        dgram,
        pb_mask_2d[..., None],
        aa[..., None, :, :].expand(*aa.shape[:-2], n, n, aa.shape[-1]),   # [i, j] -> aatype_j
        aa[..., :, None, :].expand(*aa.shape[:-2], n, n, aa.shape[-1]),   # [i, j] -> aatype_i
        unit,
        bb_mask_2d[..., None],
    ], dim=-1)
    return feat * bb_mask_2d[..., None]


def template_angle_feat(batch: dict[str, Tensor]) -> Tensor:
    """Template torsion-angle rows (AF2 Suppl. 1.7.2, Table 1): [B, T, L, 57]."""
    sin_cos = batch["template_torsion_angles_sin_cos"]
    alt = batch["template_alt_torsion_angles_sin_cos"]
    return torch.cat([
        F.one_hot(batch["template_aatype"].long(), rc.NUM_RESTYPES_WITH_X + 1).to(sin_cos.dtype),
        sin_cos.flatten(-2),
        alt.flatten(-2),
        batch["template_torsion_angles_mask"],
    ], dim=-1)
