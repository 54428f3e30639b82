"""Residue constants for AlphaFold-family featurisation (AF2 Suppl. 1.2.9, Table 1; atom37/atom14 layouts).

These tables are physical and nomenclature facts (IUPAC atom names, the AF2 residue and atom orderings)
kept as plain Python data so that ``foldforge.data`` never depends on model code.
"""
from __future__ import annotations

import numpy as np

# 20 standard amino acids in AF2 order; index 20 = unknown (X), 21 = gap ('-') in MSAs,
# 22 = the BERT mask token added by the masked-MSA transform.
restypes = ["A", "R", "N", "D", "C", "Q", "E", "G", "H", "I", "L", "K", "M", "F", "P", "S", "T", "W", "Y", "V"]
restype_order = {r: i for i, r in enumerate(restypes)}
restype_num = len(restypes)  # 20
UNK_ID = 20
GAP_ID = 21
MASK_ID = 22
restypes_with_x = restypes + ["X"]

restype_1to3 = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU", "G": "GLY",
    "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE", "P": "PRO", "S": "SER",
    "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL",
}
restype_3to1 = {v: k for k, v in restype_1to3.items()}
resnames = [restype_1to3[r] for r in restypes] + ["UNK"]

# Common modified residues seen in PDB entries -> their standard parent. Atoms whose names exist in
# atom37 are kept (backbone and the shared side-chain atoms); MSE's SE is stored as MET's SD (AF2 does
# the same in its mmCIF/template code).
MODIFIED_RESIDUES = {
    "MSE": "MET", "MLY": "LYS", "M3L": "LYS", "MLZ": "LYS", "KCX": "LYS", "LLP": "LYS", "ALY": "LYS",
    "SEP": "SER", "TPO": "THR", "PTR": "TYR", "TYS": "TYR", "HYP": "PRO", "CSO": "CYS", "CSD": "CYS",
    "CME": "CYS", "CSS": "CYS", "OCS": "CYS", "CAS": "CYS", "SEC": "CYS", "PYL": "LYS", "PCA": "GLU",
    "HIC": "HIS", "NEP": "HIS", "MEN": "ASN", "DAL": "ALA", "ABA": "ALA", "AIB": "ALA", "NLE": "LEU",
    "FME": "MET", "CGU": "GLU", "DDZ": "ALA", "SAC": "SER", "OAS": "SER", "SMC": "CYS", "BMT": "THR",
}

# atom37: every heavy atom name that occurs in the 20 standard residues, in AF2 order.
atom_types = [
    "N", "CA", "C", "CB", "O", "CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2", "ND1", "ND2",
    "OD1", "OD2", "SD", "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1", "OE2", "CH2", "NH1", "NH2",
    "OH", "CZ", "CZ2", "CZ3", "NZ", "OXT",
]
atom_order = {a: i for i, a in enumerate(atom_types)}
atom_type_num = len(atom_types)  # 37

# HHblits/MSA alphabet -> foldforge (AF2) residue index. Ambiguity codes map as AF2 does
# (B->D, Z->E, J/O->X, U->C); '-' is the gap. Lowercase letters are insertions and never reach this map.
HHBLITS_LETTER_TO_AATYPE = {**restype_order, "B": 3, "Z": 6, "J": 20, "O": 20, "U": 4, "X": 20, "-": 21}


def _letter_lut() -> np.ndarray:
    lut = np.full(256, 20, dtype=np.int8)  # anything unexpected is 'X'
    for letter, idx in HHBLITS_LETTER_TO_AATYPE.items():
        lut[ord(letter)] = idx
    return lut


LETTER_TO_AATYPE_LUT = _letter_lut()


def sequence_to_aatype(seq: str) -> np.ndarray:
    """One-letter (or MSA) sequence -> int8 aatype array in AF2 order (X=20, '-'=21)."""
    return LETTER_TO_AATYPE_LUT[np.frombuffer(seq.upper().encode("ascii"), dtype=np.uint8)]


def aatype_to_sequence(aatype: np.ndarray) -> str:
    letters = restypes + ["X", "-", "?"]
    return "".join(letters[int(a)] for a in aatype)


