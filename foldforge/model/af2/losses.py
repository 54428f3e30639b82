"""The AF2 training loss (AF2 Suppl. 1.9, eq. 7) and its auxiliary terms.

``af2_loss(outputs, batch, cfg)`` combines, with the weights of :class:`foldforge.config.LossConfig`:

  fape_weight · (backbone_weight · L_FAPE,bb + sidechain_weight · L_FAPE,sc)       1.9.2-1.9.3 (fape.py)
  + chi_weight · L_aux,chi (Alg. 27)  + distogram_weight · L_dist (1.9.8)
  + masked_msa_weight · L_msa (1.9.9) + plddt_weight · L_conf (1.9.6)
  + experimentally_resolved_weight · L_exp (1.9.10) + violation_weight · L_viol (1.9.11, violations.py)

Every term is computed per sample in float32 (shape ``[*]`` for a batch ``[*]``); the total of each
sample is multiplied by ``sqrt(min(seq_length, N_res))`` as in AF2 Suppl. 1.9 / OpenFold, then averaged
over the batch. Terms with weight 0 are skipped, except cheap ones, which are still computed without
gradient so that they can be logged.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from foldforge.config import LossConfig
from foldforge.data import residue_constants as rc
from foldforge.model.af2.fape import backbone_fape, compute_renamed_ground_truth, sidechain_fape
from foldforge.model.af2.violations import device_table, find_structural_violations, violation_loss
from foldforge.model.lddt import lddt

_CA = rc.atom_order["CA"]


def _masked_mean(mask: Tensor, value: Tensor, dims: tuple[int, ...], eps: float = 1e-4) -> Tensor:
    mask = mask.expand_as(value)
    return (mask * value).sum(dims) / (eps + mask.sum(dims))


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax cross entropy against integer labels, through a one-hot product ([*, C] -> [*]).

    A one-hot product instead of ``gather``: the backward of a gather is an atomic scatter on CUDA."""
    one_hot = F.one_hot(labels.long(), logits.shape[-1]).to(torch.float32)
    return -(one_hot * torch.log_softmax(logits.float(), dim=-1)).sum(-1)


def _in_resolution_range(resolution: Tensor, lo: float, hi: float) -> Tensor:
    return ((resolution >= lo) & (resolution <= hi)).float()


def supervised_chi_loss(angles: Tensor, unnormalized_angles: Tensor, aatype: Tensor, seq_mask: Tensor,
                        chi_mask: Tensor, chi_sin_cos: Tensor, *, chi_weight: float = 0.5,
                        angle_norm_weight: float = 0.01, eps: float = 1e-6) -> Tensor:
    """Side-chain torsion loss with angle-norm regulariser (AF2 Suppl. Alg. 27, 1.9.1), over all blocks.

    Args:
      angles: [NB, *, L, 7, 2] normalised predicted (sin, cos); unnormalized_angles: the same before
        normalisation. aatype, seq_mask: [*, L]. chi_mask: [*, L, 4] (``torsion_angles_mask[..., 3:]``);
        chi_sin_cos: [*, L, 4, 2] (``torsion_angles_sin_cos[..., 3:, :]``).

    Pi-periodic chis (ASP chi2, GLU chi3, PHE/TYR chi2) take the smaller error of the true angle and the
    angle + pi. Returns [*]: chi_weight · mean squared chord error over (blocks, residues, chis) +
    angle_norm_weight · mean |‖â‖ - 1| over (blocks, residues, 7 angles).
    """
    pred = angles.float()[..., 3:, :]  # [NB, *, L, 4, 2]
    periodic = device_table(rc.restype_chi_pi_periodic, pred.device)  # [21, 4]
    shift = 1.0 - 2.0 * periodic[aatype.long().clamp(max=rc.UNK_ID)]  # [*, L, 4]: -1 where pi-periodic
    true = chi_sin_cos.float()
    err = ((true - pred) ** 2).sum(-1)  # [NB, *, L, 4]
    err_shifted = ((true * shift[..., None] - pred) ** 2).sum(-1)
    sq_chi = torch.minimum(err, err_shifted).movedim(0, -3)  # [*, NB, L, 4]
    chi_loss = _masked_mean(chi_mask.float()[..., None, :, :], sq_chi, (-1, -2, -3))

    norm = torch.sqrt((unnormalized_angles.float() ** 2).sum(-1) + eps)  # [NB, *, L, 7]
    norm_err = (norm - 1.0).abs().movedim(0, -3)  # [*, NB, L, 7]
    norm_loss = _masked_mean(seq_mask.float()[..., None, :, None], norm_err, (-1, -2, -3))
    return chi_weight * chi_loss + angle_norm_weight * norm_loss


