"""mmCIF / PDB parsing into per-chain AF2 arrays (AF2 Suppl. 1.2.1), built on gemmi.

One entry point, :func:`parse_structure`, reads ``.cif``, ``.cif.gz``, ``.pdb`` and ``.pdb.gz`` and returns
a :class:`Structure` whose protein chains carry the full (SEQRES / entity) sequence with observed atoms
placed at their sequence positions, so missing residues are gaps (mask 0), not deletions.

What real files contain and how it is handled:
- NMR ensembles: the first model only.
- altlocs: per atom, the conformer with the highest occupancy (the first one listed on ties); for
  residue-level alternatives (two residues at one sequence position) the first residue listed.
- modified residues: mapped to their parent (``residue_constants.MODIFIED_RESIDUES``; MSE's SE is stored
  at MET's SD); atoms are kept only where the parent residue has that atom name.
- insertion codes: kept per residue (``insertion_code``); the sequence position comes from
  ``label_seq_id``, so insertion codes never shift the alignment.
- non-protein polymers (DNA/RNA, saccharides) are recorded in ``Structure.other_chains`` and skipped;
  ligands and waters are outside the polymer and never reach the arrays.
- PDB files without SEQRES: the sequence is the observed residues and ``residue_index`` follows the author
  numbering, so numbering gaps stay visible to the relative position encoding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import numpy as np

from foldforge.data import residue_constants as rc


class StructureError(ValueError):
    """A structure file that cannot be used; the message names the file and the problem."""


@dataclass
class ProteinChain:
    chain_id: str                   # author chain id (auth_asym_id), as in "1abc_A"
    entity_id: str
    sequence: str                   # one-letter full sequence; modified residues -> parent, unknown 'X'
    aatype: np.ndarray              # int8 [L]
    residue_index: np.ndarray       # int32 [L], 0-based position in the full sequence
    author_resnum: np.ndarray       # int32 [L], author residue number (or -1 where unobserved)
    insertion_code: np.ndarray      # <U1 [L], '' where none
    all_atom_positions: np.ndarray  # float32 [L, 37, 3], 0 where unobserved
    all_atom_mask: np.ndarray       # uint8 [L, 37]

    @property
    def num_residues(self) -> int:
        return len(self.sequence)

    @property
    def num_observed(self) -> int:
        return int(self.all_atom_mask[:, rc.atom_order["CA"]].sum())


@dataclass
class Structure:
    pdb_id: str
    path: str
    resolution: float               # Å; NaN when the file states none (NMR, models)
    release_date: str | None        # YYYY-MM-DD of the first released revision
    method: str
    chains: dict[str, ProteinChain] = field(default_factory=dict)
    other_chains: list[tuple[str, str]] = field(default_factory=list)  # (chain id, what it is)


def _parent_resname(name: str) -> str | None:
    """Standard parent (3-letter) of a residue name, or None if it is not an amino acid we know."""
    if name in rc.restype_3to1:
        return name
    if name in rc.MODIFIED_RESIDUES:
        return rc.MODIFIED_RESIDUES[name]
    info = gemmi.find_tabulated_residue(name)
    if info is not None and info.is_amino_acid():
        parent = rc.restype_1to3.get(info.one_letter_code.upper())
        if parent is not None:
            return parent
    return None


def _one_letter(name: str) -> str:
    # microheterogeneity in _entity_poly_seq comes as "SER,THR": the first residue wins
    parent = _parent_resname(name.split(",")[0])
    return rc.restype_3to1[parent] if parent else "X"


_BACKBONE = ("N", "CA", "C", "O", "CB")


def _allowed_atoms(parent: str | None) -> set[str]:
    if parent is None:  # unknown residue: backbone (and CB) only, as AF2 keeps for UNK
        return set(_BACKBONE)
    # atom14 names of the parent, plus the C-terminal OXT that atom37 also carries
    return {a for a in rc.restype_name_to_atom14_names[parent] if a} | {"OXT"}


_ALLOWED = {p: _allowed_atoms(p) for p in list(rc.restype_3to1) + [None]}


def _pdb_id(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".gz", ".cif", ".pdb", ".ent", ".mmcif"):
        name = name.removesuffix(suffix)
    return name


def _read(path: Path) -> tuple[gemmi.Structure, gemmi.cif.Block | None]:
    name = path.name.lower()
    if not path.is_file():
        raise StructureError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise StructureError(f"{path}: empty file")
    try:
        if ".cif" in name:
            block = gemmi.cif.read(str(path)).sole_block()
            st = gemmi.make_structure_from_block(block)
            return st, block
        if ".pdb" in name or ".ent" in name:
            return gemmi.read_structure(str(path)), None
    except (RuntimeError, ValueError, IndexError) as e:
        raise StructureError(f"{path}: cannot parse ({e})") from None
    raise StructureError(f"{path}: unknown structure format (expected .cif, .cif.gz, .pdb, .pdb.gz)")


def _release_date(block: gemmi.cif.Block | None) -> str | None:
    if block is None:
        return None
    dates = [d for d in block.find_values("_pdbx_audit_revision_history.revision_date") if len(d) >= 10]
    if not dates:
        dates = [block.find_value("_pdbx_database_status.recvd_initial_deposition_date") or ""]
    dates = sorted(gemmi.cif.as_string(d) for d in dates if d and d not in ("?", "."))
    return dates[0] if dates else None


def _method(st: gemmi.Structure, block: gemmi.cif.Block | None) -> str:
    if block is not None:
        values = [gemmi.cif.as_string(v) for v in block.find_values("_exptl.method")]
        if values:
            return ";".join(values)
    return st.info["_exptl.method"] if "_exptl.method" in st.info else ""


def _fill_residue(pos: np.ndarray, mask: np.ndarray, occ: np.ndarray, res: gemmi.Residue, parent) -> None:
    """Write one residue's heavy atoms into its atom37 slot, keeping the highest-occupancy altloc."""
    allowed = _ALLOWED[parent]
    for atom in res:
        name = atom.name
        if name == "SE" and res.name == "MSE":
            name = "SD"
        if name not in allowed:
            continue
        i = rc.atom_order[name]
        if mask[i] and atom.occ <= occ[i]:
            continue
        p = atom.pos
        pos[i] = (p.x, p.y, p.z)
        mask[i] = 1
        occ[i] = atom.occ


