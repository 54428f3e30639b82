"""Template hits -> AF2 template features (AF2 Suppl. 1.2.3; semantics of AF2 ``data/templates.py``).

:class:`TemplateFeaturizer` turns parsed hits (:mod:`foldforge.data.template_hits`) into per-query
arrays: for every kept hit the template residue aligned to each query position, its atom37 coordinates
and mask (gap 21 / zeros where a query residue has no template partner).

What follows AF2 ``HhsearchHitFeaturizer`` exactly:
- hits are processed in descending ``sum_probs`` order (stable; hits without sum_probs -- m8, sto --
  keep their file order after those with it); ``max_hits`` counts *accepted* templates.
- prefilter: release date after the cutoff, ``aligned_cols / len(query) <= min_align_ratio``, template
  segment a substring of the query with length ratio > ``max_subsequence_ratio``, segment < 10 residues.
- the query->template mapping uses the hit's own indices relative to the template segment; the segment
  is located in the mmCIF SEQRES of the named chain (exact substring), else of any chain, else by a fuzzy
  match where 'X' matches anything, else the segment is realigned to the chain's SEQRES and the
  mapping composed (AF2 calls kalign here; :func:`align_sequences` is our own Gotoh alignment), requiring
  >= 10 % identity relative to the shorter sequence.
- template residue letters come from the hit row (SEQRES after a realignment); MSE is MET with SE at SD
  (done by :mod:`foldforge.data.mmcif`); arginine NH1/NH2 are swapped where NH2 is the one closer to CD.
- templates with fewer than 5 observed atoms over the aligned residues are dropped; the effective date
  cutoff is min(cutoff, query release date - 60 days).

Deliberate differences: a missing mmCIF rejects the hit instead of raising; a realigned mapping that
leaves a query residue without partner drops that residue (AF2 would index residue -1, the chain's last);
the hit's own start position is preferred over the first occurrence when the segment occurs twice.
"""
from __future__ import annotations

import datetime as dt
import gzip
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from foldforge.data import residue_constants as rc
from foldforge.data.template_hits import (  # noqa: F401  (re-exported API)
    TemplateError, TemplateHit, parse_hhr, parse_hmmsearch_sto, parse_m8, split_pdb_chain,
)

# ------------------------------------------------------------------------------------- alignment