def distogram_loss(logits: Tensor, pseudo_beta: Tensor, pseudo_beta_mask: Tensor, *, min_bin: float = 2.3125,
                   max_bin: float = 21.6875, eps: float = 1e-6) -> Tensor:
    """Distogram cross entropy on pseudo-beta distances (AF2 Suppl. 1.9.8).

    logits [*, L, L, B]: B bins with B-1 equally spaced edges from ``min_bin`` to ``max_bin`` (Å), the
    last bin open-ended. pseudo_beta [*, L, 3], pseudo_beta_mask [*, L]. Returns [*] (mean over pairs,
    the diagonal included as in AF2).
    """
    num_bins = logits.shape[-1]
    edges = torch.linspace(min_bin, max_bin, num_bins - 1, device=logits.device) ** 2
    pb = pseudo_beta.float()
    d2 = ((pb[..., :, None, :] - pb[..., None, :, :]) ** 2).sum(-1, keepdim=True)  # [*, L, L, 1]
    true_bin = (d2 > edges).sum(-1)  # [*, L, L]
    mask = pseudo_beta_mask.float()
    pair_mask = mask[..., :, None] * mask[..., None, :]
    return (_cross_entropy(logits, true_bin) * pair_mask).sum((-1, -2)) / (eps + pair_mask.sum((-1, -2)))


def masked_msa_loss(logits: Tensor, true_msa: Tensor, bert_mask: Tensor, *, eps: float = 1e-8) -> Tensor:
    """BERT-style masked MSA loss (AF2 Suppl. 1.9.9): cross entropy over the masked positions.

    logits [*, N, L, 23]; true_msa, bert_mask [*, N, L] (one recycling copy). Returns [*].
    """
    mask = bert_mask.float()
    return (_cross_entropy(logits, true_msa) * mask).sum((-1, -2)) / (eps + mask.sum((-1, -2)))


def plddt_loss(logits: Tensor, pred_atom37: Tensor, true_atom37: Tensor, mask37: Tensor, resolution: Tensor, *,
               cutoff: float = 15.0, min_resolution: float = 0.1, max_resolution: float = 3.0,
               eps: float = 1e-10) -> Tensor:
    """pLDDT loss (AF2 Suppl. 1.9.6, Alg. 29): the per-residue lDDT-Cα of the final structure (no
    gradient), binned into ``logits.shape[-1]`` equal bins of [0, 1], as the cross-entropy target.

    logits [*, L, 50]; pred_atom37/true_atom37 [*, L, 37, 3]; mask37 [*, L, 37]; resolution [*]. Only
    samples with min_resolution <= resolution <= max_resolution contribute. Returns [*].
    """
    num_bins = logits.shape[-1]
    ca_mask = mask37[..., _CA].float()  # [*, L]
    score = lddt(pred_atom37[..., _CA, :], true_atom37[..., _CA, :], ca_mask, cutoff=cutoff, eps=eps)
    true_bin = torch.floor(score * num_bins).long().clamp(0, num_bins - 1)  # [*, L]
    loss = (_cross_entropy(logits, true_bin) * ca_mask).sum(-1) / (eps + ca_mask.sum(-1))
    return loss * _in_resolution_range(resolution, min_resolution, max_resolution)


