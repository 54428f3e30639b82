"""lDDT and lDDT-Cα (Mariani et al. 2013; AF2 Suppl. 1.9.6, Alg. 29) as used by AF2/OpenFold/MLPerf.

The definition is the one of AF2's ``lddt`` / OpenFold's ``lddt`` (the MLPerf HPC OpenFold evaluation
metric), not the full lDDT program: a pair (i, j), i != j, is scored when both points exist and they are
closer than ``cutoff`` (15 Å) in the TRUE structure; its score is the fraction of the thresholds
0.5, 1, 2 and 4 Å that its distance error ``|d_true - d_pred|`` stays below. There is no stereochemistry
check and no per-residue-pair exclusion beyond i != j (for Cα only, one point per residue, that is the
whole definition).

Normalisation follows AF2 exactly: ``(eps + sum score) / (eps + sum scored)``, so a point (or a whole
chain) without any scored pair gets 1.0; callers that average per-residue scores mask such points.

Used by the pLDDT loss (``foldforge.model.af2.losses``, per residue, detached) and by evaluation
(``per_residue=False``: one score per chain, the mean over all scored pairs).
"""
from __future__ import annotations

import torch
from torch import Tensor

from foldforge.data import residue_constants as rc

# Distance-error thresholds of lDDT (Å); the score of a pair is the fraction it stays below.
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
_CA = rc.atom_order["CA"]


def _distances(pos: Tensor, eps: float) -> Tensor:
    """[*, N, 3] -> pairwise distances [*, N, N], computed as sqrt(eps + |x_i - x_j|^2).

    An explicit difference (not ``torch.cdist``, which uses |x|^2 + |y|^2 - 2 x.y through a matmul and
    loses ~1e-2 Å at 100 Å coordinates in fp32, or more under TF32)."""
    diff = pos[..., :, None, :] - pos[..., None, :, :]  # [*, N, N, 3]
    return torch.sqrt(eps + (diff * diff).sum(-1))


@torch.no_grad()
def lddt(
    pred_pos: Tensor,
    true_pos: Tensor,
    mask: Tensor,
    *,
    cutoff: float = 15.0,
    per_residue: bool = True,
    eps: float = 1e-10,
) -> Tensor:
    """lDDT of ``pred_pos`` against ``true_pos`` (AF2 Suppl. 1.9.6; OpenFold/MLPerf definition).

    Args:
      pred_pos: [*, N, 3] predicted points (Å).
      true_pos: [*, N, 3] ground-truth points (Å).
      mask: [*, N] 1 where the point exists in the ground truth.
      cutoff: inclusion radius in the true structure (Å).
      per_residue: True -> [*, N] score per point (mean over its scored partners); False -> [*] one
        score per structure (mean over all scored pairs, the lDDT-Cα of a chain for Cα inputs).
      eps: regulariser of the square roots and of the normalisation (AF2: 1e-10).

    Returns [*, N] or [*] scores in [0, 1], float32. Not differentiable (a step function); computed
    without gradient.
    """
    pred = pred_pos.float()
    true = true_pos.float()
    mask = mask.float()
    n = mask.shape[-1]
    d_true = _distances(true, eps)  # [*, N, N]
    d_pred = _distances(pred, eps)  # [*, N, N]
    not_self = 1.0 - torch.eye(n, dtype=torch.float32, device=mask.device)
    scored = (d_true < cutoff).float() * mask[..., :, None] * mask[..., None, :] * not_self  # [*, N, N]

    err = (d_true - d_pred).abs()
    score = sum((err < t).float() for t in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)  # [*, N, N]

    dims = (-1,) if per_residue else (-2, -1)
    return (eps + (scored * score).sum(dims)) / (eps + scored.sum(dims))


def lddt_ca(
    pred_atom37: Tensor,
    true_atom37: Tensor,
    mask37: Tensor,
    *,
    cutoff: float = 15.0,
    per_residue: bool = True,
    eps: float = 1e-10,
) -> Tensor:
    """lDDT-Cα: :func:`lddt` on the CA atoms of atom37 arrays.

    Args:
      pred_atom37: [*, L, 37, 3]; true_atom37: [*, L, 37, 3]; mask37: [*, L, 37] ground-truth atom mask.

    Returns [*, L] (``per_residue``) or [*] (per chain: mean over all scored Cα pairs).
    """
    return lddt(pred_atom37[..., _CA, :], true_atom37[..., _CA, :], mask37[..., _CA],
                cutoff=cutoff, per_residue=per_residue, eps=eps)
