"""Raw per-chain AF2 features (AF2 Suppl. 1.2.9): the deterministic part of featurisation.

:func:`build_record` turns a parsed chain, its MSA and its template features into the arrays of the record
schema (docs/design.md) plus JSON metadata; ``foldforge prepare`` writes them to the cache once, and the
random training transforms (``transforms.py``) run per sample on top.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from foldforge.data import residue_constants as rc
from foldforge.data.mmcif import ProteinChain, Structure
from foldforge.data.msa import MSA
from foldforge.data.targets import make_targets, pseudo_beta_targets, rigid_group_targets, torsion_angle_targets


# Bumped whenever the arrays a record holds change; part of every record's prepare key, so `prepare`
# rebuilds records written by an older foldforge instead of reusing them.
RECORD_SCHEMA = 2


class FeatureError(ValueError):
    """Inputs of one chain that do not fit together (e.g. an MSA built for another sequence)."""


def single_sequence_msa(sequence: str) -> MSA:
    """Single-sequence mode: the query is the only MSA row."""
    aatype = rc.sequence_to_aatype(sequence)[None]
    return MSA(aatype=aatype, deletions=np.zeros(aatype.shape, np.uint16), descriptions=["query"])


def check_msa_matches(chain_seq: str, msa: MSA, *, source: str, max_mismatch: float = 0.1) -> None:
    """The MSA query row must be the chain's sequence (unknown 'X' on either side matches anything)."""
    query = msa.aatype[0]
    if len(query) != len(chain_seq):
        raise FeatureError(f"{source}: MSA query has {len(query)} residues but the chain sequence has "
                           f"{len(chain_seq)}; the alignment was built for another sequence")
    seq = rc.sequence_to_aatype(chain_seq)
    known = (seq != rc.UNK_ID) & (query != rc.UNK_ID)
    mismatch = float(((seq != query) & known).sum()) / max(1, int(known.sum()))
    if mismatch > max_mismatch:
        raise FeatureError(f"{source}: MSA query differs from the chain sequence at {mismatch:.0%} of "
                           f"positions (limit {max_mismatch:.0%})")


def sequence_only(sequence: str, name: str, chain_id: str = "A") -> tuple[Structure, ProteinChain]:
    """A chain known only by its sequence (prediction inputs, MSA-only benchmarks): no observed atoms."""
    n = len(sequence)
    chain = ProteinChain(
        chain_id=chain_id, entity_id="1", sequence=sequence, aatype=rc.sequence_to_aatype(sequence),
        residue_index=np.arange(n, dtype=np.int32), author_resnum=np.arange(1, n + 1, dtype=np.int32),
        insertion_code=np.full(n, "", dtype="<U1"),
        all_atom_positions=np.zeros((n, rc.atom_type_num, 3), np.float32),
        all_atom_mask=np.zeros((n, rc.atom_type_num), np.uint8))
    structure = Structure(pdb_id=name, path="", resolution=math.nan, release_date=None, method="sequence",
                          chains={chain_id: chain})
    return structure, chain


def empty_templates(num_res: int) -> dict[str, np.ndarray]:
    return {
        "template_aatype": np.zeros((0, num_res), np.int8),
        "template_all_atom_positions": np.zeros((0, num_res, rc.atom_type_num, 3), np.float32),
        "template_all_atom_mask": np.zeros((0, num_res, rc.atom_type_num), np.uint8),
        "template_sum_probs": np.zeros((0,), np.float32),
    }


TEMPLATE_GEOMETRY = {  # name -> (source key in targets.py output, per-residue shape, dtype)
    "template_pseudo_beta": ("pseudo_beta", (3,), np.float32),
    "template_pseudo_beta_mask": ("pseudo_beta_mask", (), np.uint8),
    "template_backbone_frame": ("rigidgroups_gt_frames", (4, 4), np.float32),
    "template_backbone_frame_mask": ("rigidgroups_gt_exists", (), np.uint8),
    "template_torsion_angles_sin_cos": ("torsion_angles_sin_cos", (7, 2), np.float32),
    "template_alt_torsion_angles_sin_cos": ("alt_torsion_angles_sin_cos", (7, 2), np.float32),
    "template_torsion_angles_mask": ("torsion_angles_mask", (7,), np.uint8),
}


def template_geometry(templates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-template geometry the template embedder reads (AF2 Suppl. 1.7.1, Table 1): pseudo-beta,
    backbone frame and torsion angles, computed once at prepare time from the template atoms."""
    aatype, pos, mask = (templates[k] for k in ("template_aatype", "template_all_atom_positions",
                                                 "template_all_atom_mask"))
    num_t, num_res = aatype.shape
    out = {k: np.zeros((num_t, num_res) + shape, dtype) for k, (_, shape, dtype) in TEMPLATE_GEOMETRY.items()}
    for t in range(num_t):
        aa = np.minimum(aatype[t], rc.UNK_ID)  # unaligned (gap) positions have no atoms: treat as unknown
        geo = {**pseudo_beta_targets(aa, pos[t], mask[t]), **torsion_angle_targets(aa, pos[t], mask[t])}
        frames = rigid_group_targets(aa, pos[t], mask[t])
        geo["rigidgroups_gt_frames"] = frames["rigidgroups_gt_frames"][:, 0]   # backbone group only
        geo["rigidgroups_gt_exists"] = frames["rigidgroups_gt_exists"][:, 0]
        for key, (src, _, dtype) in TEMPLATE_GEOMETRY.items():
            out[key][t] = geo[src].astype(dtype)
    return out


def build_record(structure: Structure, chain: ProteinChain, msa: MSA,
                 templates: dict[str, np.ndarray] | None = None,
                 template_meta: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and metadata of one chain record (schema in docs/design.md)."""
    num_res = chain.num_residues
    templates = templates if templates is not None else empty_templates(num_res)
    templates = {**templates, **template_geometry(templates)}
    for key, arr in templates.items():
        if key != "template_sum_probs" and arr.shape[1] != num_res:
            raise FeatureError(f"{structure.pdb_id}_{chain.chain_id}: {key} has {arr.shape[1]} residues, "
                               f"chain has {num_res}")
    arrays: dict[str, np.ndarray] = {
        "aatype": chain.aatype.astype(np.int8),
        "residue_index": chain.residue_index.astype(np.int32),
        "all_atom_positions": chain.all_atom_positions.astype(np.float32),
        "all_atom_mask": chain.all_atom_mask.astype(np.uint8),
        "msa": msa.aatype.astype(np.int8),
        "deletion_matrix": msa.deletions.astype(np.uint16),
        **templates,
    }
    arrays.update(make_targets(arrays["aatype"], arrays["all_atom_positions"], arrays["all_atom_mask"]))
    resolution = structure.resolution
    meta = {
        "schema": RECORD_SCHEMA,
        "pdb_id": structure.pdb_id,
        "chain_id": chain.chain_id,
        "sequence": chain.sequence,
        "length": num_res,
        "num_observed": chain.num_observed,
        "resolution": None if math.isnan(resolution) else resolution,
        "release_date": structure.release_date,
        "method": structure.method,
        "msa_depth": int(msa.aatype.shape[0]),
        "num_templates": int(templates["template_aatype"].shape[0]),
        "source": structure.path,
        "author_resnum": chain.author_resnum.tolist(),
        "insertion_code": "".join(c or " " for c in chain.insertion_code.tolist()),
        **(template_meta or {}),
    }
    return arrays, meta