def _protein_chain(chain: gemmi.Chain, polymer: gemmi.ResidueSpan, entity: gemmi.Entity | None) -> ProteinChain:
    full = list(entity.full_sequence) if entity is not None else []
    residues = list(polymer)
    use_label_seq = bool(full) and all(r.label_seq is not None for r in residues)
    if use_label_seq:
        seq = "".join(_one_letter(n) for n in full)
        slots = [r.label_seq - 1 for r in residues]
        residue_index = np.arange(len(seq), dtype=np.int32)
    else:  # no entity sequence (PDB without SEQRES): observed residues, author numbering
        seq = "".join(_one_letter(r.name) for r in residues)
        slots = list(range(len(residues)))
        nums = np.array([r.seqid.num for r in residues], dtype=np.int64)
        residue_index = (nums - nums.min()).astype(np.int32) if len(nums) else np.zeros(0, np.int32)
    n = len(seq)
    pos = np.zeros((n, rc.atom_type_num, 3), dtype=np.float32)
    mask = np.zeros((n, rc.atom_type_num), dtype=np.uint8)
    occ = np.zeros((n, rc.atom_type_num), dtype=np.float32)
    author = np.full(n, -1, dtype=np.int32)
    icode = np.full(n, "", dtype="<U1")
    taken = np.zeros(n, dtype=bool)
    for slot, res in zip(slots, residues):
        if not 0 <= slot < n or taken[slot]:
            continue  # residue-level altloc: the first residue listed keeps the slot
        taken[slot] = True
        _fill_residue(pos[slot], mask[slot], occ[slot], res, _parent_resname(res.name))
        author[slot] = res.seqid.num
        icode[slot] = res.seqid.icode.strip()
    return ProteinChain(
        chain_id=chain.name, entity_id=entity.name if entity is not None else "",
        sequence=seq, aatype=rc.sequence_to_aatype(seq) if seq else np.zeros(0, np.int8),
        residue_index=residue_index, author_resnum=author, insertion_code=icode,
        all_atom_positions=pos, all_atom_mask=mask,
    )


def parse_structure(path: str | Path) -> Structure:
    """Parse one mmCIF/PDB file (AF2 Suppl. 1.2.1). Raises :class:`StructureError` on unusable input."""
    path = Path(path)
    st, block = _read(path)
    if len(st) == 0:
        raise StructureError(f"{path}: no models (empty or truncated file)")
    st.setup_entities()
    resolution = st.resolution if st.resolution and st.resolution > 0 else math.nan
    out = Structure(pdb_id=_pdb_id(path), path=str(path), resolution=float(resolution),
                    release_date=_release_date(block), method=_method(st, block))
    for chain in st[0]:  # first model only (NMR ensembles)
        polymer = chain.get_polymer()
        if len(polymer) == 0:
            continue  # ligands / waters only
        entity = st.get_entity_of(polymer)
        ptype = entity.polymer_type if entity is not None else polymer.check_polymer_type()
        if ptype != gemmi.PolymerType.PeptideL:
            out.other_chains.append((chain.name, str(ptype).split(".")[-1]))
            continue
        if chain.name in out.chains:  # split auth chain (rare): keep the first polymer
            continue
        out.chains[chain.name] = _protein_chain(chain, polymer, entity)
    if not out.chains and not out.other_chains:
        raise StructureError(f"{path}: no polymer chains (empty or truncated file)")
    return out
