"""Predicted structures as mmCIF and PDB files, written with gemmi.

One protein chain per file (atom37 positions and mask as the model returns them), with the per-residue
pLDDT (AF2 Suppl. Alg. 29, 0-100) in the B-factor column of every atom of the residue, as AlphaFold's
own output does, so viewers colour by confidence with their B-factor colouring.

mmCIF output has ``_entry``, ``_entity`` (one polymer entity), ``_entity_poly`` (type
``polypeptide(L)`` and the one-letter sequence), ``_entity_poly_seq`` (the full sequence, so residues
without atoms still belong to the chain), ``_struct_asym``, ``_chem_comp`` and ``_atom_site`` with
label and author numbering (``label_seq_id`` = position in the sequence, 1-based). PDB output carries
SEQRES, ATOM, TER and END records; PDB's fixed columns limit it to 99,999 atoms and 9,999 residues.
Both read back with gemmi, PyMOL and ChimeraX, and with :func:`foldforge.data.mmcif.parse_structure`.
"""
from __future__ import annotations

import re
from pathlib import Path

import gemmi
import numpy as np

from foldforge.data import residue_constants as rc

FORMATS = ("cif", "pdb", "both")
_PDB_MAX_ATOMS = 99_999
_PDB_MAX_RESIDUES = 9_999


def safe_name(name: str) -> str:
    """A file and mmCIF block name from a FASTA header token: [A-Za-z0-9_.-] only."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()).strip("._")
    return cleaned or "prediction"


def _resname(aatype: int) -> str:
    return rc.restype_1to3.get(rc.restypes_with_x[aatype], "UNK") if aatype < rc.UNK_ID else "UNK"


def build_structure(name: str, aatype: np.ndarray, atom_positions: np.ndarray, atom_mask: np.ndarray,
                    b_factors: np.ndarray, *, chain_id: str = "A",
                    residue_numbers: np.ndarray | None = None) -> gemmi.Structure:
    """A one-model, one-chain gemmi structure.

    Args:
      aatype: int [L] (AF2 order, 20 = unknown -> UNK); atom_positions: [L, 37, 3] (Å);
      atom_mask: [L, 37], atoms with mask > 0 are written; b_factors: [L] (pLDDT), or [L, 37] per atom;
      residue_numbers: author residue numbers [L] (default 1..L).
    """
    aatype = np.asarray(aatype).astype(np.int64)
    # the precision both formats store (PDB: 8.3f coordinates, 6.2f B-factors), so .cif and .pdb agree
    pos = np.round(np.asarray(atom_positions, dtype=np.float64), 3)
    mask = np.asarray(atom_mask) > 0
    bf = np.round(np.asarray(b_factors, dtype=np.float64), 2)
    if bf.ndim == 1:
        bf = np.repeat(bf[:, None], rc.atom_type_num, axis=1)
    n = aatype.shape[0]
    if pos.shape != (n, rc.atom_type_num, 3) or mask.shape != (n, rc.atom_type_num) or bf.shape[0] != n:
        raise ValueError(f"build_structure: shapes do not fit L = {n}: positions {pos.shape}, mask "
                         f"{mask.shape}, b-factors {bf.shape}")
    numbers = np.arange(1, n + 1) if residue_numbers is None else np.asarray(residue_numbers)
    resnames = [_resname(int(a)) for a in aatype]

    st = gemmi.Structure()
    st.name = safe_name(name)
    model = gemmi.Model(1) if _model_takes_int() else gemmi.Model("1")
    chain = gemmi.Chain(chain_id)
    serial = 0
    for i in range(n):
        res = gemmi.Residue()
        res.name = resnames[i]
        res.seqid = gemmi.SeqId(int(numbers[i]), " ")
        res.label_seq = i + 1
        res.subchain = chain_id
        res.entity_id = "1"
        res.entity_type = gemmi.EntityType.Polymer
        for k in np.flatnonzero(mask[i]):
            name37 = rc.atom_types[k]
            atom = gemmi.Atom()
            atom.name = name37
            atom.element = gemmi.Element(name37[0])  # N, C, O, S: protein heavy atoms
            atom.pos = gemmi.Position(*pos[i, k])
            atom.occ = 1.0
            atom.b_iso = float(bf[i, k])
            serial += 1
            atom.serial = serial
            res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)

    entity = gemmi.Entity("1")
    entity.entity_type = gemmi.EntityType.Polymer
    entity.polymer_type = gemmi.PolymerType.PeptideL
    entity.subchains = [chain_id]
    entity.full_sequence = resnames
    st.entities.append(entity)
    return st


def _model_takes_int() -> bool:
    try:
        gemmi.Model(1)
        return True
    except TypeError:
        return False


def write_mmcif(st: gemmi.Structure, path: str | Path) -> Path:
    """mmCIF with entity, entity_poly(_seq), struct_asym, chem_comp and atom_site categories."""
    path = Path(path)
    groups = gemmi.MmcifOutputGroups(True)
    groups.cell = False           # a predicted model has no crystal cell
    groups.symmetry = False
    doc = st.make_mmcif_document(groups)
    block = doc.sole_block()
    names = sorted({res.name for chain in st[0] for res in chain})
    block.set_mmcif_category("_chem_comp", {  # gemmi leaves the type '.'; viewers like it filled in
        "id": names,
        "type": ["peptide linking" if n == "GLY" else "L-peptide linking" for n in names]})
    block.set_pair("_software.name", "foldforge")
    doc.write_file(str(path))
    return path


def write_pdb(st: gemmi.Structure, path: str | Path) -> Path:
    """PDB with SEQRES, ATOM, TER, END (CRYST1 of a unit cell, as AlphaFold writes for models)."""
    path = Path(path)
    n_atoms = st[0].count_atom_sites()
    n_res = max((len(ch) for ch in st[0]), default=0)
    if n_atoms > _PDB_MAX_ATOMS or n_res > _PDB_MAX_RESIDUES:
        raise ValueError(f"{path}: {n_atoms} atoms / {n_res} residues do not fit the PDB format; use mmCIF")
    path.write_text(st.make_pdb_string())
    return path


def write_structure_files(st: gemmi.Structure, stem: str | Path, fmt: str = "cif") -> list[Path]:
    """Write ``<stem>.cif`` and/or ``<stem>.pdb`` (``fmt`` in ``cif``, ``pdb``, ``both``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    if fmt in ("cif", "both"):
        out.append(write_mmcif(st, stem.with_name(stem.name + ".cif")))
    if fmt in ("pdb", "both"):
        out.append(write_pdb(st, stem.with_name(stem.name + ".pdb")))
    return out