# ===================================================================================================
# Rigid groups, atom14 and chi tables (AF2 Suppl. 1.8-1.9, Table 2). The raw literature data live in
# residue_tables.py; the numpy lookups below are derived from it once at import (pure numpy, no I/O).
# Every [21, ...] table is indexed by aatype; row 20 (UNK) has no side chain and no atom14 atoms.
# ===================================================================================================
from foldforge.data.residue_tables import (  # noqa: E402  (re-exported)
    chi_angles_atoms,
    chi_pi_periodic,
    residue_atom_renaming_swaps,
    restype_name_to_atom14_names,
    rigid_group_atom_positions,
)

NUM_RESTYPES_WITH_X = 21
atom14_num = 14
rigid_group_names = ["backbone", "pre_omega", "phi", "psi", "chi1", "chi2", "chi3", "chi4"]
torsion_names = ["pre_omega", "phi", "psi", "chi1", "chi2", "chi3", "chi4"]

# chi_angles_mask[restype][k] = 1.0 if chi k+1 exists (20 rows, AF2 layout); the [21, 4] array adds UNK.
chi_angles_mask = [[float(k < len(chi_angles_atoms[name])) for k in range(4)] for name in resnames[:20]]
restype_chi_angles_mask = np.array(chi_angles_mask + [[0.0] * 4], dtype=np.uint8)  # [21, 4]
restype_chi_pi_periodic = np.array(chi_pi_periodic, dtype=np.uint8)  # [21, 4]

# chi_angles_atom_indices[r, k] = atom37 indices of chi k's four atoms (0-padded where chi k is absent).
chi_angles_atom_indices = np.zeros((21, 4, 4), dtype=np.int32)
for _r, _name in enumerate(resnames):
    for _k, _quad in enumerate(chi_angles_atoms[_name]):
        chi_angles_atom_indices[_r, _k] = [atom_order[a] for a in _quad]


def _atom14_tables():
    a14_to_a37 = np.zeros((21, 14), dtype=np.int32)
    a37_to_a14 = np.zeros((21, 37), dtype=np.int32)
    a14_mask = np.zeros((21, 14), dtype=np.uint8)
    a37_mask = np.zeros((21, 37), dtype=np.uint8)
    for r, name in enumerate(resnames):
        for slot, atom in enumerate(restype_name_to_atom14_names[name]):
            if atom:
                a14_to_a37[r, slot] = atom_order[atom]
                a37_to_a14[r, atom_order[atom]] = slot
                a14_mask[r, slot] = 1
                a37_mask[r, atom_order[atom]] = 1
    return a14_to_a37, a37_to_a14, a14_mask, a37_mask


# [21, 14] atom14 slot -> atom37 index (0 for empty slots), [21, 37] the inverse (0 where absent),
# and which slots / atom37 types exist for each residue type.
restype_atom14_to_atom37, restype_atom37_to_atom14, restype_atom14_mask, restype_atom37_mask = _atom14_tables()


def _ambiguity_tables():
    is_amb = np.zeros((21, 14), dtype=np.uint8)
    swap = np.tile(np.arange(14, dtype=np.int32), (21, 1))
    for name, pairs in residue_atom_renaming_swaps.items():
        r = resnames.index(name)
        names14 = restype_name_to_atom14_names[name]
        for a, b in pairs.items():
            i, j = names14.index(a), names14.index(b)
            is_amb[r, [i, j]] = 1
            swap[r, i], swap[r, j] = j, i
    return is_amb, swap


# [21, 14] atom14 slots that belong to a symmetric pair; [21, 14] the slot each one swaps with
# (identity elsewhere), used for the alternative ground truth of AF2 Suppl. 1.8.5 / Alg. 26.
restype_atom14_is_ambiguous, restype_atom14_swap_index = _ambiguity_tables()


