"""Ground-truth training targets from atom37 coordinates (AF2 Suppl. 1.8.1, 1.8.5, 1.9.1; Alg. 21, 24, 26).

``make_targets`` turns one chain's ``aatype`` / ``all_atom_positions`` / ``all_atom_mask`` into the
arrays that the AF2 losses consume: the atom14 ground truth and its symmetric alternative (Alg. 26),
the eight rigid-group frames per residue (Alg. 21, groups of Table 2), the seven torsion angles as
(sin, cos) (Alg. 24 / Alg. 27), and the pseudo-beta atoms used by the distogram and templates.

Pure numpy, vectorized over residues; it runs once per chain at prepare time. Computation is in float64
and the results are cast to float32 (coordinates, angles, frames), uint8 (masks) and int32 (indices),
with the residue axis first. Missing atoms never produce NaN: masked coordinates and (sin, cos) are 0,
masked frames are the identity.
"""
from __future__ import annotations

import numpy as np

from foldforge.data import residue_constants as rc

# Geometry below this length (Angstrom) counts as degenerate: such frames/torsions are masked out.
_MIN_LEN = 1e-3
_EPS = 1e-12


def _normalize(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors along the last axis and their lengths; zero vectors stay zero (no NaN)."""
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, _EPS), n[..., 0]


def gram_schmidt_frames(x_dir: np.ndarray, xy_dir: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotations whose x-axis follows ``x_dir`` and whose xy-plane contains ``xy_dir`` (AF2 Suppl. Alg. 21).

    x_dir, xy_dir: [..., 3]. Returns (rot [..., 3, 3] with the axes as columns, ok [...] bool) where ok
    is False if either vector is too short or they are (nearly) collinear.
    """
    e1, n1 = _normalize(x_dir)
    u2 = xy_dir - np.sum(e1 * xy_dir, axis=-1, keepdims=True) * e1
    e2, n2 = _normalize(u2)
    e3 = np.cross(e1, e2)
    return np.stack([e1, e2, e3], axis=-1), (n1 > _MIN_LEN) & (n2 > _MIN_LEN)


def rigid_from_3_points(x1: np.ndarray, x2: np.ndarray, x3: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AF2 Suppl. Alg. 21 rigidFrom3Points: origin x2, x-axis towards x3, x1 in the xy-plane (y > 0).

    For the backbone (x1, x2, x3) = (N, CA, C). Points [..., 3]; returns (rot [..., 3, 3],
    trans [..., 3], ok [...] bool).
    """
    rot, ok = gram_schmidt_frames(x3 - x2, x1 - x2)
    return rot, x2, ok


def _to_4x4(rot: np.ndarray, trans: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """[..., 3, 3] + [..., 3] -> homogeneous [..., 4, 4] float32; identity where ``keep`` is False."""
    m = np.zeros(rot.shape[:-2] + (4, 4), dtype=np.float64)
    m[..., :3, :3] = rot
    m[..., :3, 3] = trans
    m[..., 3, 3] = 1.0
    m[~keep] = np.eye(4)
    return m.astype(np.float32)


def atom14_targets(aatype: np.ndarray, pos37: np.ndarray, mask37: np.ndarray) -> dict[str, np.ndarray]:
    """atom14 ground truth, existence masks, index maps and the renamed alternative (AF2 Suppl. Alg. 26).

    aatype [L] (0..20), pos37 [L, 37, 3] float64, mask37 [L, 37] bool.
    """
    idx14_to_37 = rc.restype_atom14_to_atom37[aatype]  # [L, 14]
    exists14 = rc.restype_atom14_mask[aatype].astype(bool)  # [L, 14]
    gt_exists = exists14 & np.take_along_axis(mask37, idx14_to_37, axis=1)  # [L, 14]
    gt_pos = np.take_along_axis(pos37, idx14_to_37[..., None], axis=1) * gt_exists[..., None]  # [L, 14, 3]

    # Alternative naming: swap OD1/OD2, OE1/OE2, CD1/CD2 + CE1/CE2 (ASP/GLU/PHE/TYR); identity elsewhere.
    swap = rc.restype_atom14_swap_index[aatype]  # [L, 14]
    alt_pos = np.take_along_axis(gt_pos, swap[..., None], axis=1)  # [L, 14, 3]
    alt_exists = np.take_along_axis(gt_exists, swap, axis=1)  # [L, 14]
    return {
        "atom14_gt_positions": gt_pos.astype(np.float32),
        "atom14_gt_exists": gt_exists.astype(np.uint8),
        "atom14_atom_exists": exists14.astype(np.uint8),
        "residx_atom14_to_atom37": idx14_to_37.astype(np.int32),
        "residx_atom37_to_atom14": rc.restype_atom37_to_atom14[aatype].astype(np.int32),
        "atom37_atom_exists": rc.restype_atom37_mask[aatype].astype(np.uint8),
        "atom14_atom_is_ambiguous": rc.restype_atom14_is_ambiguous[aatype].astype(np.uint8),
        "atom14_alt_gt_positions": alt_pos.astype(np.float32),
        "atom14_alt_gt_exists": alt_exists.astype(np.uint8),
    }


def rigid_group_targets(aatype: np.ndarray, pos37: np.ndarray, mask37: np.ndarray) -> dict[str, np.ndarray]:
    """Ground-truth frames of the 8 rigid groups per residue (AF2 Suppl. 1.8.1, Alg. 21, Table 2).

    Each group's frame is built from its three base atoms (a0, a1, a2) =
    ``rc.restype_rigidgroup_base_atom_names``: origin a1, x-axis along a0 -> a1, a2 in the xy-plane.
    The backbone group uses (C, CA, N) and is then rotated by 180 deg about y (x and z negated), which
    makes it exactly Alg. 21 rigidFrom3Points(N, CA, C), the AF2/OpenFold convention. Pi-periodic chi
    groups also get the alternative frame rotated by 180 deg about x.
    """
    base_idx = rc.restype_rigidgroup_base_atom37_idx[aatype]  # [L, 8, 3]
    base_pos = np.take_along_axis(pos37[:, None], base_idx[..., None], axis=2)  # [L, 8, 3, 3]
    base_ok = np.take_along_axis(np.broadcast_to(mask37[:, None], base_idx.shape[:2] + (37,)), base_idx, axis=2)

    rot, well_posed = gram_schmidt_frames(base_pos[:, :, 1] - base_pos[:, :, 0],
                                          base_pos[:, :, 2] - base_pos[:, :, 1])  # [L, 8, 3, 3]
    rot[:, 0] = rot[:, 0] * np.array([-1.0, 1.0, -1.0])  # backbone flip: R @ diag(-1, 1, -1)
    trans = base_pos[:, :, 1]  # [L, 8, 3]

    group_exists = rc.restype_rigidgroup_mask[aatype].astype(bool)  # [L, 8]
    gt_exists = group_exists & base_ok.all(axis=-1) & well_posed  # [L, 8]
    alt_rot = rot @ rc.restype_rigidgroup_ambiguity_rot[aatype]  # [L, 8, 3, 3]
    return {
        "rigidgroups_gt_frames": _to_4x4(rot, trans, gt_exists),
        "rigidgroups_gt_exists": gt_exists.astype(np.uint8),
        "rigidgroups_group_exists": group_exists.astype(np.uint8),
        "rigidgroups_group_is_ambiguous": rc.restype_rigidgroup_is_ambiguous[aatype].astype(np.uint8),
        "rigidgroups_alt_gt_frames": _to_4x4(alt_rot, trans, gt_exists),
    }


def torsion_angle_targets(aatype: np.ndarray, pos37: np.ndarray, mask37: np.ndarray) -> dict[str, np.ndarray]:
    """The 7 torsions (pre-omega, phi, psi, chi1-4) as (sin, cos) (AF2 Suppl. Alg. 24 / Alg. 27 inputs).

    Torsion (p0, p1, p2, p3) is read in a frame with origin p2, x-axis p1 -> p2 and p0 in the xy-plane:
    p3's local (y, z) gives (cos, sin), i.e. the IUPAC dihedral. Row i-1 is residue i's predecessor, so
    residue 0 has no pre-omega/phi. psi uses O instead of N(i+1) and is therefore shifted by pi. The
    alternative angles add pi to the pi-periodic chis (ASP chi2, GLU chi3, PHE/TYR chi2).
    """
    n = aatype.shape[0]
    prev_pos = np.concatenate([np.zeros_like(pos37[:1]), pos37[:-1]], axis=0)  # [L, 37, 3]
    prev_mask = np.concatenate([np.zeros_like(mask37[:1]), mask37[:-1]], axis=0)  # [L, 37]
    N, CA, C, O = (rc.atom_order[a] for a in ("N", "CA", "C", "O"))

    bb_pos = np.stack([
        np.stack([prev_pos[:, CA], prev_pos[:, C], pos37[:, N], pos37[:, CA]], axis=1),  # pre-omega
        np.stack([prev_pos[:, C], pos37[:, N], pos37[:, CA], pos37[:, C]], axis=1),  # phi
        np.stack([pos37[:, N], pos37[:, CA], pos37[:, C], pos37[:, O]], axis=1),  # psi (via O)
    ], axis=1)  # [L, 3, 4, 3]
    bb_mask = np.stack([
        prev_mask[:, CA] & prev_mask[:, C] & mask37[:, N] & mask37[:, CA],
        prev_mask[:, C] & mask37[:, N] & mask37[:, CA] & mask37[:, C],
        mask37[:, N] & mask37[:, CA] & mask37[:, C] & mask37[:, O],
    ], axis=1)  # [L, 3]

    chi_idx = rc.chi_angles_atom_indices[aatype].reshape(n, 16)  # [L, 4 chis * 4 atoms]
    chi_pos = np.take_along_axis(pos37, chi_idx[..., None], axis=1).reshape(n, 4, 4, 3)  # [L, 4, 4, 3]
    chi_mask = rc.restype_chi_angles_mask[aatype].astype(bool) & \
        np.take_along_axis(mask37, chi_idx, axis=1).reshape(n, 4, 4).all(axis=-1)  # [L, 4]

    quad = np.concatenate([bb_pos, chi_pos], axis=1)  # [L, 7, 4, 3]
    mask = np.concatenate([bb_mask, chi_mask], axis=1)  # [L, 7]
    rot, well_posed = gram_schmidt_frames(quad[:, :, 2] - quad[:, :, 1], quad[:, :, 0] - quad[:, :, 2])
    local = np.einsum("ltji,ltj->lti", rot, quad[:, :, 3] - quad[:, :, 2])  # R^T (p3 - p2): [L, 7, 3]
    sin_cos, radius = _normalize(local[..., [2, 1]])  # (z, y) = (sin, cos): [L, 7, 2]
    mask = mask & well_posed & (radius > _MIN_LEN)

    sin_cos = sin_cos * np.array([1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0])[:, None]  # psi(O) - pi = psi
    sin_cos = sin_cos * mask[..., None]
    mirror = 1.0 - 2.0 * np.concatenate([np.zeros((n, 3)), rc.restype_chi_pi_periodic[aatype]], axis=1)
    alt_sin_cos = sin_cos * mirror[..., None]  # [L, 7, 2]
    return {
        "torsion_angles_sin_cos": sin_cos.astype(np.float32),
        "alt_torsion_angles_sin_cos": alt_sin_cos.astype(np.float32),
        "torsion_angles_mask": mask.astype(np.uint8),
    }


def pseudo_beta_targets(aatype: np.ndarray, pos37: np.ndarray, mask37: np.ndarray) -> dict[str, np.ndarray]:
    """Pseudo-beta atom: CB, or CA for glycine (AF2 Suppl. 1.9.8 distogram; template features of Table 1)."""
    is_gly = aatype == rc.restype_order["G"]
    atom = np.where(is_gly, rc.atom_order["CA"], rc.atom_order["CB"])  # [L]
    rows = np.arange(aatype.shape[0])
    mask = mask37[rows, atom]  # [L]
    return {
        "pseudo_beta": (pos37[rows, atom] * mask[:, None]).astype(np.float32),  # [L, 3]
        "pseudo_beta_mask": mask.astype(np.uint8),  # [L]
    }


def make_targets(
    aatype: np.ndarray, all_atom_positions: np.ndarray, all_atom_mask: np.ndarray
) -> dict[str, np.ndarray]:
    """All ground-truth targets of one chain (AF2 Suppl. 1.8.1, 1.8.5, 1.9.1; Alg. 21, 24, 26).

    Args:
      aatype: [L] int, AF2 residue order; values > 20 (gap, mask token) are treated as UNK (20).
      all_atom_positions: [L, 37, 3] float coordinates in Angstrom (values where the mask is 0 are
        ignored, NaN included).
      all_atom_mask: [L, 37] uint8/bool/float, > 0 where the atom was observed.

    Returns a dict of arrays with the residue axis first:
      atom14_gt_positions [L, 14, 3] f32, atom14_gt_exists [L, 14] u8, atom14_atom_exists [L, 14] u8,
      residx_atom14_to_atom37 [L, 14] i32, residx_atom37_to_atom14 [L, 37] i32,
      atom37_atom_exists [L, 37] u8, atom14_atom_is_ambiguous [L, 14] u8,
      atom14_alt_gt_positions [L, 14, 3] f32, atom14_alt_gt_exists [L, 14] u8,
      rigidgroups_gt_frames [L, 8, 4, 4] f32, rigidgroups_gt_exists [L, 8] u8,
      rigidgroups_group_exists [L, 8] u8, rigidgroups_group_is_ambiguous [L, 8] u8,
      rigidgroups_alt_gt_frames [L, 8, 4, 4] f32,
      torsion_angles_sin_cos [L, 7, 2] f32, alt_torsion_angles_sin_cos [L, 7, 2] f32,
      torsion_angles_mask [L, 7] u8, pseudo_beta [L, 3] f32, pseudo_beta_mask [L] u8.
    """
    aatype = np.minimum(np.asarray(aatype).astype(np.int64), rc.UNK_ID)  # [L]
    mask37 = np.asarray(all_atom_mask) > 0  # [L, 37]
    pos37 = np.asarray(all_atom_positions, dtype=np.float64)  # [L, 37, 3]
    if aatype.ndim != 1 or pos37.shape != aatype.shape + (37, 3) or mask37.shape != aatype.shape + (37,):
        raise ValueError(f"expected aatype [L], positions [L,37,3], mask [L,37]; got {aatype.shape}, "
                         f"{pos37.shape}, {mask37.shape}")
    mask37 = mask37 & np.isfinite(pos37).all(axis=-1)
    pos37 = np.where(mask37[..., None], pos37, 0.0)

    out: dict[str, np.ndarray] = {}
    for fn in (atom14_targets, rigid_group_targets, torsion_angle_targets, pseudo_beta_targets):
        out.update(fn(aatype, pos37, mask37))
    return out
