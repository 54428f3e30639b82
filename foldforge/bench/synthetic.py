"""Synthetic AF2 training samples at any crop, for step benchmarks without a prepared cache.

"Synthetic" means the *record* is assembled here instead of read from a cache; everything after that is
the real pipeline (:func:`foldforge.data.features.build_record` for the ground-truth targets and template
geometry, :func:`foldforge.data.transforms.make_af2_batch` for cropping, MSA sampling, clustering and
padding), so the batch has the exact shapes, dtypes and mask structure of a training batch:

- structure: the observed residues of the bundled real chains (``foldforge/data/sample``), concatenated
  (each chain translated by 40 A so pieces do not overlap) until ``length`` residues exist -- real
  side-chain geometry, real residue types, a few unobserved atoms like any crystal structure;
- MSA: ``msa_depth`` rows derived from the query with a seeded RNG: 15-45% substitutions per row, gap
  runs covering 0-30% of each row and sparse deletions -- so the cluster/extra-MSA masks are full (as for
  the deep MSAs of the MLPerf set) while the profile and deletion features are non-trivial;
- templates: ``num_templates`` copies of the true structure with 1-3 A coordinate noise.

``length`` defaults to the crop, so no residue is padding: the worst case for time and memory.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from foldforge.config import DataConfig
from foldforge.data import residue_constants as rc
from foldforge.data.batch import AF2Batch
from foldforge.data.features import build_record
from foldforge.data.mmcif import ProteinChain, Structure, parse_structure
from foldforge.data.msa import MSA
from foldforge.data.prepare import SAMPLE_DIR
from foldforge.data.transforms import make_af2_batch

_CA = rc.atom_order["CA"]


@functools.lru_cache(maxsize=1)
def _sample_chains() -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """(aatype [n], positions [n, 37, 3], mask [n, 37]) of the observed residues of each bundled chain."""
    out = []
    for path in sorted((SAMPLE_DIR / "mmcif").glob("*.cif.gz")):
        for chain in parse_structure(path).chains.values():
            keep = chain.all_atom_mask[:, _CA] > 0
            if keep.any():
                out.append((chain.aatype[keep], chain.all_atom_positions[keep], chain.all_atom_mask[keep]))
    return tuple(out)


def synthetic_chain(length: int) -> tuple[Structure, ProteinChain]:
    """A ``length``-residue chain built from the bundled real chains (see the module docstring)."""
    if length < 1:
        raise ValueError(f"synthetic chain length must be >= 1, got {length}")
    aa, pos, mask, n, shift = [], [], [], 0, 0
    while n < length:
        for a, p, m in _sample_chains():
            take = min(len(a), length - n)
            centre = p[:take, _CA].mean(axis=0)
            offset = np.array([40.0 * shift, 0.0, 0.0], np.float32)
            aa.append(a[:take])
            pos.append(((p[:take] - centre + offset) * (m[:take, :, None] > 0)).astype(np.float32))
            mask.append(m[:take])
            n, shift = n + take, shift + 1
            if n == length:
                break
    aatype = np.concatenate(aa).astype(np.int8)
    chain = ProteinChain(
        chain_id="A", entity_id="1", sequence="".join(rc.restypes_with_x[min(int(t), rc.UNK_ID)] for t in aatype),
        aatype=aatype, residue_index=np.arange(length, dtype=np.int32),
        author_resnum=np.arange(1, length + 1, dtype=np.int32), insertion_code=np.full(length, "", dtype="<U1"),
        all_atom_positions=np.concatenate(pos), all_atom_mask=np.concatenate(mask).astype(np.uint8))
    structure = Structure(pdb_id="synthetic", path="synthetic", resolution=2.0, release_date="2020-01-01",
                          method="synthetic", chains={"A": chain})
    return structure, chain


def synthetic_msa(query: np.ndarray, depth: int, rng: np.random.Generator) -> MSA:
    """``depth`` rows: the query, then mutated copies with gap runs and sparse deletions."""
    n = len(query)
    rows = np.repeat(query[None].astype(np.int8), depth, axis=0)
    dels = np.zeros((depth, n), np.uint16)
    for r in range(1, depth):
        sub = rng.random(n) < rng.uniform(0.15, 0.45)
        rows[r, sub] = rng.integers(0, 20, int(sub.sum()))
        gap_frac = rng.uniform(0.0, 0.3)
        n_gap = int(gap_frac * n)
        if n_gap:
            start = int(rng.integers(0, n - n_gap + 1))
            rows[r, start:start + n_gap] = rc.GAP_ID
        has_del = rng.random(n) < 0.02
        dels[r, has_del] = rng.integers(1, 12, int(has_del.sum()))
    return MSA(aatype=rows, deletions=dels, descriptions=["query"] + [f"synthetic_{r}" for r in range(1, depth)],
               source="synthetic")


@functools.lru_cache(maxsize=4)
def synthetic_record(length: int, msa_depth: int, num_templates: int, seed: int = 0
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and metadata of one synthetic chain record (same schema as a cache record). Cached: an
    ablation builds the same record for every configuration; callers must not modify what they get."""
    rng = np.random.default_rng(seed)
    structure, chain = synthetic_chain(length)
    msa = synthetic_msa(chain.aatype, max(1, msa_depth), rng)
    t = num_templates
    noise = rng.normal(0.0, rng.uniform(1.0, 3.0, size=(t, 1, 1, 1)), size=(t, length, rc.atom_type_num, 3))
    templates = {
        "template_aatype": np.repeat(chain.aatype[None], t, axis=0).astype(np.int8),
        "template_all_atom_positions": ((chain.all_atom_positions[None] + noise)
                                        * (chain.all_atom_mask[None, ..., None] > 0)).astype(np.float32),
        "template_all_atom_mask": np.repeat(chain.all_atom_mask[None], t, axis=0).astype(np.uint8),
        "template_sum_probs": rng.uniform(50.0, 300.0, size=(t,)).astype(np.float32),
    }
    return build_record(structure, chain, msa, templates)


def synthetic_batch_source(cfg: DataConfig, *, seed: int = 0, length: int | None = None):
    """A callable ``i -> AF2Batch`` (sample ``i`` with its own transform RNG) over one synthetic record
    with enough MSA rows to fill the clusters and the extra MSA (after block deletion)."""
    length = cfg.crop_size if length is None else length
    # MSA block deletion (AF2 Suppl. Alg. 1) drops up to ~70% of the rows: 4x keeps both stacks full
    depth = 4 * (cfg.max_msa_clusters + cfg.max_extra_msa)
    arrays = {**synthetic_record(length, depth, cfg.max_templates, seed)[0], "resolution": np.float32(2.0)}

    def sample(i: int) -> AF2Batch:
        return AF2Batch.from_numpy(make_af2_batch(arrays, cfg, np.random.default_rng([seed, i]), train=True))

    return sample