def _rigid_group_tables():
    base_names = np.full((21, 8, 3), "", dtype=object)
    # Backbone frame from (C, CA, N): the x-axis points C->CA and is flipped afterwards (with z) so that
    # the final frame is AF2 Alg. 21 rigidFrom3Points(N, CA, C). The psi frame from (CA, C, O).
    base_names[:, 0] = ["C", "CA", "N"]
    base_names[:, 3] = ["CA", "C", "O"]
    group_mask = np.zeros((21, 8), dtype=np.uint8)
    group_mask[:, 0] = 1
    group_mask[:, 3] = 1
    for r, name in enumerate(resnames):
        for k, quad in enumerate(chi_angles_atoms[name]):
            base_names[r, 4 + k] = quad[1:]
            group_mask[r, 4 + k] = 1
    base_idx = np.vectorize(lambda a: atom_order.get(a, 0), otypes=[np.int32])(base_names)

    # The last chi of each renaming-ambiguous residue is pi-periodic; its alternative frame is the
    # ground-truth frame rotated by 180 degrees about its x-axis (diag(1, -1, -1)).
    is_amb = np.zeros((21, 8), dtype=np.uint8)
    amb_rot = np.tile(np.eye(3, dtype=np.float32), (21, 8, 1, 1))
    for name in residue_atom_renaming_swaps:
        r = resnames.index(name)
        g = 3 + len(chi_angles_atoms[name])
        is_amb[r, g] = 1
        amb_rot[r, g] = np.diag([1.0, -1.0, -1.0])
    return base_names, base_idx, group_mask, is_amb, amb_rot


# [21, 8, 3] names / atom37 indices of the three base atoms of each rigid group (point on the negative
# x-axis, origin, point in the xy-plane); [21, 8] which groups exist; [21, 8] which groups are
# pi-symmetric; [21, 8, 3, 3] the right-multiplied rotation giving the alternative frame.
(restype_rigidgroup_base_atom_names, restype_rigidgroup_base_atom37_idx, restype_rigidgroup_mask,
 restype_rigidgroup_is_ambiguous, restype_rigidgroup_ambiguity_rot) = _rigid_group_tables()


def _frame_from_axes(ex: np.ndarray, ey: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """4x4 frame with x along ex, y the part of ey orthogonal to x, z = x cross y (Gram-Schmidt)."""
    x = ex / np.linalg.norm(ex)
    y = ey - np.dot(ey, x) * x
    y = y / np.linalg.norm(y)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, np.cross(x, y), origin
    return m


def _literature_tables():
    a37_group = np.zeros((21, 37), dtype=np.int32)
    a37_pos = np.zeros((21, 37, 3), dtype=np.float32)
    a14_group = np.zeros((21, 14), dtype=np.int32)
    a14_pos = np.zeros((21, 14, 3), dtype=np.float32)
    default = np.tile(np.eye(4, dtype=np.float32), (21, 8, 1, 1))
    for r, name in enumerate(resnames[:20]):
        names14 = restype_name_to_atom14_names[name]
        pos = {}
        for atom, group, xyz in rigid_group_atom_positions[name]:
            pos[atom] = np.asarray(xyz, dtype=np.float64)
            a37_group[r, atom_order[atom]] = a14_group[r, names14.index(atom)] = group
            a37_pos[r, atom_order[atom]] = a14_pos[r, names14.index(atom)] = xyz
        # Default frame of each group relative to its parent (AF2 Alg. 24): phi and psi hang off the
        # backbone, chi1 off the backbone, chi(k+1) off chi k. Groups rotate about their own x-axis.
        default[r, 2] = _frame_from_axes(pos["N"] - pos["CA"], np.array([1.0, 0.0, 0.0]), pos["N"])
        default[r, 3] = _frame_from_axes(pos["C"] - pos["CA"], pos["CA"] - pos["N"], pos["C"])
        quads = chi_angles_atoms[name]
        if quads:
            a, b, c = (pos[n] for n in quads[0][:3])
            default[r, 4] = _frame_from_axes(c - b, a - b, c)
        for k in range(1, len(quads)):
            # The axis b->c of chi k+1 starts at the previous group's origin, so c is the new axis.
            c = pos[quads[k][2]]
            default[r, 4 + k] = _frame_from_axes(c, np.array([-1.0, 0.0, 0.0]), c)
    return a37_group, a37_pos, a14_group, a14_pos, default


# Which rigid group each atom belongs to and its idealized position in that group's frame
# ([21, 37] / [21, 14] and [21, 37, 3] / [21, 14, 3]), and the default group-to-parent frames
# [21, 8, 4, 4] used by the structure module (AF2 Suppl. Alg. 24).
(restype_atom37_to_rigid_group, restype_atom37_rigid_group_positions, restype_atom14_to_rigid_group,
 restype_atom14_rigid_group_positions, restype_rigid_group_default_frame) = _literature_tables()