def experimentally_resolved_loss(logits: Tensor, atom37_atom_exists: Tensor, all_atom_mask: Tensor,
                                 resolution: Tensor, *, min_resolution: float = 0.1, max_resolution: float = 3.0,
                                 eps: float = 1e-8) -> Tensor:
    """Experimentally-resolved head loss (AF2 Suppl. 1.9.10): per-atom sigmoid cross entropy against
    ``all_atom_mask`` over the atoms the residue type has. logits [*, L, 37]; masks [*, L, 37]. Returns [*].
    """
    exists = atom37_atom_exists.float()
    errors = F.binary_cross_entropy_with_logits(logits.float(), all_atom_mask.float(), reduction="none")
    loss = (errors * exists).sum((-1, -2)) / (eps + exists.sum((-1, -2)))
    return loss * _in_resolution_range(resolution, min_resolution, max_resolution)


def _last_recycle(t: Tensor, logits: Tensor) -> Tensor:
    """MSA targets carry a recycling axis ([*, R, N, L]); the loss uses the last copy (the one the
    gradient pass saw). Tensors already without it ([*, N, L]) pass through."""
    return t[..., -1, :, :] if t.dim() == logits.dim() else t


def af2_loss(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], cfg: LossConfig, *,
             scale_by_sqrt_length: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The AF2 loss (AF2 Suppl. 1.9 eq. 7) of one (batched) forward pass.

    Args:
      outputs: model outputs (``sm_frames`` [NB, *, L, 4, 4], ``sm_sidechain_frames`` [NB, *, L, 8, 4, 4],
        ``sm_positions`` [NB, *, L, 14, 3], ``sm_angles``/``sm_unnormalized_angles`` [NB, *, L, 7, 2],
        ``final_atom_positions`` [*, L, 37, 3], ``distogram_logits``, ``masked_msa_logits``,
        ``plddt_logits``, ``experimentally_resolved_logits``). A head whose logits are absent is skipped.
      batch: ``AF2Batch.as_dict()`` (optionally collated).
      cfg: weights and constants.
      scale_by_sqrt_length: multiply each sample's total by sqrt(min(seq_length, N_res)) (AF2/OpenFold).

    Returns (total: scalar with gradient, terms: detached scalars — each term unweighted and averaged
    over the batch, plus ``unscaled_loss``, ``loss`` and the ``lddt_ca`` of the final structure).
    """
    per_sample: dict[str, Tensor] = {}
    total = 0.0

    def term(name: str, weight: float, fn: Callable[[], Tensor], cheap: bool = True) -> None:
        nonlocal total
        if weight != 0:
            value = fn()
            total = total + weight * value
        elif cheap:
            with torch.no_grad():
                value = fn()
        else:
            return
        per_sample[name] = value.detach()

    aatype, seq_mask = batch["aatype"], batch["seq_mask"]
    gt_frames = batch["rigidgroups_gt_frames"]
    gt_exists = batch["rigidgroups_gt_exists"]
    term("fape_backbone", cfg.fape_weight * cfg.fape_backbone_weight, lambda: backbone_fape(
        outputs["sm_frames"], gt_frames[..., 0, :, :], gt_exists[..., 0], batch.get("use_clamped_fape"),
        clamp=cfg.fape_clamp_distance, length_scale=cfg.fape_length_scale))
    final_pos = outputs["sm_positions"][-1]  # [*, L, 14, 3]

    def sidechain() -> Tensor:
        renamed = compute_renamed_ground_truth(
            final_pos, batch["atom14_gt_positions"], batch["atom14_alt_gt_positions"],
            batch["atom14_gt_exists"], batch["atom14_alt_gt_exists"], batch["atom14_atom_is_ambiguous"])
        return sidechain_fape(
            outputs["sm_sidechain_frames"][-1], final_pos, gt_frames, batch["rigidgroups_alt_gt_frames"],
            gt_exists, renamed["renamed_atom14_gt_positions"], renamed["renamed_atom14_gt_exists"],
            renamed["alt_naming_is_better"], clamp=cfg.fape_clamp_distance, length_scale=cfg.fape_length_scale)

    term("fape_sidechain", cfg.fape_weight * cfg.fape_sidechain_weight, sidechain, cheap=False)

    term("supervised_chi", cfg.chi_weight, lambda: supervised_chi_loss(
        outputs["sm_angles"], outputs["sm_unnormalized_angles"], aatype, seq_mask,
        batch["torsion_angles_mask"][..., 3:], batch["torsion_angles_sin_cos"][..., 3:, :],
        chi_weight=cfg.chi_angle_weight, angle_norm_weight=cfg.chi_angle_norm_weight))

    if "distogram_logits" in outputs:
        term("distogram", cfg.distogram_weight, lambda: distogram_loss(
            outputs["distogram_logits"], batch["pseudo_beta"], batch["pseudo_beta_mask"],
            min_bin=cfg.distogram_min, max_bin=cfg.distogram_max))
    if "masked_msa_logits" in outputs:
        logits = outputs["masked_msa_logits"]
        term("masked_msa", cfg.masked_msa_weight, lambda: masked_msa_loss(
            logits, _last_recycle(batch["true_msa"], logits), _last_recycle(batch["bert_mask"], logits)))
    resolution = batch["resolution"]
    if "plddt_logits" in outputs:
        term("plddt", cfg.plddt_weight, lambda: plddt_loss(
            outputs["plddt_logits"], outputs["final_atom_positions"], batch["all_atom_positions"],
            batch["all_atom_mask"], resolution, cutoff=cfg.plddt_cutoff,
            min_resolution=cfg.min_resolution, max_resolution=cfg.max_resolution))
    if "experimentally_resolved_logits" in outputs:
        exists37 = batch.get("atom37_atom_exists")
        if exists37 is None:
            exists37 = device_table(rc.restype_atom37_mask, aatype.device)[
                aatype.long().clamp(max=rc.UNK_ID)] * seq_mask[..., None]
        term("experimentally_resolved", cfg.experimentally_resolved_weight, lambda: experimentally_resolved_loss(
            outputs["experimentally_resolved_logits"], exists37, batch["all_atom_mask"], resolution,
            min_resolution=cfg.min_resolution, max_resolution=cfg.max_resolution))

    def violation() -> Tensor:
        exists14 = batch["atom14_atom_exists"] * seq_mask[..., None]
        v = find_structural_violations(
            outputs["sm_positions"][-1], aatype, batch["residue_index"], exists14,
            violation_tolerance_factor=cfg.violation_tolerance_factor,
            clash_overlap_tolerance=cfg.clash_overlap_tolerance)
        return violation_loss(v, exists14)

    term("violation", cfg.violation_weight, violation, cheap=False)

    if not torch.is_tensor(total):  # every weight was 0
        total = seq_mask.new_zeros(seq_mask.shape[:-1])
    terms = {k: v.mean() for k, v in per_sample.items()}
    if "fape_backbone" in terms and "fape_sidechain" in terms:
        terms["fape"] = (cfg.fape_backbone_weight * terms["fape_backbone"]
                         + cfg.fape_sidechain_weight * terms["fape_sidechain"])
    terms["unscaled_loss"] = total.detach().mean()
    if scale_by_sqrt_length:
        # AF2 Suppl. 1.9: scale by the square root of the number of residues in the crop.
        n_res = torch.clamp(batch["seq_length"].float(), max=float(seq_mask.shape[-1]))
        total = total * torch.sqrt(n_res)
    total = total.mean()
    terms["loss"] = total.detach()
    if "final_atom_positions" in outputs:
        terms["lddt_ca"] = lddt(outputs["final_atom_positions"][..., _CA, :], batch["all_atom_positions"][..., _CA, :],
                                batch["all_atom_mask"][..., _CA], cutoff=cfg.plddt_cutoff, per_residue=False).mean()
    return total, terms
