"""Template-hit parsers: HHsearch ``.hhr``, BLAST/MMseqs2/Foldseek tabular ``.m8`` and hmmsearch Stockholm.

Every parser returns :class:`TemplateHit` records with one shared convention, so the featurizer
(:mod:`foldforge.data.templates`) never needs to know which tool produced a hit:

- ``query`` / ``hit_sequence`` are the two rows of the pairwise alignment, column for column ('-' = gap,
  upper case). For an m8 line without alignment columns both are empty and ``has_alignment`` is False;
  the featurizer then aligns ``query[query_start:query_end]`` to the template chain itself.
- ``indices_query`` / ``indices_hit`` give, per column, the 0-based residue index in the searched query
  sequence / in the template's database sequence (-1 for a gap). For hhr files the template index comes
  from the pdb70 sequence, which can differ from the mmCIF SEQRES; the featurizer checks that (AF2
  ``templates.py``: exact substring -> fuzzy 'X' match -> realignment).
- ``query_start``/``query_end`` and ``hit_start``/``hit_end`` are 0-based half-open residue ranges.

Malformed input raises :class:`TemplateError` (a ``ValueError``) naming the source and the line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence


class TemplateError(ValueError):
    """A template-hit file that cannot be parsed; the message names the file and line."""


# PDB id (4 alphanumerics) + optional decoration ("-assembly1", ".cif.gz") + '_' + author chain id.
_NAME_RE = re.compile(r"^([A-Za-z0-9]{4})(?:[-.][^_\s]*)?_([A-Za-z0-9.]+)")


def split_pdb_chain(name: str) -> tuple[str, str] | None:
    """``"1HF9_B ATPASE ..."`` -> ``("1hf9", "B")``; None when the name is not PDBID_CHAIN."""
    m = _NAME_RE.match(name.strip())
    if m is None:
        return None
    return m.group(1).lower(), m.group(2)


@dataclass
class TemplateHit:
    index: int                       # rank of the hit in its file (hhr "No N"; m8/sto: 1-based line/row)
    name: str                        # "1HF9_B ATPASE INHIBITOR ..." (hhr) / "2DC3_A" (m8) / "1psm_A" (sto)
    aligned_cols: int
    sum_probs: float | None          # HHsearch Sum_probs; None for m8/sto hits
    query: str                       # aligned query row ('' when has_alignment is False)
    hit_sequence: str                # aligned template row ('' when unknown)
    indices_query: list[int]         # per column, 0-based query residue or -1
    indices_hit: list[int]           # per column, 0-based template (database sequence) residue or -1
    e_value: float | None = None
    probability: float | None = None  # HHsearch Probab (percent)
    score: float | None = None        # HHsearch Score / m8 bit score
    identity: float | None = None     # fraction identical (hhr Identities, m8 fident/pident)
    query_start: int = 0              # 0-based half-open ranges of the aligned segment
    query_end: int = 0
    hit_start: int = 0
    hit_end: int = 0
    hit_length: int | None = None     # full template length when the file states it
    source: str = ""
    line: int = 0                     # line in ``source`` where the hit starts
    query_name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def has_alignment(self) -> bool:
        """True when the column-wise residue correspondence is known (hhr, sto, m8 with CIGAR/aln)."""
        return bool(self.indices_query)

    @property
    def pdb_chain(self) -> tuple[str, str] | None:
        return split_pdb_chain(self.name)

    @property
    def pdb_id(self) -> str | None:
        pc = self.pdb_chain
        return pc[0] if pc else None

    @property
    def chain_id(self) -> str | None:
        pc = self.pdb_chain
        return pc[1] if pc else None

    @property
    def short_name(self) -> str:
        """``pdbid_CHAIN`` (or the first word of the name) for logs and rejection lists."""
        pc = self.pdb_chain
        return f"{pc[0]}_{pc[1]}" if pc else (self.name.split() or [""])[0]

    @property
    def template_segment(self) -> str | None:
        """The template residues covered by the alignment (gaps removed), None when unknown."""
        if not self.hit_sequence:
            return None
        return self.hit_sequence.replace("-", "")


def _where(source: str) -> str:
    return source or "<template hits>"


def _fail(source: str, line_no: int, msg: str) -> TemplateError:
    return TemplateError(f"{_where(source)}:{line_no}: {msg}")


def _indices(aligned: str, start: int) -> list[int]:
    out, k = [], start
    for ch in aligned:
        if ch == "-":
            out.append(-1)
        else:
            out.append(k)
            k += 1
    return out


def _span(indices: Sequence[int]) -> tuple[int, int]:
    res = [i for i in indices if i >= 0]
    return (min(res), max(res) + 1) if res else (0, 0)


# ----------------------------------------------------------------------------------------------- hhr

_SUMMARY_KEYS = {"Probab": "probability", "E-value": "e_value", "Score": "score", "Aligned_cols": "aligned_cols",
                 "Identities": "identity", "Sum_probs": "sum_probs", "Similarity": "similarity",
                 "Template_Neff": "template_neff"}
_SKIP_ROWS = ("Consensus", "ss_pred", "ss_dssp", "ss_conf", "ss_cons")
_ALN_CHARS = re.compile(r"^[A-Za-z\-.~]+$")


def _parse_summary(line: str, source: str, line_no: int) -> dict:
    values = {}
    for key, raw in re.findall(r"([A-Za-z_\-]+)=(\S+)", line):
        if key not in _SUMMARY_KEYS:
            continue
        try:
            values[_SUMMARY_KEYS[key]] = float(raw.rstrip("%"))
        except ValueError:
            raise _fail(source, line_no, f"bad value {key}={raw!r} in hit summary line") from None
    for required in ("probability", "aligned_cols"):
        if required not in values:
            raise _fail(source, line_no, f"hit summary line lacks {required} ({line.strip()[:80]!r})")
    if "identity" in values:
        values["identity"] /= 100.0
    return values


def _parse_aln_row(line: str, source: str, line_no: int) -> tuple[str, int, str, int, int | None]:
    """``Q name  start SEQ  end (len)`` -> (name, start(1-based), seq, end, length)."""
    parts = line.split()
    length = None
    if len(parts) >= 6 and parts[-1].startswith("(") and parts[-1].endswith(")"):
        try:
            length = int(parts[-1][1:-1])
        except ValueError:
            raise _fail(source, line_no, f"bad sequence length {parts[-1]!r}") from None
        parts = parts[:-1]
    if len(parts) < 5:
        raise _fail(source, line_no, f"cannot parse alignment row {line.strip()[:80]!r}")
    name, start, seq, end = parts[1], parts[-3], parts[-2], parts[-1]
    if not (start.isdigit() and end.isdigit()) or not _ALN_CHARS.match(seq):
        raise _fail(source, line_no, f"cannot parse alignment row {line.strip()[:80]!r}")
    seq = seq.upper().replace(".", "-").replace("~", "-")
    start_i, end_i = int(start), int(end)
    n_res = len(seq) - seq.count("-")
    if end_i - start_i + 1 != n_res:
        raise _fail(source, line_no, f"residue range {start_i}-{end_i} does not match the {n_res} residues of the row")
    return name, start_i, seq, end_i, length


def _is_skipped_row(line: str) -> bool:
    parts = line.split(maxsplit=2)
    return len(parts) < 2 or parts[1].startswith(_SKIP_ROWS)


def parse_hhr(text: str, *, source: str = "") -> list[TemplateHit]:
    """Parse HHsearch/HHblits ``.hhr`` output (all hits, alignments spread over several blocks).

    Follows AF2 ``parsers.parse_hhr``: the query row is the ``Q <name>`` line that is not a
    Consensus/ss_* row, the template row likewise; indices are 0-based. Empty text -> [].
    """
    lines = text.splitlines()
    hits: list[TemplateHit] = []
    i, n = 0, len(lines)
    while i < n and not lines[i].startswith("No "):
        i += 1
    while i < n:
        header_no = i + 1
        head = lines[i].split()
        if len(head) != 2 or not head[1].isdigit():
            raise _fail(source, header_no, f"expected 'No <n>' hit header, got {lines[i].strip()[:80]!r}")
        j = i + 1
        while j < n and not lines[j].startswith("No "):
            j += 1
        hits.append(_parse_hhr_block(lines[i:j], int(head[1]), header_no, source))
        i = j
    return hits


def _parse_hhr_block(block: list[str], number: int, first_line: int, source: str) -> TemplateHit:
    if len(block) < 3 or not block[1].startswith(">"):
        raise _fail(source, first_line + 1, f"hit {number}: expected '>name description' line")
    name = block[1][1:].strip()
    if not name:
        raise _fail(source, first_line + 1, f"hit {number}: empty hit name")
    summary = _parse_summary(block[2], source, first_line + 2)
    query = hit = ""
    iq: list[int] = []
    ih: list[int] = []
    q_len = t_len = None
    pending_q: int | None = None  # length of the last query chunk still waiting for its template chunk
    for k, line in enumerate(block[3:], start=first_line + 3):
        if line.startswith("Q ") and not _is_skipped_row(line):
            if pending_q is not None:
                raise _fail(source, k, f"hit {number}: query row without a template row before it")
            _, start, seq, _, q_len = _parse_aln_row(line, source, k)
            query += seq
            iq += _indices(seq, start - 1)
            pending_q = len(seq)
        elif line.startswith("T ") and not _is_skipped_row(line):
            if pending_q is None:
                raise _fail(source, k, f"hit {number}: template row without a query row")
            _, start, seq, _, t_len = _parse_aln_row(line, source, k)
            if len(seq) != pending_q:
                raise _fail(source, k, f"hit {number}: template row has {len(seq)} columns, query row {pending_q}")
            hit += seq
            ih += _indices(seq, start - 1)
            pending_q = None
    if pending_q is not None:
        raise _fail(source, first_line + len(block) - 1, f"hit {number}: alignment ends with an unpaired query row")
    if not query:
        raise _fail(source, first_line, f"hit {number}: no alignment rows")
    qs, qe = _span(iq)
    ts, te = _span(ih)
    return TemplateHit(
        index=number, name=name, aligned_cols=int(summary["aligned_cols"]), sum_probs=summary.get("sum_probs"),
        query=query, hit_sequence=hit, indices_query=iq, indices_hit=ih, e_value=summary.get("e_value"),
        probability=summary.get("probability"), score=summary.get("score"), identity=summary.get("identity"),
        query_start=qs, query_end=qe, hit_start=ts, hit_end=te, hit_length=t_len, source=source, line=first_line,
        extra={"template_neff": summary.get("template_neff"), "query_length": q_len},
    )


# ------------------------------------------------------------------------------------------------ m8

# BLAST outfmt 6 / MMseqs2 / Foldseek default columns; qstart.. are 1-based inclusive.
M8_DEFAULT_COLUMNS = ("query", "target", "fident", "alnlen", "mismatch", "gapopen",
                      "qstart", "qend", "tstart", "tend", "evalue", "bits")
_CIGAR_RE = re.compile(r"^(?:\d+[MIDX=])+$")
_CIGAR_OP = re.compile(r"(\d+)([MIDX=])")
_ALIASES = {"qseqid": "query", "sseqid": "target", "pident": "fident", "length": "alnlen", "sstart": "tstart",
            "send": "tend", "bitscore": "bits", "qaln": "qaln", "taln": "taln", "cigar": "cigar"}


def _cigar_columns(cigar: str, qs: int, ts: int) -> tuple[list[int], list[int], int, int]:
    """MMseqs2 CIGAR (M: both, I: query only, D: template only) -> per-column indices and consumed counts."""
    iq: list[int] = []
    it: list[int] = []
    q, t = qs, ts
    for count, op in _CIGAR_OP.findall(cigar):
        c = int(count)
        if op in "MX=":
            iq += range(q, q + c)
            it += range(t, t + c)
            q += c
            t += c
        elif op == "I":
            iq += range(q, q + c)
            it += [-1] * c
            q += c
        else:  # D
            iq += [-1] * c
            it += range(t, t + c)
            t += c
    return iq, it, q - qs, t - ts


def parse_m8(text: str, query_sequence: str, *, source: str = "", query_id: str | None = None,
             columns: Sequence[str] | None = None,
             target_sequences: Mapping[str, str] | None = None) -> list[TemplateHit]:
    """Parse BLAST-tabular / MMseqs2 / Foldseek ``.m8`` hits against ``query_sequence``.

    Columns are the 12 BLAST/MMseqs2 defaults, optionally followed by a CIGAR string (13 columns, as
    MMseqs2 ``--format-output ...,cigar`` writes) or by the aligned query and template rows (14 columns,
    ``qaln,taln``); pass ``columns`` (MMseqs2 names) for any other layout. ``fident`` may be a fraction or a
    percentage (BLAST ``pident``); it is stored as a fraction. A file with several query ids needs
    ``query_id``. With only coordinates the hit has no alignment (``has_alignment`` False) and the
    featurizer aligns the query segment to the template chain. ``target_sequences`` (target name ->
    full database sequence) fills ``hit_sequence`` for CIGAR hits.
    """
    rows: list[tuple[int, list[str]]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        rows.append((line_no, line.rstrip("\n").split("\t") if "\t" in line else line.split()))
    if not rows:
        return []
    if columns is None:
        ncol = len(rows[0][1])
        if ncol == 12:
            columns = M8_DEFAULT_COLUMNS
        elif ncol == 13:
            columns = M8_DEFAULT_COLUMNS + ("cigar",)
        elif ncol == 14:
            columns = M8_DEFAULT_COLUMNS + ("qaln", "taln")
        else:
            raise _fail(source, rows[0][0], f"{ncol} columns; expected 12 (BLAST/MMseqs2), 13 (+cigar) or "
                                            f"14 (+qaln,taln) -- pass columns= for other layouts")
    columns = tuple(_ALIASES.get(c, c) for c in columns)
    missing = {"query", "target", "qstart", "qend", "tstart", "tend"} - set(columns)
    if missing:
        raise TemplateError(f"{_where(source)}: m8 columns lack {sorted(missing)}")
    col = {c: k for k, c in enumerate(columns)}

    query_ids = {r[col["query"]] for _, r in rows if len(r) > col["query"]}
    if query_id is None and len(query_ids) > 1:
        raise TemplateError(f"{_where(source)}: m8 file holds hits for {len(query_ids)} queries "
                            f"({sorted(query_ids)[:5]}); pass query_id=")
    percent = None
    if "fident" in col:
        try:
            percent = any(float(r[col["fident"]]) > 1.0 for _, r in rows if len(r) == len(columns))
        except ValueError:
            percent = None  # reported per line below
    L = len(query_sequence)
    hits: list[TemplateHit] = []
    for line_no, r in rows:
        if len(r) != len(columns):
            raise _fail(source, line_no, f"{len(r)} columns, expected {len(columns)}")
        if query_id is not None and r[col["query"]] != query_id:
            continue
        try:
            qs, qe, ts, te = (int(r[col[c]]) for c in ("qstart", "qend", "tstart", "tend"))
            e_value = float(r[col["evalue"]]) if "evalue" in col else None
            bits = float(r[col["bits"]]) if "bits" in col else None
            ident = float(r[col["fident"]]) if "fident" in col else None
            alnlen = int(r[col["alnlen"]]) if "alnlen" in col else None
        except ValueError as e:
            raise _fail(source, line_no, f"non-numeric field ({e})") from None
        if ident is not None and percent:
            ident /= 100.0
        if not (1 <= qs <= qe and 1 <= ts <= te):
            raise _fail(source, line_no, f"bad coordinates qstart={qs} qend={qe} tstart={ts} tend={te}")
        if qe > L:
            raise _fail(source, line_no, f"qend={qe} beyond the query length {L} (wrong query sequence?)")
        target = r[col["target"]]
        q_aln = t_aln = ""
        iq: list[int] = []
        it: list[int] = []
        if "cigar" in col and r[col["cigar"]] not in ("", "*", "-"):
            cigar = r[col["cigar"]]
            if not _CIGAR_RE.match(cigar):
                raise _fail(source, line_no, f"bad CIGAR {cigar!r}")
            iq, it, nq, nt = _cigar_columns(cigar, qs - 1, ts - 1)
            if nq != qe - qs + 1 or nt != te - ts + 1:
                raise _fail(source, line_no, f"CIGAR {cigar} covers {nq} query / {nt} template residues, "
                                             f"coordinates {qe - qs + 1} / {te - ts + 1}")
            q_aln = "".join(query_sequence[i] if i >= 0 else "-" for i in iq)
            tseq = (target_sequences or {}).get(target)
            if tseq is not None:
                if te > len(tseq):
                    raise _fail(source, line_no, f"tend={te} beyond the {len(tseq)} residues given for {target}")
                t_aln = "".join(tseq[i] if i >= 0 else "-" for i in it)
        elif "qaln" in col and "taln" in col:
            q_aln, t_aln = r[col["qaln"]].upper(), r[col["taln"]].upper()
            if len(q_aln) != len(t_aln) or not _ALN_CHARS.match(q_aln + t_aln):
                raise _fail(source, line_no, "qaln/taln rows differ in length or hold non-residue characters")
            iq, it = _indices(q_aln, qs - 1), _indices(t_aln, ts - 1)
            if _span(iq) != (qs - 1, qe) or _span(it) != (ts - 1, te):
                raise _fail(source, line_no, "qaln/taln residue counts do not match the coordinates")
            if q_aln.replace("-", "") != query_sequence[qs - 1:qe].upper():
                raise _fail(source, line_no, "qaln is not the query segment qstart..qend (wrong query sequence?)")
        aligned = sum(1 for a, b in zip(iq, it) if a >= 0 and b >= 0) if iq else min(qe - qs, te - ts) + 1
        hits.append(TemplateHit(
            index=len(hits) + 1, name=target, aligned_cols=aligned, sum_probs=None, query=q_aln,
            hit_sequence=t_aln, indices_query=iq, indices_hit=it, e_value=e_value, score=bits, identity=ident,
            query_start=qs - 1, query_end=qe, hit_start=ts - 1, hit_end=te, source=source, line=line_no,
            query_name=r[col["query"]], extra={"alnlen": alnlen},
        ))
    return hits


# ------------------------------------------------------------------------------------- hmmsearch sto

_HMMSEARCH_DESC = re.compile(r"^([A-Za-z0-9]+)_([^/\s]+)(?:/(\d+)-(\d+))?$")


def _stockholm_rows(text: str, source: str) -> tuple[dict[str, str], dict[str, int], dict[str, str], str | None]:
    seqs: dict[str, str] = {}
    first_line: dict[str, int] = {}
    desc: dict[str, str] = {}
    rf_parts: list[str] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("//"):
            continue
        if line.startswith("#=GS"):
            parts = line.split(maxsplit=3)
            if len(parts) >= 3 and parts[2] == "DE":
                desc[parts[1]] = parts[3] if len(parts) == 4 else ""
            continue
        if line.startswith("#=GC RF"):
            rf_parts.append(line.split(maxsplit=2)[2] if len(line.split(maxsplit=2)) == 3 else "")
            continue
        if line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise _fail(source, line_no, f"expected '<name> <aligned sequence>', got {line.strip()[:80]!r}")
        name, row = parts
        if name not in seqs:
            seqs[name] = ""
            first_line[name] = line_no
        seqs[name] += row
    return seqs, first_line, desc, ("".join(rf_parts) if rf_parts else None)


def parse_hmmsearch_sto(text: str, query_sequence: str, *, source: str = "") -> list[TemplateHit]:
    """Parse hmmsearch ``-A`` Stockholm output (AF2 ``hmm_output.sto``) into hits against the query.

    The HMM was built from the query MSA, so its match columns (``#=GC RF`` 'x', or upper case / '-'
    when there is no RF line) are the query residues in order; insert columns are template residues
    aligned to a query gap. Rows whose description lacks ``mol:protein`` (pdb_seqres DNA/RNA) are
    skipped, as in AF2.
    """
    seqs, first_line, desc, rf = _stockholm_rows(text, source)
    if not seqs:
        return []
    L = len(query_sequence)
    hits: list[TemplateHit] = []
    for rank, (row_name, row) in enumerate(seqs.items(), start=1):
        line_no = first_line[row_name]
        if "mol:protein" not in desc.get(row_name, "mol:protein"):
            continue
        if rf is not None and len(rf) != len(row):
            raise _fail(source, line_no, f"row {row_name} has {len(row)} columns, the RF line {len(rf)}")
        m = _HMMSEARCH_DESC.match(row_name)
        if m is None:
            raise _fail(source, line_no, f"row name {row_name!r} is not PDBID_CHAIN[/START-END]")
        start = int(m.group(3)) if m.group(3) else 1
        q_aln, t_aln, iq, it = [], [], [], []
        q_k, t_k = 0, start - 1
        for c, ch in enumerate(row):
            match_col = (rf[c] not in ".-") if rf is not None else (ch.isupper() or ch == "-")
            if match_col:
                if q_k >= L:
                    raise _fail(source, line_no, f"more match columns than the {L} query residues")
                q_aln.append(query_sequence[q_k])
                iq.append(q_k)
                q_k += 1
                if ch in "-.":
                    t_aln.append("-")
                    it.append(-1)
                else:
                    t_aln.append(ch.upper())
                    it.append(t_k)
                    t_k += 1
            elif ch not in "-.":  # insert column: template residue against a query gap
                q_aln.append("-")
                iq.append(-1)
                t_aln.append(ch.upper())
                it.append(t_k)
                t_k += 1
        if q_k != L:
            raise _fail(source, line_no, f"{q_k} match columns but the query has {L} residues")
        end = int(m.group(4)) if m.group(4) else t_k
        if t_k != end:
            raise _fail(source, line_no, f"row {row_name} holds {t_k - start + 1} residues, its range {start}-{end}")
        length = re.search(r"length:(\d+)", desc.get(row_name, ""))
        ts, te = _span(it)
        qs, qe = _span([a for a, b in zip(iq, it) if b >= 0] or [-1])
        hits.append(TemplateHit(
            index=rank, name=f"{m.group(1)}_{m.group(2)}", sum_probs=None,
            aligned_cols=sum(1 for a, b in zip(iq, it) if a >= 0 and b >= 0),
            query="".join(q_aln), hit_sequence="".join(t_aln), indices_query=iq, indices_hit=it,
            query_start=qs, query_end=qe, hit_start=ts, hit_end=te,
            hit_length=int(length.group(1)) if length else None, source=source, line=line_no,
            extra={"description": desc.get(row_name, "")},
        ))
    return hits