# NCBI BLOSUM62 (half-bit units), rows/columns in _B62_ALPHABET order; '*' row dropped.
_B62_ALPHABET = "ARNDCQEGHILKMFPSTWYVBZX"
_B62_ROWS = """
 4 -1 -2 -2  0 -1 -1  0 -2 -1 -1 -1 -1 -2 -1  1  0 -3 -2  0 -2 -1  0
-1  5  0 -2 -3  1  0 -2  0 -3 -2  2 -1 -3 -2 -1 -1 -3 -2 -3 -1  0 -1
-2  0  6  1 -3  0  0  0  1 -3 -3  0 -2 -3 -2  1  0 -4 -2 -3  3  0 -1
-2 -2  1  6 -3  0  2 -1 -1 -3 -4 -1 -3 -3 -1  0 -1 -4 -3 -3  4  1 -1
 0 -3 -3 -3  9 -3 -4 -3 -3 -1 -1 -3 -1 -2 -3 -1 -1 -2 -2 -1 -3 -3 -2
-1  1  0  0 -3  5  2 -2  0 -3 -2  1  0 -3 -1  0 -1 -2 -1 -2  0  3 -1
-1  0  0  2 -4  2  5 -2  0 -3 -3  1 -2 -3 -1  0 -1 -3 -2 -2  1  4 -1
 0 -2  0 -1 -3 -2 -2  6 -2 -4 -4 -2 -3 -3 -2  0 -2 -2 -3 -3 -1 -2 -1
-2  0  1 -1 -3  0  0 -2  8 -3 -3 -1 -2 -1 -2 -1 -2 -2  2 -3  0  0 -1
-1 -3 -3 -3 -1 -3 -3 -4 -3  4  2 -3  1  0 -3 -2 -1 -3 -1  3 -3 -3 -1
-1 -2 -3 -4 -1 -2 -3 -4 -3  2  4 -2  2  0 -3 -2 -1 -2 -1  1 -4 -3 -1
-1  2  0 -1 -3  1  1 -2 -1 -3 -2  5 -1 -3 -1  0 -1 -3 -2 -2  0  1 -1
-1 -1 -2 -3 -1  0 -2 -3 -2  1  2 -1  5  0 -2 -1 -1 -1 -1  1 -3 -1 -1
-2 -3 -3 -3 -2 -3 -3 -3 -1  0  0 -3  0  6 -4 -2 -2  1  3 -1 -3 -3 -1
-1 -2 -2 -1 -3 -1 -1 -2 -2 -3 -3 -1 -2 -4  7 -1 -1 -4 -3 -2 -2 -1 -2
 1 -1  1  0 -1  0  0  0 -1 -2 -2  0 -1 -2 -1  4  1 -3 -2 -2  0  0  0
 0 -1  0 -1 -1 -1 -1 -2 -2 -1 -1 -1 -1 -2 -1  1  5 -2 -2  0 -1 -1  0
-3 -3 -4 -4 -2 -2 -3 -2 -2 -3 -2 -3 -1  1 -4 -3 -2 11  2 -3 -4 -3 -2
-2 -2 -2 -3 -2 -1 -2 -3  2 -1 -1 -2 -1  3 -3 -2 -2  2  7 -1 -3 -2 -1
 0 -3 -3 -3 -1 -2 -2 -3 -3  3  1 -2  1 -1 -2 -2  0 -3 -1  4 -3 -2 -1
-2 -1  3  4 -3  0  1 -1  0 -3 -4  0 -3 -3 -2  0 -1 -4 -3 -3  4  1 -1
-1  0  0  1 -3  3  4 -2  0 -3 -3  1 -1 -3 -1  0 -1 -3 -2 -2  1  4 -1
 0 -1 -1 -1 -2 -1 -1 -1 -1 -1 -1 -1 -1 -1 -2  0  0 -2 -1 -1 -1 -1 -1
"""
BLOSUM62 = np.array([[int(v) for v in row.split()] for row in _B62_ROWS.strip().splitlines()], dtype=np.int32)
_B62_LUT = np.full(256, _B62_ALPHABET.index("X"), dtype=np.int64)
for _k, _c in enumerate(_B62_ALPHABET):
    _B62_LUT[ord(_c)] = _k
    _B62_LUT[ord(_c.lower())] = _k
_B62_LUT[ord("U")] = _B62_ALPHABET.index("C")
_NEG = -(1 << 28)
MAX_ALIGNMENT_CELLS = 30_000_000  # three int32 matrices: ~360 MB at the limit


