"""MSA parsing and merging (AF2 Suppl. 1.2.2-1.2.3).

Parses the alignment files the AF2 data pipeline writes (A3M from HHblits, Stockholm from jackhmmer)
into integer arrays, and merges a chain's alignments into one deduplicated MSA the way AF2's
``make_msa_features`` does.

Conventions (shared with the record schema in docs/design.md):

* ``aatype`` is int8 ``[N, L]`` in the AF2 residue order (``residue_constants.restypes``), X = 20,
  gap = 21. Ambiguity codes map as in AF2 (B->D, Z->E, U->C, J/O->X).
* ``deletions`` is uint16 ``[N, L]``: the number of residues the aligned sequence has between
  query column ``j - 1`` and query column ``j`` (AF2's ``deletion_matrix_int``), saturating at 65535.
  Insertions after the last query column are dropped, as in AF2.
* Row 0 is the query.

A3M semantics (AF2 ``parsers.parse_a3m``): upper-case letters and '-' occupy query columns,
lower-case letters are insertions (counted into the deletion count of the next query column, then
dropped). '.' (gap in an insert column, only in non-HHblits A3M) is ignored.

Stockholm semantics (AF2 ``parsers.parse_stockholm``): the first sequence is the query; every column
where the query has a gap is removed and each residue of another sequence in such a column counts as
one deletion at the next kept column.

All parsing is done on bytes with numpy lookup tables; no per-character Python loops.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from foldforge.data.residue_constants import GAP_ID, LETTER_TO_AATYPE_LUT

__all__ = [
    "MSA",
    "MSAError",
    "AF2_MONOMER_MSA_FILES",
    "parse_a3m",
    "parse_stockholm",
    "read_msa_file",
    "merge_msas",
    "find_chain_msa_files",
    "load_chain_msas",
]

_DELETION_MAX = np.iinfo(np.uint16).max


class MSAError(ValueError):
    """A malformed or inconsistent alignment file (the message names the file)."""


# --------------------------------------------------------------------------------------------------
# Data class
# --------------------------------------------------------------------------------------------------


@dataclass
class MSA:
    """One multiple sequence alignment against a query of length ``L`` (row 0 is the query)."""

    aatype: np.ndarray  # int8 [N, L], AF2 order, X = 20, gap = 21
    deletions: np.ndarray  # uint16 [N, L], saturating
    descriptions: list[str] = field(default_factory=list)
    source: str = "<string>"  # file the rows came from (for error messages); "+"-joined after merge

    def __post_init__(self) -> None:
        self.aatype = np.ascontiguousarray(self.aatype, dtype=np.int8)
        self.deletions = np.ascontiguousarray(self.deletions, dtype=np.uint16)
        if self.aatype.ndim != 2 or self.aatype.shape != self.deletions.shape:
            raise MSAError(
                f"{self.source}: aatype {self.aatype.shape} and deletions {self.deletions.shape} "
                "must be 2-D arrays of the same shape"
            )
        if len(self.descriptions) != self.aatype.shape[0]:
            raise MSAError(
                f"{self.source}: {len(self.descriptions)} descriptions for {self.aatype.shape[0]} rows"
            )

    @property
    def depth(self) -> int:
        """Number of rows N (query included)."""
        return int(self.aatype.shape[0])

    @property
    def length(self) -> int:
        """Query length L."""
        return int(self.aatype.shape[1])

    @property
    def query(self) -> np.ndarray:
        """The query row (int8 [L])."""
        return self.aatype[0]

    def __len__(self) -> int:
        return self.depth

    def truncate(self, max_depth: int | None) -> "MSA":
        """The first ``max_depth`` rows (AF2 ``Msa.truncate``); ``self`` if already short enough."""
        if max_depth is None or max_depth >= self.depth:
            return self
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1 (the query row), got {max_depth}")
        return MSA(self.aatype[:max_depth], self.deletions[:max_depth],
                   self.descriptions[:max_depth], self.source)

    def take(self, rows: np.ndarray | Sequence[int]) -> "MSA":
        rows = np.asarray(rows, dtype=np.int64)
        return MSA(self.aatype[rows], self.deletions[rows],
                   [self.descriptions[i] for i in rows.tolist()], self.source)


# --------------------------------------------------------------------------------------------------
# Byte classification tables
# --------------------------------------------------------------------------------------------------

_ALIGNED, _INSERT, _SKIP, _INVALID = 0, 1, 2, 3


def _a3m_class_lut() -> np.ndarray:
    lut = np.full(256, _INVALID, dtype=np.uint8)
    lut[ord("A"): ord("Z") + 1] = _ALIGNED
    lut[ord("-")] = _ALIGNED
    lut[ord("a"): ord("z") + 1] = _INSERT
    for c in b". \t\r\n\v\f\x00":  # '.', whitespace, NUL separators some tools write
        lut[c] = _SKIP
    return lut


_A3M_CLASS = _a3m_class_lut()

# Stockholm: letters (either case) are residues, '-' and '.' are gaps.
_STO_VALID = np.zeros(256, dtype=bool)
_STO_VALID[ord("A"): ord("Z") + 1] = True
_STO_VALID[ord("a"): ord("z") + 1] = True
_STO_VALID[ord("-")] = True
_STO_VALID[ord(".")] = True
_STO_GAP = np.zeros(256, dtype=bool)
_STO_GAP[ord("-")] = True
_STO_GAP[ord(".")] = True
# Residue LUT that also accepts lower case and '.' (Stockholm kept columns).
_STO_AATYPE = LETTER_TO_AATYPE_LUT.copy()
_STO_AATYPE[ord("a"): ord("z") + 1] = LETTER_TO_AATYPE_LUT[ord("A"): ord("Z") + 1]
_STO_AATYPE[ord(".")] = GAP_ID

_NEWLINE, _GT = ord("\n"), ord(">")


def _as_bytes(text: str | bytes) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8")
    return bytes(text)


def _decode_lines(lines: list[bytes]) -> list[str]:
    """Decode many short byte strings at once (one decode call instead of N)."""
    if not lines:
        return []
    return b"\n".join(lines).decode("utf-8", errors="replace").split("\n")


# --------------------------------------------------------------------------------------------------
# A3M
# --------------------------------------------------------------------------------------------------


def parse_a3m(text: str | bytes, *, source: str = "<a3m string>") -> MSA:
    """Parse an A3M alignment (first record = query) into an :class:`MSA`.

    Lines before the first '>' may only be blank or '#' comments (e.g. ColabFold's '#<len>\\t<card>'
    header). Descriptions are the header lines without '>' and trailing whitespace. Raises
    :class:`MSAError` naming ``source`` for an empty file, invalid characters, or a row whose number
    of query columns (upper-case letters and '-') differs from the query's.

    Vectorised over the whole file: one byte-class lookup, header lines found from the newline
    positions, no per-record Python work except decoding the descriptions.
    """
    data = _as_bytes(text)
    if not data.endswith(b"\n"):
        data += b"\n"
    buf = np.frombuffer(data, dtype=np.uint8)
    nbytes = buf.size
    newlines = np.flatnonzero(buf == _NEWLINE)
    line_starts = np.empty(newlines.size, dtype=np.int64)
    line_starts[0] = 0
    line_starts[1:] = newlines[:-1] + 1
    hs = line_starts[buf[line_starts] == _GT]  # header starts ('>')
    if hs.size == 0:
        if data.strip():
            raise MSAError(f"{source}: not an A3M file (no '>' header line)")
        raise MSAError(f"{source}: empty A3M file")
    first = int(hs[0])
    if first:
        for k, line in enumerate(data[:first].splitlines(), 1):
            stripped = line.strip()
            if stripped and not stripped.startswith(b"#"):
                raise MSAError(f"{source}: line {k}: text before the first '>' header: {stripped[:60]!r}")
    he = newlines[np.searchsorted(newlines, hs)]  # the newline ending each header line
    n = hs.size
    seq_start = he + 1  # row i's sequence bytes are [seq_start[i], hs[i + 1]) (or to the end)
    seq_end = np.empty(n, dtype=np.int64)
    seq_end[:-1] = hs[1:]
    seq_end[-1] = nbytes
    row_len = seq_end - seq_start

    # Split the file into header text and the sequence byte stream with one np.repeat mask over
    # 2n alternating regions: [prev row end, seq_start[i]) prefix/header, [seq_start[i], seq_end[i]) row.
    region_len = np.empty(2 * n, dtype=np.int64)
    region_len[0::2] = seq_start - np.concatenate(([0], seq_end[:-1]))
    region_len[1::2] = row_len
    is_seq = np.repeat(np.tile(np.array([False, True]), n), region_len)
    header_bytes = buf[first:][~is_seq[first:]].tobytes()  # b">h1\n>h2\n...>hN\n"
    descriptions = header_bytes[1:-1].decode("utf-8", errors="replace").split("\n>")
    if any(ws + b"\n" in header_bytes for ws in (b" ", b"\t", b"\r", b"\v", b"\f", b"\x00")):
        descriptions = [d.rstrip() for d in descriptions]  # AF2 strips header lines

    stream = buf[is_seq]  # all sequence bytes, rows back to back
    del is_seq
    row_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(row_len, out=row_off[1:])
    cls = _A3M_CLASS[stream]  # whitespace and '.' are _SKIP

    other = np.flatnonzero(cls != _ALIGNED)  # insertions, whitespace, '.', invalid bytes
    if other.size:
        bad_bytes = other[cls[other] == _INVALID]
        if bad_bytes.size:
            p = int(bad_bytes[0])
            row = int(np.searchsorted(row_off, p, side="right")) - 1
            raise MSAError(
                f"{source}: row {row + 1} ({descriptions[row][:80]!r}): invalid character "
                f"{chr(stream[p])!r} ({bad_bytes.size} invalid characters in the file)"
            )
    counts = row_len - np.diff(np.searchsorted(other, row_off))
    length = int(counts[0])
    if length == 0:
        raise MSAError(f"{source}: the query (row 1, {descriptions[0][:80]!r}) has no aligned residues")
    bad = np.flatnonzero(counts != length)
    if bad.size:
        r = int(bad[0])
        raise MSAError(
            f"{source}: row {r + 1} ({descriptions[r][:80]!r}) has {int(counts[r])} aligned columns "
            f"after removing insertions, but the query has {length} "
            f"({bad.size} of {n} rows differ; truncated or corrupt file?)"
        )
    aatype = LETTER_TO_AATYPE_LUT[stream[cls == _ALIGNED]].reshape(n, length)

    deletions = np.zeros(n * length, dtype=np.uint16)
    ins_k = np.flatnonzero(cls[other] == _INSERT)  # index among the non-aligned bytes
    if ins_k.size:
        # Flat [N*L] index of the aligned residue after each insertion = number of aligned bytes
        # before it = its stream position minus the number of non-aligned bytes before it.
        ins = other[ins_k]
        nxt = ins - ins_k
        row = np.searchsorted(row_off, ins, side="right") - 1
        nxt = nxt[nxt < (row + 1) * length]  # insertions after a row's last column are dropped (AF2)
        if nxt.size:
            run_start = np.flatnonzero(np.diff(nxt, prepend=-1))  # nxt is sorted
            run_len = np.diff(run_start, append=nxt.size)
            deletions[nxt[run_start]] = np.minimum(run_len, _DELETION_MAX)
    return MSA(aatype, deletions.reshape(n, length), descriptions, source)


# --------------------------------------------------------------------------------------------------
# Stockholm
# --------------------------------------------------------------------------------------------------


def parse_stockholm(text: str | bytes, *, source: str = "<stockholm string>") -> MSA:
    """Parse a (multi-block) Stockholm alignment; the first sequence is the query.

    Sequence lines are ``<name> <aligned sequence>``; a name seen again (a later block) continues its
    sequence. ``#=GF/#=GS/#=GR/#=GC`` markup and comments are skipped; parsing stops at the first
    ``//``. A file without ``//`` is treated as truncated. Columns where the query has a gap ('-' or
    '.') are removed and counted as deletions in the other rows (AF2 semantics). Descriptions are the
    sequence names (as in AF2, e.g. ``UniRef90_Q9H5Z4/4-78``).
    """
    data = _as_bytes(text)
    chunks: dict[bytes, list[bytes]] = {}
    terminated = False
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if line.startswith(b"//"):
            terminated = True
            break
        parts = line.split()
        if len(parts) != 2:
            raise MSAError(f"{source}: line {lineno}: expected '<name> <sequence>', got {line[:80]!r}")
        name, seq = parts
        lst = chunks.get(name)
        if lst is None:
            chunks[name] = [seq]
        else:
            lst.append(seq)
    if not chunks:
        raise MSAError(f"{source}: empty Stockholm alignment (no sequence lines)")
    if not terminated:
        raise MSAError(f"{source}: Stockholm alignment has no '//' terminator (truncated file?)")

    names = _decode_lines(list(chunks))
    seqs = [b"".join(v) for v in chunks.values()]
    n = len(seqs)
    width = len(seqs[0])
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=n)
    bad = np.flatnonzero(lens != width)
    if bad.size:
        r = int(bad[0])
        raise MSAError(
            f"{source}: row {r + 1} ({names[r]!r}) has {int(lens[r])} alignment columns, the query has "
            f"{width} ({bad.size} of {n} rows differ; truncated or corrupt file?)"
        )
    arr = np.frombuffer(b"".join(seqs), dtype=np.uint8).reshape(n, width)
    valid = _STO_VALID[arr]
    if not valid.all():
        r, c = (int(x) for x in np.argwhere(~valid)[0])
        raise MSAError(f"{source}: row {r + 1} ({names[r]!r}): invalid character {chr(arr[r, c])!r} "
                       f"in column {c + 1}")

    qgap = _STO_GAP[arr[0]]
    keep = np.flatnonzero(~qgap)
    if keep.size == 0:
        raise MSAError(f"{source}: the query ({names[0]!r}) has no residues (all columns are gaps)")
    aatype = _STO_AATYPE[arr[:, keep]]

    gap_cols = np.flatnonzero(qgap)
    if gap_cols.size:
        # Residues of each row in the query-gap columns, prefix-summed; the deletion count at kept
        # column j is the number of those residues between kept column j-1 and kept column j.
        resid = ~_STO_GAP[arr[:, gap_cols]]
        cs = np.zeros((n, gap_cols.size + 1), dtype=np.int32)
        np.cumsum(resid, axis=1, dtype=np.int32, out=cs[:, 1:])
        n_gap_before = np.searchsorted(gap_cols, keep)  # query-gap columns before each kept column
        at = cs[:, n_gap_before]
        dels = np.diff(at, axis=1, prepend=0)
        deletions = np.minimum(dels, _DELETION_MAX).astype(np.uint16)
    else:
        deletions = np.zeros(aatype.shape, dtype=np.uint16)
    return MSA(aatype, deletions, names, source)


def read_msa_file(path: str | os.PathLike, *, max_depth: int | None = None) -> MSA:
    """Parse an ``.a3m`` or ``.sto``/``.stockholm`` file, keeping at most ``max_depth`` rows."""
    path = Path(path)
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".a3m":
        msa = parse_a3m(data, source=str(path))
    elif suffix in (".sto", ".stockholm"):
        msa = parse_stockholm(data, source=str(path))
    else:
        raise MSAError(f"{path}: unknown MSA format (expected .a3m or .sto)")
    return msa.truncate(max_depth)


# --------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------


def merge_msas(msas: Sequence[MSA], *, max_depth: int | None = None,
               check_query: bool = True) -> MSA:
    """Concatenate MSAs in order, dropping rows whose aligned sequence repeats an earlier row.

    This is AF2's ``make_msa_features`` deduplication: the first occurrence of each aligned sequence
    (insertions removed) is kept, with its own deletion row; the query (row 0 of the first MSA) is
    therefore row 0 of the result. The result is cut at ``max_depth`` rows. With ``check_query`` the
    query rows of all inputs must be identical (MSAError naming the offending source otherwise).

    Rows are compared as aatype bytes, so two sequences that differ only in letters mapping to the
    same residue index (e.g. B/D, or X/J/O) count as duplicates; AF2 compares the letter strings.
    """
    if not msas:
        raise MSAError("merge_msas: no MSAs given")
    if max_depth is not None and max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    first = msas[0]
    length = first.length
    for m in msas:
        if m.depth == 0:
            raise MSAError(f"{m.source}: MSA has no rows")
        if m.length != length:
            raise MSAError(f"{m.source}: query length {m.length} differs from {length} ({first.source})")
        if check_query and not np.array_equal(m.aatype[0], first.aatype[0]):
            diff = np.flatnonzero(m.aatype[0] != first.aatype[0])
            raise MSAError(
                f"{m.source}: query row differs from the query of {first.source} at "
                f"{diff.size} position(s), first at residue {int(diff[0]) + 1}"
            )

    limit = max_depth if max_depth is not None else sum(m.depth for m in msas)
    seen: set[bytes] = set()
    picked: list[tuple[MSA, np.ndarray]] = []
    total = 0
    for m in msas:
        if total >= limit:
            break
        buf = m.aatype.tobytes()
        keys = [buf[i: i + length] for i in range(0, len(buf), length)]
        # First occurrence within this MSA: a dict built from the reversed rows keeps, for each key,
        # the smallest index (C speed, no Python loop body).
        first_idx = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1)))
        if seen:
            idx = [i for k, i in first_idx.items() if k not in seen]
        else:
            idx = list(first_idx.values())
        idx_arr = np.sort(np.asarray(idx, dtype=np.int64))[: limit - total]
        seen.update(keys[i] for i in idx_arr.tolist())
        picked.append((m, idx_arr))
        total += idx_arr.size

    aatype = np.concatenate([m.aatype[i] for m, i in picked], axis=0)
    deletions = np.concatenate([m.deletions[i] for m, i in picked], axis=0)
    descriptions = [m.descriptions[j] for m, i in picked for j in i.tolist()]
    source = "+".join(m.source for m in msas)
    return MSA(aatype, deletions, descriptions, source)


# --------------------------------------------------------------------------------------------------
# AF2-layout chain directories
# --------------------------------------------------------------------------------------------------

# AF2 monomer pipeline (alphafold/data/pipeline.py): make_msa_features((uniref90, bfd, mgnify)),
# uniref90 capped at uniref_max_hits = 10000 rows and mgnify at mgnify_max_hits = 501 rows (query
# included, before dedup); BFD/Uniclust (HHblits a3m, 'bfd_uniref_hits' in AF2 >= 2.3,
# 'bfd_uniclust_hits' before and in OpenFold) and small_bfd (reduced_dbs) are not capped.
# Each entry: (file stem, cap, extensions in order of preference).
AF2_MONOMER_MSA_FILES: tuple[tuple[str, int | None, tuple[str, ...]], ...] = (
    ("uniref90_hits", 10_000, (".sto", ".a3m")),
    ("bfd_uniclust_hits", None, (".a3m", ".sto")),
    ("bfd_uniref_hits", None, (".a3m", ".sto")),
    ("small_bfd_hits", None, (".sto", ".a3m")),
    ("mgnify_hits", 501, (".sto", ".a3m")),
)

# Not monomer MSAs: multimer pairing input and template-search hits.
_NOT_MONOMER_MSA_STEMS = frozenset({
    "uniprot_hits", "hmm_output", "pdb70_hits", "pdb_hits", "hmmsearch", "hhsearch_output",
    "template_hits",
})


def find_chain_msa_files(
    directory: str | os.PathLike,
    *,
    per_file_max: int | Mapping[str, int | None] | None = None,
) -> list[tuple[Path, int | None]]:
    """The MSA files of an AF2-layout chain directory in AF2 merge order, with each file's row cap.

    Known databases come first in AF2's order (uniref90, bfd, small_bfd, mgnify; for each the first
    existing extension of ``.sto``/``.a3m``), then every other ``*.a3m`` sorted by name. uniprot hits
    (multimer pairing only) and template hits are skipped. ``per_file_max``: an int caps every file
    (combined with the AF2 caps by taking the smaller); a mapping ``{stem: cap}`` replaces the cap of
    the named files (``None`` = uncapped).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MSAError(f"{directory}: not a directory")
    present = {p.name: p for p in directory.iterdir() if p.is_file()}

    def cap_for(stem: str, default: int | None) -> int | None:
        if isinstance(per_file_max, Mapping):
            return per_file_max.get(stem, default)
        if per_file_max is None:
            return default
        return per_file_max if default is None else min(default, per_file_max)

    out: list[tuple[Path, int | None]] = []
    used: set[str] = set()
    known_stems = {stem for stem, _, _ in AF2_MONOMER_MSA_FILES}
    for stem, default_cap, exts in AF2_MONOMER_MSA_FILES:
        for ext in exts:
            if stem + ext in present:
                out.append((present[stem + ext], cap_for(stem, default_cap)))
                break
        used.update(stem + ext for ext in exts)
    for name in sorted(present):
        p = present[name]
        if name in used or p.suffix.lower() != ".a3m":
            continue
        if p.stem in _NOT_MONOMER_MSA_STEMS or p.stem in known_stems:
            continue
        out.append((p, cap_for(p.stem, None)))
    return out


def load_chain_msas(
    directory: str | os.PathLike,
    *,
    max_depth: int | None = None,
    per_file_max: int | Mapping[str, int | None] | None = None,
) -> MSA:
    """Parse and merge the MSAs of an AF2-layout chain directory the way AF2 monomer does.

    Files and caps as in :func:`find_chain_msa_files`; each file is truncated to its cap, then all are
    merged with AF2 deduplication (:func:`merge_msas`) and cut at ``max_depth``. Raises MSAError if the
    directory has no MSA file or if a file's query row disagrees with the first file's (the message
    names the file).
    """
    files = find_chain_msa_files(directory, per_file_max=per_file_max)
    if not files:
        raise MSAError(f"{directory}: no MSA files (*.a3m / known *.sto) found")
    msas = [read_msa_file(path, max_depth=cap) for path, cap in files]
    return merge_msas(msas, max_depth=max_depth, check_query=True)
