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
