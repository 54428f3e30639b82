"""Structural violation loss (AF2 Suppl. 1.9.11, eq. 44-47): bonds, angles and clashes of a prediction.

Three flat-bottom terms on the predicted atom14 positions of the final structure-module block:

* peptide geometry between consecutive residues (eq. 44-45): the C-N bond length and the CA-C-N and
  C-N-CA bond angles (as cosines), each penalised beyond ``tolerance_factor`` literature standard
  deviations;
* between-residue clashes (eq. 46): non-bonded atom pairs of different residues closer than the sum of
  their van der Waals radii minus ``clash_overlap_tolerance``;
* within-residue violations (eq. 46-47): bonded pairs and 1-3 ("virtual bond") pairs outside
  ``length ± tolerance_factor·stddev`` of ``resources/stereo_chemical_props.txt``, other pairs closer
  than the van der Waals sum minus the tolerance.

The literature table is parsed at first use (never at import) and cached; the per-residue-type bound
tables are built once per (tolerances, device).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from foldforge.data import residue_constants as rc

STEREO_CHEMICAL_PROPS = Path(__file__).parent / "resources" / "stereo_chemical_props.txt"

# Van der Waals radii (Å) by element, the first letter of the atom name (AF2 residue_constants).
VAN_DER_WAALS_RADIUS = {"C": 1.7, "N": 1.55, "O": 1.52, "S": 1.8}
# Peptide bond C(i)-N(i+1): (general, before proline) length and stddev (Å) (Engh & Huber via AF2).
C_N_LENGTH = (1.329, 1.341)
C_N_STDDEV = (0.014, 0.016)
# cos of the angles at the peptide bond: (mean, stddev). AF2 (and OpenFold) score the CA-C-N angle with
# the C-N *bond length* stddev 0.014 instead of its own 0.0311; we keep AF2's value so the loss matches.
COS_CA_C_N = (-0.4473, 0.014)
COS_C_N_CA = (-0.5203, 0.0353)
_PRO = rc.restype_order["P"]
_CYS = rc.restype_order["C"]
_N, _CA, _C = 0, 1, 2  # atom14 slots of the backbone
_CYS_SG = rc.restype_name_to_atom14_names["CYS"].index("SG")


class Bond(NamedTuple):
    atom1: str
    atom2: str
    length: float  # Å
    stddev: float


class BondAngle(NamedTuple):
    atom1: str
    atom2: str  # the vertex
    atom3: str
    angle: float  # radians
    stddev: float


@functools.lru_cache(maxsize=None)
def load_stereo_chemical_props(path: str | None = None):
    """Bonds, virtual 1-3 bonds and bond angles per residue (3-letter name) from the literature table.

    Returns (bonds, virtual_bonds, angles), each ``dict[resname, list]``. A virtual bond spans the two
    outer atoms of a bond angle; its length follows from the law of cosines and its stddev from
    first-order error propagation of the two bond lengths and the angle.
    """
    text = Path(path or STEREO_CHEMICAL_PROPS).read_text()
    sections = [s.strip().splitlines() for s in text.split("\n-\n")]
    bonds: dict[str, list[Bond]] = {name: [] for name in rc.resnames}
    angles: dict[str, list[BondAngle]] = {name: [] for name in rc.resnames}
    for line in sections[0][1:]:  # "CA-CB  ALA  1.520  0.021"
        atoms, res, mean, std = line.split()
        bonds[res].append(Bond(*atoms.split("-"), float(mean), float(std)))
    for line in sections[1][1:]:  # "N-CA-CB  ALA  110.1  1.4" (degrees)
        atoms, res, mean, std = line.split()
        angles[res].append(BondAngle(*atoms.split("-"), math.radians(float(mean)), math.radians(float(std))))

    virtual: dict[str, list[Bond]] = {name: [] for name in rc.resnames}
    for res, res_angles in angles.items():
        by_pair = {frozenset((b.atom1, b.atom2)): b for b in bonds[res]}
        for a in res_angles:
            b1, b2 = by_pair[frozenset((a.atom1, a.atom2))], by_pair[frozenset((a.atom2, a.atom3))]
            cos_g, sin_g = math.cos(a.angle), math.sin(a.angle)
            length = math.sqrt(b1.length ** 2 + b2.length ** 2 - 2 * b1.length * b2.length * cos_g)
            dl_dgamma = b1.length * b2.length * sin_g / length
            dl_db1 = (b1.length - b2.length * cos_g) / length
            dl_db2 = (b2.length - b1.length * cos_g) / length
            std = math.sqrt((dl_dgamma * a.stddev) ** 2 + (dl_db1 * b1.stddev) ** 2 + (dl_db2 * b2.stddev) ** 2)
            virtual[res].append(Bond(a.atom1, a.atom3, length, std))
    return bonds, virtual, angles


@functools.lru_cache(maxsize=None)
def atom14_distance_bounds(overlap_tolerance: float, bond_length_tolerance_factor: float):
    """Per residue type, lower/upper bounds of every within-residue atom14 pair distance (Å).

    Returns (lower [21, 14, 14], upper [21, 14, 14]) numpy float32. Bonded and 1-3 pairs:
    ``length ± factor·stddev``; other pairs: ``r_vdw1 + r_vdw2 - overlap_tolerance`` and no upper bound.
    """
    bonds, virtual, _ = load_stereo_chemical_props()
    lower = np.zeros((21, 14, 14), np.float32)
    upper = np.zeros((21, 14, 14), np.float32)
    for r, res in enumerate(rc.resnames[:20]):
        names = rc.restype_name_to_atom14_names[res]
        slot = {n: i for i, n in enumerate(names) if n}
        for n1, i in slot.items():
            for n2, j in slot.items():
                lower[r, i, j] = VAN_DER_WAALS_RADIUS[n1[0]] + VAN_DER_WAALS_RADIUS[n2[0]] - overlap_tolerance
                upper[r, i, j] = 1e10
        for b in bonds[res] + virtual[res]:
            i, j = slot[b.atom1], slot[b.atom2]
            lower[r, i, j] = lower[r, j, i] = b.length - bond_length_tolerance_factor * b.stddev
            upper[r, i, j] = upper[r, j, i] = b.length + bond_length_tolerance_factor * b.stddev
    return lower, upper


@functools.lru_cache(maxsize=None)
def _atom14_radius_table() -> np.ndarray:
    """[21, 14] van der Waals radius of each atom14 slot (0 for empty slots)."""
    out = np.zeros((21, 14), np.float32)
    for r, res in enumerate(rc.resnames):
        for i, name in enumerate(rc.restype_name_to_atom14_names[res]):
            out[r, i] = VAN_DER_WAALS_RADIUS[name[0]] if name else 0.0
    return out


def _pair_dist(a: Tensor, b: Tensor, eps: float) -> Tensor:
    return torch.sqrt(eps + ((a - b) ** 2).sum(-1))


def between_residue_bond_loss(pos: Tensor, mask: Tensor, residue_index: Tensor, aatype: Tensor, *,
                              tolerance_factor: float = 12.0, eps: float = 1e-6) -> dict[str, Tensor]:
    """Peptide-bond geometry between consecutive residues (AF2 Suppl. 1.9.11 eq. 44-45).

    pos [*, L, 14, 3], mask [*, L, 14], residue_index [*, L], aatype [*, L]. Returns c_n_loss_mean,
    ca_c_n_loss_mean, c_n_ca_loss_mean [*]; per_residue_loss_sum, per_residue_violation_mask [*, L].
    """
    this_ca, this_c = pos[..., :-1, _CA, :], pos[..., :-1, _C, :]  # [*, L-1, 3]
    next_n, next_ca = pos[..., 1:, _N, :], pos[..., 1:, _CA, :]
    no_gap = ((residue_index[..., 1:] - residue_index[..., :-1]) == 1).float()  # [*, L-1]
    m_ca, m_c = mask[..., :-1, _CA], mask[..., :-1, _C]
    m_n1, m_ca1 = mask[..., 1:, _N], mask[..., 1:, _CA]

    c_n_len = _pair_dist(this_c, next_n, eps)  # [*, L-1]
    ca_c_len = _pair_dist(this_ca, this_c, eps)
    n_ca_len = _pair_dist(next_n, next_ca, eps)
    c_ca_unit = (this_ca - this_c) / ca_c_len[..., None]
    c_n_unit = (next_n - this_c) / c_n_len[..., None]
    n_ca_unit = (next_ca - next_n) / n_ca_len[..., None]

    pro = aatype[..., 1:] == _PRO
    c_n_mean = torch.where(pro, C_N_LENGTH[1], C_N_LENGTH[0])
    c_n_std = torch.where(pro, C_N_STDDEV[1], C_N_STDDEV[0])
    terms = [  # (value, mean, stddev, mask)
        (c_n_len, c_n_mean, c_n_std, m_c * m_n1 * no_gap),
        ((c_ca_unit * c_n_unit).sum(-1), COS_CA_C_N[0], COS_CA_C_N[1], m_ca * m_c * m_n1 * no_gap),
        ((-c_n_unit * n_ca_unit).sum(-1), COS_C_N_CA[0], COS_C_N_CA[1], m_c * m_n1 * m_ca1 * no_gap),
    ]
    means, per_res, violated = [], 0.0, []
    for value, mean, std, m in terms:
        err = torch.sqrt(eps + (value - mean) ** 2)
        loss = F.relu(err - tolerance_factor * std) * m  # [*, L-1]
        means.append(loss.sum(-1) / (m.sum(-1) + eps))
        per_res = per_res + loss
        violated.append(m * (err > tolerance_factor * std).float())
    # Each bond belongs to both of its residues: half of its loss to each, the violation to both.
    per_residue_loss = 0.5 * (F.pad(per_res, (0, 1)) + F.pad(per_res, (1, 0)))  # [*, L]
    v = torch.stack(violated, -1).amax(-1)
    per_residue_violation = torch.maximum(F.pad(v, (0, 1)), F.pad(v, (1, 0)))  # [*, L]
    return {"c_n_loss_mean": means[0], "ca_c_n_loss_mean": means[1], "c_n_ca_loss_mean": means[2],
            "per_residue_loss_sum": per_residue_loss, "per_residue_violation_mask": per_residue_violation}


def between_residue_clash_loss(pos: Tensor, exists: Tensor, radius: Tensor, residue_index: Tensor,
                               aatype: Tensor, *, overlap_tolerance: float = 1.5,
                               eps: float = 1e-10) -> dict[str, Tensor]:
    """Clashes between atoms of different residues (AF2 Suppl. 1.9.11 eq. 46, between-residue part).

    pos [*, L, 14, 3], exists/radius [*, L, 14], residue_index/aatype [*, L]. Each pair is counted once
    (residue_index i < j); the peptide C(i)-N(i+1) bond and CYS SG-SG disulfides are excluded.
    Returns mean_loss [*], per_atom_loss_sum [*, L, 14], per_atom_clash_mask [*, L, 14].
    """
    d = _pair_dist(pos[..., :, None, :, None, :], pos[..., None, :, None, :, :], eps)  # [*, L, L, 14, 14]
    ri = residue_index
    mask = exists[..., :, None, :, None] * exists[..., None, :, None, :]  # [*, L, L, 14, 14]
    mask = mask * (ri[..., :, None] < ri[..., None, :]).float()[..., None, None]
    slot = torch.arange(14, device=pos.device)
    c_n = ((ri[..., :, None] + 1) == ri[..., None, :])[..., None, None] \
        & (slot == _C)[:, None] & (slot == _N)[None, :]
    cys = aatype == _CYS
    ss = (cys[..., :, None] & cys[..., None, :])[..., None, None] \
        & (slot == _CYS_SG)[:, None] & (slot == _CYS_SG)[None, :]
    mask = mask * (~(c_n | ss)).float()

    lower = mask * (radius[..., :, None, :, None] + radius[..., None, :, None, :])
    err = mask * F.relu(lower - overlap_tolerance - d)  # [*, L, L, 14, 14]
    clash = mask * (d < lower - overlap_tolerance).float()
    return {
        "mean_loss": err.sum((-1, -2, -3, -4)) / (1e-6 + mask.sum((-1, -2, -3, -4))),
        "per_atom_loss_sum": err.sum((-4, -2)) + err.sum((-3, -1)),
        "per_atom_clash_mask": torch.maximum(clash.amax((-4, -2)), clash.amax((-3, -1))),
    }


def within_residue_violations(pos: Tensor, exists: Tensor, lower: Tensor, upper: Tensor, *,
                              tighten_bounds_for_loss: float = 0.0, eps: float = 1e-10) -> dict[str, Tensor]:
    """Bond, 1-3 distance and clash violations inside residues (AF2 Suppl. 1.9.11 eq. 46-47).

    pos [*, L, 14, 3], exists [*, L, 14], lower/upper [*, L, 14, 14]. Returns per_atom_loss_sum and
    per_atom_violations [*, L, 14].
    """
    not_self = 1.0 - torch.eye(14, device=pos.device)
    mask = exists[..., :, :, None] * exists[..., :, None, :] * not_self  # [*, L, 14, 14]
    d = _pair_dist(pos[..., :, :, None, :], pos[..., :, None, :, :], eps)  # [*, L, 14, 14]
    loss = mask * (F.relu(lower + tighten_bounds_for_loss - d) + F.relu(d - (upper - tighten_bounds_for_loss)))
    violated = mask * ((d < lower) | (d > upper)).float()
    return {"per_atom_loss_sum": loss.sum(-2) + loss.sum(-1),
            "per_atom_violations": torch.maximum(violated.amax(-2), violated.amax(-1))}


_DEVICE_TABLES: dict[tuple[int, torch.device], tuple[np.ndarray, Tensor]] = {}


def device_table(array: np.ndarray, device: torch.device | str) -> Tensor:
    """A constant numpy table as a float32 tensor on ``device``, copied once per (table, device).

    Later calls do no host-to-device copy, so a loss can run inside CUDA-graph capture once the first
    (warm-up) step has built its tables. The numpy array is kept referenced, so its id stays unique."""
    key = (id(array), torch.device(device))
    hit = _DEVICE_TABLES.get(key)
    if hit is None:
        hit = _DEVICE_TABLES[key] = (array, torch.as_tensor(array, dtype=torch.float32, device=device))
    return hit[1]


def find_structural_violations(pos: Tensor, aatype: Tensor, residue_index: Tensor, atom14_atom_exists: Tensor,
                               *, violation_tolerance_factor: float = 12.0,
                               clash_overlap_tolerance: float = 1.5) -> dict[str, Tensor]:
    """All violation terms of one predicted structure (AF2 Suppl. 1.9.11).

    pos [*, L, 14, 3] predicted atom14 positions; aatype, residue_index [*, L]; atom14_atom_exists
    [*, L, 14] (0 in padding). Returns the dicts of the three checks merged (keys prefixed
    ``bond_``, ``clash_``, ``within_``) plus per_residue_violation_mask [*, L].
    """
    pos = pos.float()
    exists = atom14_atom_exists.float()
    restype = aatype.long().clamp(max=rc.UNK_ID)
    radius = device_table(_atom14_radius_table(), pos.device)[restype] * exists  # [*, L, 14]
    lower, upper = atom14_distance_bounds(float(clash_overlap_tolerance), float(violation_tolerance_factor))
    bonds = between_residue_bond_loss(pos, exists, residue_index, restype,
                                      tolerance_factor=violation_tolerance_factor)
    clashes = between_residue_clash_loss(pos, exists, radius, residue_index, restype,
                                         overlap_tolerance=clash_overlap_tolerance)
    within = within_residue_violations(pos, exists, device_table(lower, pos.device)[restype],
                                       device_table(upper, pos.device)[restype])
    out = {f"bond_{k}": v for k, v in bonds.items()}
    out.update({f"clash_{k}": v for k, v in clashes.items()})
    out.update({f"within_{k}": v for k, v in within.items()})
    out["per_residue_violation_mask"] = torch.stack([
        bonds["per_residue_violation_mask"],
        clashes["per_atom_clash_mask"].amax(-1),
        within["per_atom_violations"].amax(-1),
    ], -1).amax(-1)
    return out


def violation_loss(violations: dict[str, Tensor], atom14_atom_exists: Tensor, *, eps: float = 1e-6) -> Tensor:
    """AF2 Suppl. 1.9.11 eq. 47: the three peptide means plus the clash losses per existing atom -> [*]."""
    num_atoms = atom14_atom_exists.float().sum((-1, -2))
    clash = (violations["clash_per_atom_loss_sum"] + violations["within_per_atom_loss_sum"]).sum((-1, -2))
    return (violations["bond_c_n_loss_mean"] + violations["bond_ca_c_n_loss_mean"]
            + violations["bond_c_n_ca_loss_mean"] + clash / (eps + num_atoms))
