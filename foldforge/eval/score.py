"""Scoring one structure file against a reference: ``foldforge score --model X --reference Y``.

Both files are read with :func:`foldforge.data.mmcif.parse_structure` (mmCIF or PDB, gzipped or not;
first model of an ensemble; highest-occupancy altloc; modified residues as their parent). Chains are
matched by author chain id, residues by author residue number + insertion code; a residue takes part
when its Cα is present in both files. Over the matched residues of all matched chains together:

- ``lddt_ca``: lDDT-Cα as MLPerf/OpenFold define it (AF2 Suppl. 1.9.6; ``foldforge.model.lddt``);
- ``lddt``: full-atom lDDT (:func:`foldforge.eval.metrics.lddt_all_atom`): the reference's heavy atoms
  of each residue, inter-residue pairs (pairs across chains included), model atoms missing -> their pairs
  fail, symmetric side-chain atoms resolved per residue;
- ``rmsd_ca``: Cα RMSD after one optimal superposition of all matched Cα (Kabsch).

Residue types are taken from the reference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from foldforge.data import residue_constants as rc
from foldforge.data.mmcif import ProteinChain, StructureError, parse_structure
from foldforge.eval.metrics import kabsch_rmsd, lddt_all_atom, lddt_ca_chain

_CA = rc.atom_order["CA"]
SCORE_KEYS = ("lddt_ca", "lddt", "rmsd_ca")


class ScoreError(ValueError):
    """Two structures that cannot be compared (no common chain or residue); the message says why."""


def _residue_keys(chain: ProteinChain) -> dict[tuple[int, str], int]:
    """(author residue number, insertion code) -> sequence position, for residues with a Cα."""
    keys = {}
    for i in np.flatnonzero(chain.all_atom_mask[:, _CA]):
        key = (int(chain.author_resnum[i]), str(chain.insertion_code[i]).strip())
        keys.setdefault(key, int(i))  # duplicate numbering (rare): the first residue keeps the key
    return keys


def matched_arrays(model_path: str | Path, reference_path: str | Path) -> dict[str, np.ndarray]:
    """Atom37 arrays of the residues present (with a Cα) in both files, reference order:
    ``model_positions``, ``model_mask``, ``ref_positions``, ``ref_mask`` ([N, 37(, 3)]), ``aatype`` [N]
    (from the reference), and ``chains`` (the matched chain ids)."""
    model = parse_structure(model_path)
    ref = parse_structure(reference_path)
    common = [c for c in ref.chains if c in model.chains]
    if not common:
        raise ScoreError(f"no common protein chain id: model {model_path} has {sorted(model.chains)}, "
                         f"reference {reference_path} has {sorted(ref.chains)}")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("model_positions", "model_mask", "ref_positions",
                                                          "ref_mask", "aatype")}
    for cid in common:
        mc, rcn = model.chains[cid], ref.chains[cid]
        mkeys, rkeys = _residue_keys(mc), _residue_keys(rcn)
        shared = [k for k in rkeys if k in mkeys]
        ri = np.array([rkeys[k] for k in shared], dtype=np.int64)
        mi = np.array([mkeys[k] for k in shared], dtype=np.int64)
        parts["ref_positions"].append(rcn.all_atom_positions[ri])
        parts["ref_mask"].append(rcn.all_atom_mask[ri])
        parts["aatype"].append(rcn.aatype[ri])
        parts["model_positions"].append(mc.all_atom_positions[mi])
        parts["model_mask"].append(mc.all_atom_mask[mi])
    out = {k: np.concatenate(v, axis=0) for k, v in parts.items()}
    if out["aatype"].shape[0] == 0:
        raise ScoreError(f"no residue (author number + insertion code, with a Cα) is present in both "
                         f"{model_path} and {reference_path} (chains {common})")
    out["chains"] = np.array(common)
    return out


def score_structures(model_path: str | Path, reference_path: str | Path) -> dict[str, float]:
    """``{"lddt_ca", "lddt", "rmsd_ca"}`` of the model file against the reference file."""
    a = matched_arrays(model_path, reference_path)
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items() if k != "chains"}
    return {
        "lddt_ca": lddt_ca_chain(t["model_positions"], t["ref_positions"], t["ref_mask"].float()),
        "lddt": lddt_all_atom(t["model_positions"], t["ref_positions"], t["ref_mask"], t["aatype"],
                              pred_mask37=t["model_mask"]),
        "rmsd_ca": kabsch_rmsd(a["model_positions"][:, _CA], a["ref_positions"][:, _CA]),
    }


def run_score(model_path: str | Path, reference_path: str | Path) -> dict[str, float]:
    """``foldforge score``: :func:`score_structures`, with unreadable files reported as ScoreError."""
    try:
        return score_structures(model_path, reference_path)
    except StructureError as e:
        raise ScoreError(str(e)) from None
