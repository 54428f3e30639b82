"""Structure-quality metrics of one chain: lDDT-Cα, full-atom lDDT, Cα-RMSD, distogram accuracy, pLDDT.

Definitions (each function states its own; shapes are of ONE chain without padding):

- **lDDT-Cα** is the MLPerf HPC OpenFold evaluation metric, computed by :func:`foldforge.model.lddt.lddt`
  (AF2 Suppl. 1.9.6): Cα only, pairs i != j closer than 15 Å in the TRUE structure, thresholds
  0.5/1/2/4 Å, averaged over all scored pairs of the chain.
- **full-atom lDDT** follows the lDDT paper (Mariani et al. 2013) without its stereochemistry checks:
  every heavy atom that the reference has and that its residue type defines (atom37; OXT is not
  scored, AF2 models do not build it), pairs of atoms of *different* residues closer than 15 Å in the
  reference, same thresholds, averaged over all scored pairs. An atom the model lacks fails its pairs.
  Symmetric side chains (ASP, GLU, PHE, TYR; AF2 Suppl. 1.8.5 ``residue_atom_renaming_swaps``) are scored
  under the naming of the model atoms that gives the residue the higher score, decided per residue
  against the other residues' original naming, as the lDDT program does.
- **Cα-RMSD** after optimal superposition (Kabsch 1976, float64 SVD with the reflection fix).
- **distogram accuracy**: the fraction of residue pairs i != j, both pseudo-betas present, whose argmax
  distogram bin (AF2 Suppl. 1.9.8: 64 bins, 63 equal edges 2.3125-21.6875 Å) equals the bin of the true
  pseudo-beta distance. The diagonal is left out (it is always bin 0 and would inflate the score).
- **pLDDT** (AF2 Suppl. Alg. 29): the expected value of the binned lDDT-Cα distribution x 100.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from foldforge.data import residue_constants as rc
from foldforge.model.lddt import LDDT_THRESHOLDS, lddt

_CA = rc.atom_order["CA"]
_OXT = rc.atom_order["OXT"]


def _swap_table() -> np.ndarray:
    """[21, 37] atom37 index each atom takes under the alternative naming (identity elsewhere)."""
    table = np.tile(np.arange(rc.atom_type_num, dtype=np.int64), (rc.NUM_RESTYPES_WITH_X, 1))
    for name, pairs in rc.residue_atom_renaming_swaps.items():
        r = rc.restypes.index(rc.restype_3to1[name])
        for a, b in pairs.items():
            i, j = rc.atom_order[a], rc.atom_order[b]
            table[r, i], table[r, j] = j, i
    return table


ATOM37_SWAP = _swap_table()
# atoms of each residue type that full-atom lDDT scores (the atom37 atoms of the type, OXT excluded)
SCORED_ATOMS37 = rc.restype_atom37_mask.astype(bool).copy()
SCORED_ATOMS37[:, _OXT] = False


def plddt_from_logits(logits: Tensor) -> Tensor:
    """Per-residue pLDDT in [0, 100] (AF2 Suppl. Alg. 29): softmax over the bins of [0, 1] times the
    bin centres, x 100. ``logits`` [*, L, num_bins] -> [*, L] float32."""
    num_bins = logits.shape[-1]
    centres = (torch.arange(num_bins, device=logits.device, dtype=torch.float32) + 0.5) / num_bins
    return (torch.softmax(logits.float(), dim=-1) * centres).sum(-1) * 100.0


def lddt_ca_chain(pred_atom37: Tensor, true_atom37: Tensor, true_mask37: Tensor, *, cutoff: float = 15.0) -> float:
    """lDDT-Cα of one chain (MLPerf/OpenFold): [L, 37, 3], [L, 37, 3], [L, 37] -> float in [0, 1].

    A chain without any scored pair gets 1.0 (AF2's normalisation, as in training)."""
    score = lddt(pred_atom37[..., _CA, :], true_atom37[..., _CA, :], true_mask37[..., _CA],
                 cutoff=cutoff, per_residue=False)
    return float(score)


def _pair_scores(d_true: Tensor, pred_rows: Tensor, pred_cols: Tensor, ok_rows: Tensor, ok_cols: Tensor) -> Tensor:
    """Fraction of thresholds met per pair ([R, C]); pairs with a missing model atom score 0."""
    d_pred = torch.sqrt(((pred_rows[:, None, :] - pred_cols[None, :, :]) ** 2).sum(-1))
    err = (d_true - d_pred).abs()
    score = sum((err < t).to(d_true.dtype) for t in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)
    return score * (ok_rows[:, None] & ok_cols[None, :]).to(d_true.dtype)


def _atom_row_sums(true: Tensor, res: Tensor, rows: Tensor, pred_rows: Tensor, ok_rows: Tensor, pred: Tensor,
                   ok: Tensor, cutoff: float, chunk: int) -> tuple[Tensor, Tensor]:
    """For the atoms ``rows`` (indices into the flat atom list): sum of pair scores against every atom
    of another residue within ``cutoff`` in the reference, and the number of such pairs. Row blocks of
    ``chunk`` atoms bound the memory at [chunk, N_atoms]."""
    score_sum = true.new_zeros(rows.shape[0])
    count = true.new_zeros(rows.shape[0])
    for s in range(0, rows.shape[0], chunk):
        r = rows[s:s + chunk]
        d_true = torch.sqrt(((true[r][:, None, :] - true[None, :, :]) ** 2).sum(-1))   # [R, N]
        scored = (d_true < cutoff) & (res[r][:, None] != res[None, :])
        score = _pair_scores(d_true, pred_rows[s:s + chunk], pred, ok_rows[s:s + chunk], ok)
        score_sum[s:s + chunk] = (score * scored).sum(-1)
        count[s:s + chunk] = scored.sum(-1)
    return score_sum, count


@torch.no_grad()
def lddt_all_atom(pred_atom37: Tensor, true_atom37: Tensor, true_mask37: Tensor, aatype: Tensor, *,
                  pred_mask37: Tensor | None = None, cutoff: float = 15.0, resolve_symmetry: bool = True,
                  chunk: int = 512) -> float:
    """Full-atom lDDT of one chain (module docstring): pred/true [L, 37, 3], masks [L, 37], aatype [L].

    ``pred_mask37`` marks the atoms the model has (default: all); missing model atoms fail their pairs.
    Computed in float64 on the tensors' device. A chain without any scored pair gets 1.0.
    """
    device = true_atom37.device
    aa = aatype.long().clamp(0, rc.UNK_ID)
    atoms = true_mask37.bool() & torch.as_tensor(SCORED_ATOMS37, device=device)[aa]     # [L, 37]
    if pred_mask37 is None:
        pred_mask37 = torch.ones_like(atoms)
    res_idx, atom_idx = torch.nonzero(atoms, as_tuple=True)                              # flat atom list [N]
    true = true_atom37.double()[res_idx, atom_idx]                                       # [N, 3]
    pred37 = pred_atom37.double()
    pmask37 = pred_mask37.bool()
    pred, ok = pred37[res_idx, atom_idx], pmask37[res_idx, atom_idx]
    if resolve_symmetry:
        swap = torch.as_tensor(ATOM37_SWAP, device=device)[aa]                           # [L, 37]
        alt_atom = swap[res_idx, atom_idx]
        amb = torch.nonzero(alt_atom != atom_idx, as_tuple=True)[0]                      # ambiguous atoms
        if amb.numel():
            alt_pred = pred37[res_idx[amb], alt_atom[amb]]
            alt_ok = pmask37[res_idx[amb], alt_atom[amb]]
            # AF2 Suppl. 1.8.5 / lDDT program: per residue, keep the naming with the higher score of
            # its ambiguous atoms against everything else (intra-residue pairs are not scored, so the
            # residue's other atoms do not matter).
            s_orig, _ = _atom_row_sums(true, res_idx, amb, pred[amb], ok[amb], pred, ok, cutoff, chunk)
            s_alt, _ = _atom_row_sums(true, res_idx, amb, alt_pred, alt_ok, pred, ok, cutoff, chunk)
            n_res = aa.shape[0]
            gain = torch.zeros(n_res, dtype=torch.float64, device=device)
            gain.index_add_(0, res_idx[amb], s_alt - s_orig)
            flip = (gain > 0)[res_idx[amb]]
            pred = pred.clone()
            ok = ok.clone()
            pred[amb[flip]] = alt_pred[flip]
            ok[amb[flip]] = alt_ok[flip]
    all_rows = torch.arange(true.shape[0], device=device)
    score_sum, count = _atom_row_sums(true, res_idx, all_rows, pred, ok, pred, ok, cutoff, chunk)
    eps = 1e-10
    return float((eps + score_sum.sum()) / (eps + count.sum()))


def kabsch_rmsd(pred: np.ndarray | Tensor, true: np.ndarray | Tensor, mask: np.ndarray | Tensor | None = None) -> float:
    """RMSD (Å) of ``pred`` [N, 3] against ``true`` [N, 3] after the optimal rigid superposition of pred
    onto true (Kabsch), over the points with ``mask`` (default all). NaN without any point."""
    p = _as_np64(pred)
    t = _as_np64(true)
    if mask is not None:
        m = _as_np64(mask) > 0
        p, t = p[m], t[m]
    if p.shape[0] == 0:
        return math.nan
    p = p - p.mean(0)
    t = t - t.mean(0)
    h = p.T @ t                                        # [3, 3] covariance
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0      # reflection fix: a proper rotation only
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    diff = p @ rot.T - t
    return float(np.sqrt((diff * diff).sum(-1).mean()))


def _as_np64(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def distogram_true_bins(pseudo_beta: Tensor, num_bins: int, *, min_bin: float = 2.3125,
                        max_bin: float = 21.6875) -> Tensor:
    """True distogram bin of every pair (as the AF2 distogram loss, Suppl. 1.9.8): [L, 3] -> [L, L] int."""
    edges = torch.linspace(min_bin, max_bin, num_bins - 1, device=pseudo_beta.device, dtype=torch.float64) ** 2
    pb = pseudo_beta.double()
    d2 = ((pb[:, None, :] - pb[None, :, :]) ** 2).sum(-1, keepdim=True)                 # [L, L, 1]
    return (d2 > edges).sum(-1)


@torch.no_grad()
def distogram_accuracy(logits: Tensor, pseudo_beta: Tensor, pseudo_beta_mask: Tensor, *,
                       min_bin: float = 2.3125, max_bin: float = 21.6875) -> float:
    """Fraction of pairs i != j (both pseudo-betas present) whose argmax bin is the true bin.

    logits [L, L, num_bins]; pseudo_beta [L, 3]; pseudo_beta_mask [L]. NaN without any pair."""
    true_bin = distogram_true_bins(pseudo_beta, logits.shape[-1], min_bin=min_bin, max_bin=max_bin)
    m = pseudo_beta_mask.bool()
    pairs = m[:, None] & m[None, :] & ~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)
    n = int(pairs.sum())
    if n == 0:
        return math.nan
    return float(((logits.argmax(-1) == true_bin) & pairs).sum()) / n


def chain_metrics(pred_atom37: Tensor, pred_mask37: Tensor, true_atom37: Tensor, true_mask37: Tensor,
                  aatype: Tensor, *, distogram_logits: Tensor | None = None, pseudo_beta: Tensor | None = None,
                  pseudo_beta_mask: Tensor | None = None, plddt_logits: Tensor | None = None,
                  distogram_min: float = 2.3125, distogram_max: float = 21.6875) -> dict[str, float]:
    """Every metric of one unpadded chain ([L, ...] tensors); keys ``lddt_ca``, ``lddt``, ``rmsd_ca``,
    ``distogram_acc`` (with the distogram inputs), ``mean_plddt`` (with pLDDT logits), ``num_residues``
    and ``num_observed_ca`` (residues with a true Cα: the residues lDDT-Cα and RMSD score)."""
    ca_mask = true_mask37[:, _CA] > 0
    out: dict[str, float] = {
        "lddt_ca": lddt_ca_chain(pred_atom37, true_atom37, true_mask37),
        "lddt": lddt_all_atom(pred_atom37, true_atom37, true_mask37, aatype, pred_mask37=pred_mask37),
        "rmsd_ca": kabsch_rmsd(pred_atom37[:, _CA], true_atom37[:, _CA], ca_mask),
    }
    if distogram_logits is not None and pseudo_beta is not None and pseudo_beta_mask is not None:
        out["distogram_acc"] = distogram_accuracy(distogram_logits, pseudo_beta, pseudo_beta_mask,
                                                  min_bin=distogram_min, max_bin=distogram_max)
    if plddt_logits is not None:
        out["mean_plddt"] = float(plddt_from_logits(plddt_logits).mean())
    out["num_residues"] = int(aatype.shape[0])
    out["num_observed_ca"] = int(ca_mask.sum())
    return out