def align_sequences(a: str, b: str, *, gap_open: int = 11, gap_extend: int = 1,
                    free_end_gaps: bool = True) -> list[tuple[int, int]]:
    """Pairwise alignment (Gotoh, BLOSUM62, gap cost ``open + k * extend``) -> aligned (i, j) pairs.

    With ``free_end_gaps`` leading/trailing residues of either sequence are unaligned at no cost
    (overlap alignment), which suits aligning a template segment to a full SEQRES.
    Row-vectorised numpy: a 1000 x 1000 alignment takes a few tens of milliseconds.
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    if (n + 1) * (m + 1) > MAX_ALIGNMENT_CELLS:
        raise ValueError(f"alignment of {n} x {m} residues exceeds {MAX_ALIGNMENT_CELLS} cells")
    ia = _B62_LUT[np.frombuffer(a.encode("ascii", "replace"), np.uint8)]
    ib = _B62_LUT[np.frombuffer(b.encode("ascii", "replace"), np.uint8)]
    go, ge = gap_open + gap_extend, gap_extend
    H = np.empty((n + 1, m + 1), np.int32)
    E = np.full((n + 1, m + 1), _NEG, np.int32)
    F = np.full((n + 1, m + 1), _NEG, np.int32)
    ks = np.arange(m + 1, dtype=np.int32) * ge
    if free_end_gaps:
        H[0, :] = 0
        H[:, 0] = 0
    else:
        H[0, 0] = 0
        H[0, 1:] = -(gap_open + ks[1:])
        H[1:, 0] = -(gap_open + np.arange(1, n + 1, dtype=np.int32) * ge)
    for i in range(1, n + 1):
        F[i, 1:] = np.maximum(H[i - 1, 1:] - go, F[i - 1, 1:] - ge)
        hp = np.empty(m + 1, np.int32)
        hp[0] = H[i, 0]
        hp[1:] = np.maximum(H[i - 1, :-1] + BLOSUM62[ia[i - 1], ib], F[i, 1:])
        best_open = np.maximum.accumulate(hp + ks)  # max_{k<=j} hp[k] + k*ge
        E[i, 1:] = best_open[:-1] - go - ks[:-1]
        H[i, 1:] = np.maximum(hp[1:], E[i, 1:])
    if free_end_gaps:
        j_end = int(np.argmax(H[n, :]))
        i_end = int(np.argmax(H[:, m]))
        i, j = (n, j_end) if H[n, j_end] >= H[i_end, m] else (i_end, m)
    else:
        i, j = n, m
    pairs: list[tuple[int, int]] = []
    state = "H"
    while i > 0 and j > 0:
        if state == "H":
            if H[i, j] == H[i - 1, j - 1] + BLOSUM62[ia[i - 1], ib[j - 1]]:
                pairs.append((i - 1, j - 1))
                i, j = i - 1, j - 1
            elif H[i, j] == E[i, j]:
                state = "E"
            else:
                state = "F"
        elif state == "E":
            state = "H" if E[i, j] == H[i, j - 1] - go else "E"
            j -= 1
        else:
            state = "H" if F[i, j] == H[i - 1, j] - go else "F"
            i -= 1
    pairs.reverse()
    return pairs


# ------------------------------------------------------------------------------------- features

REJECT_REASONS = (
    "bad_name", "obsolete", "same_entry", "release_date", "align_ratio", "duplicate", "too_short",
    "missing_mmcif", "unparsable_mmcif", "chain_not_found", "alignment_failure", "no_atoms",
    "duplicate_template", "max_hits",
)


class RejectedHit(NamedTuple):
    name: str      # pdbid_CHAIN as in the hit
    reason: str    # one of REJECT_REASONS
    detail: str = ""


@dataclass
class TemplateFeatures:
    template_aatype: np.ndarray               # int8 [T, L], AF2 order, 21 = gap where unaligned
    template_all_atom_positions: np.ndarray   # float32 [T, L, 37, 3]
    template_all_atom_mask: np.ndarray        # uint8 [T, L, 37]
    template_sum_probs: np.ndarray            # float32 [T] (0 for hits without sum_probs, as AF2)
    template_domain_names: list[str]          # "1abc_A" (lower-case PDB id, author chain)
    template_release_dates: list[str | None]
    template_sequences: list[str]             # AF2 'template_sequence': letter per query position, '-'
    rejected: list[RejectedHit] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    release_date_cutoff: str | None = None

    @property
    def num_templates(self) -> int:
        return int(self.template_aatype.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("template_aatype", "template_all_atom_positions",
                                              "template_all_atom_mask", "template_sum_probs")}


def _date(value: str | dt.date | None, what: str) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise ValueError(f"{what}: expected YYYY-MM-DD, got {value!r}") from None


def fix_arginine_naming(aatype_letters: str, positions: np.ndarray, mask: np.ndarray) -> None:
    """Swap NH1/NH2 in place where NH2 is closer to CD than NH1 (AF2 ``_get_atom_positions``)."""
    cd, nh1, nh2 = rc.atom_order["CD"], rc.atom_order["NH1"], rc.atom_order["NH2"]
    is_arg = np.frombuffer(aatype_letters.encode("ascii", "replace"), np.uint8) == ord("R")
    ok = is_arg & (mask[:, cd] > 0) & (mask[:, nh1] > 0) & (mask[:, nh2] > 0)
    d1 = np.linalg.norm(positions[:, nh1] - positions[:, cd], axis=-1)
    d2 = np.linalg.norm(positions[:, nh2] - positions[:, cd], axis=-1)
    swap = np.nonzero(ok & (d1 > d2))[0]
    if swap.size:
        positions[swap, nh1], positions[swap, nh2] = positions[swap, nh2].copy(), positions[swap, nh1].copy()
        mask[swap, nh1], mask[swap, nh2] = mask[swap, nh2].copy(), mask[swap, nh1].copy()


class _Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class _Chain:
    chain_id: str
    sequence: str
    positions: np.ndarray
    mask: np.ndarray


@dataclass
class _Template:
    pdb_id: str
    release_date: str | None
    chains: dict[str, _Chain]


class TemplateFeaturizer:
    """AF2 ``HhsearchHitFeaturizer`` semantics over our own mmCIF parser and aligner (see module doc)."""

    def __init__(self, mmcif_dir: str | Path | Sequence[str | Path], *, max_hits: int = 20,
                 release_date_cutoff: str | None = None, max_subsequence_ratio: float = 0.95,
                 min_align_ratio: float = 0.1, min_template_length: int = 10, min_realign_identity: float = 0.1,
                 query_date_gap_days: int = 60, deduplicate: bool = False,
                 release_dates: Mapping[str, str] | None = None,
                 obsolete_pdbs: Mapping[str, str | None] | None = None,
                 mmcif_path_fn: Callable[[str], Path | None] | None = None, cache_size: int = 16):
        dirs = [mmcif_dir] if isinstance(mmcif_dir, (str, Path)) else list(mmcif_dir)
        self.mmcif_dirs = [Path(d) for d in dirs]
        self.max_hits = max_hits
        self.release_date_cutoff = _date(release_date_cutoff, "release_date_cutoff")
        self.max_subsequence_ratio = max_subsequence_ratio
        self.min_align_ratio = min_align_ratio
        self.min_template_length = min_template_length
        self.min_realign_identity = min_realign_identity
        self.query_date_gap_days = query_date_gap_days
        self.deduplicate = deduplicate
        self.release_dates = {k.lower(): v for k, v in (release_dates or {}).items()}
        self.obsolete_pdbs = {k.lower(): (v.lower() if v else None) for k, v in (obsolete_pdbs or {}).items()}
        self.mmcif_path_fn = mmcif_path_fn
        self._cache: OrderedDict[str, _Template] = OrderedDict()  # LRU of parsed template entries
        self._missing: dict[str, _Reject] = {}  # entries without a usable file
        self._cache_size = cache_size

    # --------------------------------------------------------------------------------- files
    def find_mmcif(self, pdb_id: str) -> Path | None:
        if self.mmcif_path_fn is not None:
            return self.mmcif_path_fn(pdb_id)
        for d in self.mmcif_dirs:
            for sub in (d, d / pdb_id[1:3]):
                for name in (f"{pdb_id}.cif", f"{pdb_id}.cif.gz", f"{pdb_id.upper()}.cif", f"{pdb_id.upper()}.cif.gz"):
                    if (sub / name).is_file():
                        return sub / name
        return None

    def _load(self, pdb_id: str) -> _Template:
        if pdb_id in self._missing:
            item = self._missing[pdb_id]
        elif pdb_id in self._cache:
            self._cache.move_to_end(pdb_id)
            item = self._cache[pdb_id]
        else:
            item = self._parse(pdb_id)
            if isinstance(item, _Reject):  # small; remembered for the featurizer's lifetime
                self._missing[pdb_id] = item
            else:
                self._cache[pdb_id] = item
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if isinstance(item, _Reject):
            raise item
        return item

    def _parse(self, pdb_id: str) -> _Template | _Reject:
        from foldforge.data.mmcif import StructureError, parse_structure

        path = self.find_mmcif(pdb_id)
        if path is None:
            where = ", ".join(str(d) for d in self.mmcif_dirs)
            return _Reject("missing_mmcif", f"no {pdb_id}.cif[.gz] in {where}")
        try:
            st = parse_structure(path)
        except StructureError as e:
            return _Reject("unparsable_mmcif", str(e))
        chains = {}
        for cid, ch in st.chains.items():
            pos = np.array(ch.all_atom_positions, dtype=np.float32, copy=True)
            mask = np.array(ch.all_atom_mask, dtype=np.uint8, copy=True)
            fix_arginine_naming(ch.sequence, pos, mask)
            chains[cid] = _Chain(cid, ch.sequence, pos, mask)
        return _Template(pdb_id, st.release_date, chains)

    # ------------------------------------------------------------------------------ main API
    def effective_cutoff(self, query_release_date=None, release_date_cutoff=None) -> dt.date | None:
        dates = [d for d in (self.release_date_cutoff, _date(release_date_cutoff, "release_date_cutoff")) if d]
        q = _date(query_release_date, "query_release_date")
        if q is not None:
            dates.append(q - dt.timedelta(days=self.query_date_gap_days))
        return min(dates) if dates else None

    def featurize(self, query_sequence: str, hits: Sequence[TemplateHit], query_release_date: str | None = None,
                  *, release_date_cutoff: str | None = None, query_pdb_id: str | None = None) -> TemplateFeatures:
        query_sequence = query_sequence.upper()
        L = len(query_sequence)
        cutoff = self.effective_cutoff(query_release_date, release_date_cutoff)
        order = sorted(hits, key=lambda h: -h.sum_probs if h.sum_probs is not None else float("inf"))
        kept: list[dict] = []
        rejected: list[RejectedHit] = []
        warnings: list[str] = []
        seen: set[str] = set()
        for hit in order:
            if len(kept) >= self.max_hits:
                rejected.append(RejectedHit(hit.short_name, "max_hits", f"{self.max_hits} templates already"))
                continue
            try:
                feat = self._process(query_sequence, hit, cutoff, query_pdb_id, warnings)
            except _Reject as r:
                rejected.append(RejectedHit(hit.short_name, r.reason, r.detail))
                continue
            if self.deduplicate:
                if feat["sequence"] in seen:
                    rejected.append(RejectedHit(hit.short_name, "duplicate_template", "same aligned template sequence"))
                    continue
                seen.add(feat["sequence"])
            kept.append(feat)
        T = len(kept)
        aatype = np.full((T, L), rc.GAP_ID, np.int8)
        pos = np.zeros((T, L, rc.atom_type_num, 3), np.float32)
        mask = np.zeros((T, L, rc.atom_type_num), np.uint8)
        for t, f in enumerate(kept):
            aatype[t], pos[t], mask[t] = f["aatype"], f["positions"], f["mask"]
        return TemplateFeatures(
            template_aatype=aatype, template_all_atom_positions=pos, template_all_atom_mask=mask,
            template_sum_probs=np.array([f["sum_probs"] for f in kept], np.float32).reshape(T),
            template_domain_names=[f["name"] for f in kept], template_release_dates=[f["date"] for f in kept],
            template_sequences=[f["sequence"] for f in kept], rejected=rejected, warnings=warnings,
            release_date_cutoff=cutoff.isoformat() if cutoff else None,
        )

    # ----------------------------------------------------------------------------- per hit
    def _process(self, query: str, hit: TemplateHit, cutoff: dt.date | None, query_pdb_id: str | None,
                 warnings: list[str]) -> dict:
        L = len(query)
        pc = hit.pdb_chain
        if pc is None:
            raise _Reject("bad_name", f"hit name {hit.name[:40]!r} is not PDBID_CHAIN")
        pdb_id, chain_id = pc
        if pdb_id in self.obsolete_pdbs and pdb_id not in self.release_dates:
            if self.obsolete_pdbs[pdb_id] is None:
                raise _Reject("obsolete", f"{pdb_id} is obsolete with no replacement")
            pdb_id = self.obsolete_pdbs[pdb_id]
        if query_pdb_id and pdb_id == query_pdb_id.lower():
            raise _Reject("same_entry", f"template {pdb_id} is the query entry")
        # --- prefilter (AF2 _assess_hhsearch_hit)
        if cutoff and pdb_id in self.release_dates and _date(self.release_dates[pdb_id], pdb_id) > cutoff:
            raise _Reject("release_date", f"released {self.release_dates[pdb_id]} > cutoff {cutoff}")
        align_ratio = hit.aligned_cols / max(L, 1)
        if align_ratio <= self.min_align_ratio:
            raise _Reject("align_ratio", f"aligned {hit.aligned_cols}/{L} = {align_ratio:.3f} <= {self.min_align_ratio}")
        segment = hit.template_segment
        if segment is not None:
            self._check_segment(query, segment)
        # --- query -> template-segment mapping from the hit's own alignment
        pairs = self._hit_pairs(query, hit) if hit.has_alignment else None
        # --- structure
        tpl = self._load(pdb_id)
        if cutoff is not None:
            if tpl.release_date is None:
                raise _Reject("release_date", f"{pdb_id} has no release date and a cutoff {cutoff} is set")
            if _date(tpl.release_date, pdb_id) > cutoff:
                raise _Reject("release_date", f"released {tpl.release_date} > cutoff {cutoff}")
        if not tpl.chains:
            raise _Reject("chain_not_found", f"{pdb_id} has no protein chains")
        if segment is not None:
            chain, q_idx, t_idx, letters = self._locate_segment(tpl, chain_id, segment, pairs, hit, warnings)
        else:
            chain, q_idx, t_idx = self._locate_by_coordinates(query, tpl, chain_id, pairs, hit)
            self._check_segment(query, chain.sequence[int(t_idx.min()):int(t_idx.max()) + 1])
            letters = None
        seq_letters = np.array(["-"] * L, dtype="<U1")
        if letters is None:
            letters = [chain.sequence[t] for t in t_idx]
        seq_letters[q_idx] = list(letters)
        sequence = "".join(seq_letters)
        mask = np.zeros((L, rc.atom_type_num), np.uint8)
        positions = np.zeros((L, rc.atom_type_num, 3), np.float32)
        mask[q_idx] = chain.mask[t_idx]
        positions[q_idx] = chain.positions[t_idx]
        if int(mask.sum()) < 5:
            raise _Reject("no_atoms", f"{pdb_id}_{chain.chain_id}: no observed atoms in template residues "
                                      f"{int(t_idx.min()) + 1}-{int(t_idx.max()) + 1}" if len(t_idx) else "nothing aligned")
        return {"name": f"{pdb_id}_{chain.chain_id}", "aatype": rc.sequence_to_aatype(sequence), "mask": mask,
                "positions": positions, "sum_probs": hit.sum_probs or 0.0, "date": tpl.release_date,
                "sequence": sequence}

    def _check_segment(self, query: str, segment: str) -> None:
        ratio = len(segment) / max(len(query), 1)
        if segment in query and ratio > self.max_subsequence_ratio:
            raise _Reject("duplicate", f"template is a subsequence of the query (length ratio {ratio:.3f})")
        if len(segment) < self.min_template_length:
            raise _Reject("too_short", f"template segment has {len(segment)} residues")

    @staticmethod
    def _hit_pairs(query: str, hit: TemplateHit) -> np.ndarray:
        """[(query index, template index relative to the hit segment start)] from the hit alignment."""
        iq = np.asarray(hit.indices_query, np.int64)
        it = np.asarray(hit.indices_hit, np.int64)
        q_res = iq[iq >= 0]
        if q_res.size == 0 or (it >= 0).sum() == 0:
            raise _Reject("alignment_failure", "alignment has no aligned residues")
        q_seg = "".join(c for c in hit.query if c != "-")
        q0 = int(q_res.min())
        if q_seg and query[q0:q0 + len(q_seg)] != q_seg.upper():
            # the hit was made against another numbering of the query: place it as AF2 does (first match)
            found = query.find(q_seg.upper())
            if found < 0:
                raise _Reject("alignment_failure", "aligned query segment is not part of the query sequence")
            iq = np.where(iq >= 0, iq - q0 + found, -1)
        both = (iq >= 0) & (it >= 0)
        pairs = np.stack([iq[both], it[both] - it[it >= 0].min()], axis=1)
        return pairs[pairs[:, 0] < len(query)]

    def _locate_segment(self, tpl: _Template, chain_id: str, segment: str, pairs: np.ndarray,
                        hit: TemplateHit, warnings: list[str]):
        """AF2 _find_template_in_pdb, then _realign_pdb_template_to_query when the segment is not found."""
        named = tpl.chains.get(chain_id)
        ordered = ([named] if named is not None else []) + [c for c in tpl.chains.values() if c is not named]
        for chain in ordered:  # exact substring, named chain first (AF2 order)
            if segment in chain.sequence:
                s = hit.hit_start
                offset = s if chain.sequence[s:s + len(segment)] == segment else chain.sequence.find(segment)
                return chain, pairs[:, 0], pairs[:, 1] + offset, [segment[t] for t in pairs[:, 1]]
        fuzzy = re.compile("".join("." if c == "X" else f"(?:{re.escape(c)}|X)" for c in segment))
        for chain in ordered:
            m = fuzzy.search(chain.sequence)
            if m:
                return chain, pairs[:, 0], pairs[:, 1] + m.start(), [segment[t] for t in pairs[:, 1]]
        chain = self._resolve_chain(tpl, chain_id)
        try:
            aln = align_sequences(segment, chain.sequence)
        except ValueError as e:
            raise _Reject("alignment_failure", str(e)) from None
        same = sum(segment[i] == chain.sequence[j] for i, j in aln)
        shorter = min(len(segment), len(chain.sequence))
        if not aln or same / shorter < self.min_realign_identity:
            raise _Reject("alignment_failure", f"hit sequence matches {tpl.pdb_id}_{chain.chain_id} SEQRES at "
                                               f"{same}/{shorter} positions (< {self.min_realign_identity:.0%})")
        old_to_new = dict(aln)
        keep = [k for k, t in enumerate(pairs[:, 1]) if int(t) in old_to_new]
        if not keep:
            raise _Reject("alignment_failure", "no hit residue survives the realignment to the SEQRES")
        q_idx = pairs[keep, 0]
        t_idx = np.array([old_to_new[int(pairs[k, 1])] for k in keep], np.int64)
        warnings.append(f"{hit.short_name}: hit sequence not found in {tpl.pdb_id}_{chain.chain_id} SEQRES; realigned")
        return chain, q_idx, t_idx, [chain.sequence[t] for t in t_idx]

    @staticmethod
    def _resolve_chain(tpl: _Template, chain_id: str) -> _Chain:
        chain = tpl.chains.get(chain_id)
        if chain is None:
            if len(tpl.chains) != 1:
                raise _Reject("chain_not_found", f"no protein chain {chain_id} in {tpl.pdb_id} "
                                                 f"(chains {sorted(tpl.chains)[:10]})")
            chain = next(iter(tpl.chains.values()))
        return chain

    def _locate_by_coordinates(self, query: str, tpl: _Template, chain_id: str, pairs: np.ndarray | None,
                               hit: TemplateHit):
        """m8 hits without the template row: trust the CIGAR offsets if the SEQRES agrees, else align."""
        chain = self._resolve_chain(tpl, chain_id)
        seqres = chain.sequence
        if pairs is not None and hit.hit_end <= len(seqres):
            q_idx, t_idx = pairs[:, 0], pairs[:, 1] + hit.hit_start
            ident = float(np.mean([query[q] == seqres[t] for q, t in zip(q_idx, t_idx)]))
            n_cols = len(hit.indices_query)
            ident_cols = ident * len(q_idx) / max(n_cols, 1)  # identical / alignment columns (MMseqs2 fident)
            if hit.identity is None or abs(ident_cols - hit.identity) <= 0.1:
                return chain, q_idx, t_idx
        q_seg = query[hit.query_start:hit.query_end]
        windows = [(hit.hit_start, hit.hit_end)] if hit.hit_end <= len(seqres) else []
        windows.append((0, len(seqres)))
        best = None
        for t0, t1 in windows:
            try:
                aln = align_sequences(q_seg, seqres[t0:t1])
            except ValueError as e:
                raise _Reject("alignment_failure", str(e)) from None
            if not aln:
                continue
            same = sum(q_seg[i] == seqres[t0 + j] for i, j in aln)
            ident = same / min(len(q_seg), t1 - t0)
            if best is None or ident > best[0]:
                best = (ident, aln, t0)
            if hit.identity is None or ident >= hit.identity - 0.1:
                break
        if best is None or best[0] < self.min_realign_identity:
            raise _Reject("alignment_failure", f"query segment {hit.query_start + 1}-{hit.query_end} does not align "
                                               f"to {tpl.pdb_id}_{chain.chain_id} SEQRES")
        _, aln, t0 = best
        q_idx = np.array([hit.query_start + i for i, _ in aln], np.int64)
        t_idx = np.array([t0 + j for _, j in aln], np.int64)
        return chain, q_idx, t_idx


# --------------------------------------------------------------------------------- hit discovery

def _read_text(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as f:
            return f.read()
    return path.read_text()


def load_hits_file(path: str | Path, query_sequence: str, **kwargs) -> list[TemplateHit]:
    """Parse one hit file by its name: ``*.hhr``, ``*.sto`` (hmmsearch) or ``*.m8`` (optionally ``.gz``)."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    text = _read_text(path)
    if name.endswith(".hhr"):
        return parse_hhr(text, source=str(path))
    if name.endswith(".sto"):
        return parse_hmmsearch_sto(text, query_sequence, source=str(path))
    if name.endswith(".m8"):
        return parse_m8(text, query_sequence, source=str(path), **kwargs)
    raise TemplateError(f"{path}: unknown template-hit format (expected .hhr, .sto or .m8)")


def load_chain_hits(chain_dir: str | Path, query_sequence: str) -> list[TemplateHit]:
    """Template hits for one chain's alignment directory (AF2/OpenFold layout).

    First format present wins: ``*.hhr`` (pdb70_hits.hhr / hhsearch_output.hhr), then
    ``hmm_output.sto`` (never the MSA ``*_hits.sto`` files), then ``*.m8``. No file -> [].
    """
    d = Path(chain_dir)
    groups = [sorted(list(d.glob("*.hhr")) + list(d.glob("*.hhr.gz"))),
              sorted(list(d.glob("hmm_output.sto")) + list(d.glob("hmm_output.sto.gz"))),
              sorted(list(d.glob("*.m8")) + list(d.glob("*.m8.gz")))]
    for files in groups:
        if files:
            hits: list[TemplateHit] = []
            for f in files:
                hits += load_hits_file(f, query_sequence)
            return hits
    return []
