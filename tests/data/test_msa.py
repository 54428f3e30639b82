"""Tests for foldforge.data.msa: A3M/Stockholm parsing, AF2 dedup merging, AF2-layout directories.

The parity test compares against ``expected_af2_feature_dict.pickle``, the raw feature dict that
AlphaFold2's own data pipeline produced from the query_73aa MSAs.
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from foldforge.data import residue_constants as rc
from foldforge.data.msa import (
    MSA,
    MSAError,
    find_chain_msa_files,
    load_chain_msas,
    merge_msas,
    parse_a3m,
    parse_stockholm,
    read_msa_file,
)

from tests.af2_reference import load_af2_feature_dict

from tests.paths import SHARED as DATA
AF2_DIR = DATA / "openfold_af2_testdata"
QUERY_73 = AF2_DIR / "query_73aa"
PER_CHAIN = AF2_DIR / "alignments_per_chain"
AF3PT = DATA / "af3pytorch_testdata"
PROTENIX = DATA / "protenix_af3_msa"

needs_data = pytest.mark.skipif(not AF2_DIR.is_dir(), reason=f"test data not found under {DATA}")

# AF2's raw `msa` feature uses residue_constants.HHBLITS_AA_TO_ID (alphabetical + X, gap).
HHBLITS_ORDER = "ACDEFGHIKLMNPQRSTVWYX-"
HHBLITS_TO_OURS = np.array([rc.HHBLITS_LETTER_TO_AATYPE[c] for c in HHBLITS_ORDER], dtype=np.int8)


def aa(seq: str) -> np.ndarray:
    return rc.sequence_to_aatype(seq)


# --------------------------------------------------------------------------------------------------
# Slow, obviously-correct references of the AF2 semantics (per character), used on small inputs.
# --------------------------------------------------------------------------------------------------


def ref_parse_a3m(text: str) -> tuple[list[str], list[list[int]], list[str]]:
    seqs, descs = [], []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(">"):
            descs.append(line[1:])
            seqs.append("")
        elif line and not line.startswith("#"):
            seqs[-1] += line
    aligned, dels = [], []
    for s in seqs:
        row, drow, count = "", [], 0
        for ch in s:
            if ch.islower():
                count += 1
            elif ch != ".":
                row += ch
                drow.append(count)
                count = 0
        aligned.append(row)
        dels.append(drow)
    return aligned, dels, descs


def ref_parse_stockholm(text: str) -> tuple[list[str], list[list[int]], list[str]]:
    name_to_seq: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("//"):
            break
        name, seq = line.split()
        name_to_seq[name] = name_to_seq.get(name, "") + seq
    seqs = list(name_to_seq.values())
    query = seqs[0]
    gap = "-."
    aligned, dels = [], []
    for s in seqs:
        kept = "".join(c for c, q in zip(s, query) if q not in gap)
        aligned.append(kept.upper().replace(".", "-"))
        drow, count = [], 0
        for c, q in zip(s, query):
            if q in gap:
                count += c not in gap
            else:
                drow.append(count)
                count = 0
        dels.append(drow)
    return aligned, dels, list(name_to_seq)


def assert_matches_reference(msa: MSA, ref: tuple[list[str], list[list[int]], list[str]]) -> None:
    aligned, dels, descs = ref
    assert msa.depth == len(aligned)
    np.testing.assert_array_equal(msa.aatype, np.stack([aa(s) for s in aligned]))
    np.testing.assert_array_equal(msa.deletions, np.array(dels, dtype=np.int64))
    assert msa.descriptions == descs


# --------------------------------------------------------------------------------------------------
# AF2 parity (query_73aa)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def af2_features() -> dict:
    return load_af2_feature_dict(QUERY_73 / "expected_af2_feature_dict.pickle")


@needs_data
def test_hhblits_mapping_matches_af2_query(af2_features):
    msa = af2_features["msa"]
    assert msa.min() >= 0 and msa.max() <= 21
    query = af2_features["sequence"][0].decode()
    np.testing.assert_array_equal(HHBLITS_TO_OURS[msa[0]], aa(query))


@needs_data
def test_af2_parity_query_73aa(af2_features):
    merged = load_chain_msas(QUERY_73)
    ref_msa = HHBLITS_TO_OURS[af2_features["msa"]]
    ref_del = af2_features["deletion_matrix_int"]
    assert merged.aatype.shape == ref_msa.shape == (1136, 73)
    np.testing.assert_array_equal(merged.aatype, ref_msa)
    np.testing.assert_array_equal(merged.deletions.astype(np.int64), ref_del)
    assert ref_del.max() > 0  # the deletion matrix is really exercised
    np.testing.assert_array_equal(af2_features["num_alignments"], np.full(73, merged.depth))
    assert merged.aatype.dtype == np.int8 and merged.deletions.dtype == np.uint16
    assert merged.descriptions[0] == "query"


@needs_data
def test_af2_parity_pins_database_order(af2_features):
    """Only AF2's order (uniref90, bfd, mgnify) reproduces the reference row order."""
    uniref = read_msa_file(QUERY_73 / "uniref90_hits.sto")
    bfd = read_msa_file(QUERY_73 / "bfd_uniclust_hits.a3m")
    mgnify = read_msa_file(QUERY_73 / "mgnify_hits.sto")
    ref_msa = HHBLITS_TO_OURS[af2_features["msa"]]
    assert np.array_equal(merge_msas([uniref, bfd, mgnify]).aatype, ref_msa)
    for order in ([bfd, uniref, mgnify], [uniref, mgnify, bfd]):
        merged = merge_msas(order)
        assert merged.depth == ref_msa.shape[0]  # same set of rows ...
        assert not np.array_equal(merged.aatype, ref_msa)  # ... in a different order


@needs_data
@pytest.mark.parametrize("name", ["uniref90_hits.sto", "mgnify_hits.sto", "bfd_uniclust_hits.a3m"])
def test_parsers_match_slow_reference_query_73aa(name):
    path = QUERY_73 / name
    text = path.read_text()
    ref = ref_parse_stockholm(text) if name.endswith(".sto") else ref_parse_a3m(text)
    assert_matches_reference(read_msa_file(path), ref)


@needs_data
@pytest.mark.parametrize("name", ["5kc1_A/uniref90_hits.sto", "5kc1_A/mgnify_hits.sto",
                                  "2crb_A/uniref90_hits.sto", "2crb_A/bfd_uniclust_hits.a3m"])
def test_parsers_match_slow_reference_per_chain(name):
    """5kc1 files are multi-block Stockholm; 2crb has many insertions."""
    path = PER_CHAIN / name
    text = path.read_text()
    ref = ref_parse_stockholm(text) if name.endswith(".sto") else ref_parse_a3m(text)
    assert_matches_reference(read_msa_file(path), ref)


# --------------------------------------------------------------------------------------------------
# Restricted unpickler
# --------------------------------------------------------------------------------------------------


def test_restricted_unpickler_rejects_foreign_globals(tmp_path):
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps({"f": os.system}))  # a reference to os.system, never called
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        load_af2_feature_dict(evil)
    ok = tmp_path / "ok.pickle"
    arrays = {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "s": np.array([b"x"], dtype=object),
              "f": np.float32(1.5)}
    ok.write_bytes(pickle.dumps(arrays, protocol=4))  # AF2 writes its feature dicts with protocol 4
    loaded = load_af2_feature_dict(ok)
    np.testing.assert_array_equal(loaded["a"], arrays["a"])
    assert loaded["s"][0] == b"x" and loaded["f"] == np.float32(1.5)


# --------------------------------------------------------------------------------------------------
# A3M
# --------------------------------------------------------------------------------------------------


def test_a3m_insertions_and_deletions():
    text = (
        ">query desc\n"
        "MKV-A\n"
        ">hit1 \n"
        "MabK-Vc.A\n"  # 2 insertions before K, 1 before A ('.' ignored)
        ">hit2\n"
        "xyM\n"
        "KVQAzz\n"  # multi-line; 2 leading insertions; trailing insertions dropped
    )
    msa = parse_a3m(text, source="t.a3m")
    np.testing.assert_array_equal(msa.aatype, np.stack([aa("MKV-A"), aa("MK-VA"), aa("MKVQA")]))
    np.testing.assert_array_equal(msa.deletions, [[0, 0, 0, 0, 0], [0, 2, 0, 0, 1], [2, 0, 0, 0, 0]])
    assert msa.descriptions == ["query desc", "hit1", "hit2"]
    assert msa.depth == len(msa) == 3 and msa.length == 5
    assert msa.aatype.dtype == np.int8 and msa.deletions.dtype == np.uint16
    # bytes input, CRLF line endings and a comment header give the same result
    crlf = ("#5\t1\r\n" + text.replace("\n", "\r\n")).encode()
    msa2 = parse_a3m(crlf)
    np.testing.assert_array_equal(msa2.aatype, msa.aatype)
    np.testing.assert_array_equal(msa2.deletions, msa.deletions)
    assert msa2.descriptions == msa.descriptions


def test_a3m_ambiguity_codes_map_like_af2():
    msa = parse_a3m(">q\nBZUJOX-A\n")
    assert msa.aatype[0].tolist() == [3, 6, 4, 20, 20, 20, 21, 0]  # B->D Z->E U->C J/O/X->X


def test_a3m_deletions_saturate():
    text = ">q\nMA\n>h\nM" + "a" * 70_000 + "A\n"
    msa = parse_a3m(text)
    assert msa.deletions[1].tolist() == [0, 65535]


def test_a3m_row_length_mismatch_names_file_and_row():
    text = ">query\nMKVLA\n>good\nMK-LA\n>bad_hit some text\nMKVLAQ\n"
    with pytest.raises(MSAError) as err:
        parse_a3m(text, source="/x/bfd_uniclust_hits.a3m")
    msg = str(err.value)
    assert "/x/bfd_uniclust_hits.a3m" in msg and "row 3" in msg and "bad_hit" in msg
    assert "6" in msg and "5" in msg
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("text", ["", "\n\n  \n", "#comment only\n"])
def test_a3m_empty(text):
    with pytest.raises(MSAError, match="empty.a3m"):
        parse_a3m(text, source="empty.a3m")


@pytest.mark.parametrize("text, match", [
    ("MKV\n>q\nMKV\n", "before the first"),  # sequence before any header
    (">q\nMK1V\n", "invalid character '1'"),
    (">q\n\n>h\nMKV\n", "no aligned residues"),  # empty query
    (">q\nMKV\n>h\n", "row 2"),  # truncated right after a header
])
def test_a3m_malformed(text, match):
    with pytest.raises(MSAError, match=match):
        parse_a3m(text, source="bad.a3m")


@needs_data
def test_a3m_truncated_real_file():
    data = (QUERY_73 / "bfd_uniclust_hits.a3m").read_bytes()
    cut = data[: len(data) // 2]
    cut = cut[: cut.rfind(b"\n") - 10]  # stop in the middle of a sequence line
    with pytest.raises(MSAError, match=r"truncated.a3m: row \d+"):
        parse_a3m(cut, source="truncated.a3m")


# --------------------------------------------------------------------------------------------------
# Stockholm
# --------------------------------------------------------------------------------------------------

STO = """# STOCKHOLM 1.0
#=GF ID test
#=GS query        DE the query
#=GS hit1/1-6     DE first hit

query     MK-V-A
hit1/1-6  MKLVPA
hit2/2-4  -KL--.
#=GR hit1/1-6 PP 99999*
#=GC RF   xx.x.x

query     -LL
hit1/1-6  QLL
hit2/2-4  -L-
#=GC RF   .xx
//
"""


def test_stockholm_multiblock_and_query_gap_columns():
    msa = parse_stockholm(STO, source="t.sto")
    # query columns: M K V A L L (the '-' columns 3, 5 and 7 of the query are removed)
    np.testing.assert_array_equal(msa.aatype, np.stack([aa("MKVALL"), aa("MKVALL"), aa("-K--L-")]))
    # hit1 has residues in the 3 query-gap columns: L before V, P before A, Q before the first L.
    np.testing.assert_array_equal(msa.deletions, [[0] * 6, [0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0]])
    assert msa.descriptions == ["query", "hit1/1-6", "hit2/2-4"]
    assert_matches_reference(msa, ref_parse_stockholm(STO))


def test_stockholm_gap_only_query_column():
    """A column that is a gap in the query (and in every row) is dropped without deletions."""
    text = "# STOCKHOLM 1.0\nq  M-K\nh1 M-R\nh2 --K\n//\n"
    msa = parse_stockholm(text)
    np.testing.assert_array_equal(msa.aatype, np.stack([aa("MK"), aa("MR"), aa("-K")]))
    assert msa.deletions.sum() == 0


def test_stockholm_all_gap_query_is_an_error():
    with pytest.raises(MSAError, match="q.sto.*no residues"):
        parse_stockholm("q ---\nh MKV\n//\n", source="q.sto")


@pytest.mark.parametrize("cut, match", [
    ("\n//\n", "terminator"),  # file ends before '//'
    ("hit2/2-4  -L-\n", "row 3.*hit2.*6.*9"),  # second block cut: hit2 shorter than the query
])
def test_stockholm_truncated(cut, match):
    text = STO[: STO.index(cut)] + ("\n" if "terminator" in match else "")
    if "terminator" not in match:
        text += "//\n"
    with pytest.raises(MSAError, match=match):
        parse_stockholm(text, source="t.sto")


@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("# STOCKHOLM 1.0\n#=GF ID x\n//\n", "empty"),
    ("# STOCKHOLM 1.0\nq MKV extra\n//\n", "line 2"),
    ("q MK1\n//\n", "invalid character '1'"),
])
def test_stockholm_malformed(text, match):
    with pytest.raises(MSAError, match=match):
        parse_stockholm(text, source="bad.sto")


@needs_data
def test_stockholm_truncated_real_file():
    data = (PER_CHAIN / "5kc1_A" / "uniref90_hits.sto").read_bytes()
    cut = data[: int(len(data) * 0.8)]
    with pytest.raises(MSAError, match="uniref90_hits.sto"):
        parse_stockholm(cut, source="5kc1_A/uniref90_hits.sto")


# --------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------


def _msa(rows: list[str], dels: list[list[int]] | None = None, source: str = "m") -> MSA:
    a = np.stack([aa(r) for r in rows])
    d = np.zeros(a.shape, np.uint16) if dels is None else np.array(dels, np.uint16)
    return MSA(a, d, [f"{source}{i}" for i in range(len(rows))], source)


def test_merge_dedup_keeps_first_occurrence():
    a = _msa(["MKV", "MKA", "MKV", "MRA"], [[0, 0, 0], [1, 0, 0], [9, 9, 9], [0, 2, 0]], "a")
    b = _msa(["MKV", "MRA", "QKV", "QKV", "MKA"], [[0] * 3, [5] * 3, [0, 0, 3], [7] * 3, [8] * 3], "b")
    m = merge_msas([a, b])
    np.testing.assert_array_equal(m.aatype, np.stack([aa(s) for s in ["MKV", "MKA", "MRA", "QKV"]]))
    np.testing.assert_array_equal(m.deletions, [[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]])
    assert m.descriptions == ["a0", "a1", "a3", "b2"]
    # max_depth truncates after dedup, keeping the query first
    m2 = merge_msas([a, b], max_depth=3)
    assert m2.descriptions == ["a0", "a1", "a3"]
    assert merge_msas([a, b], max_depth=1).descriptions == ["a0"]
    assert merge_msas([a, b], max_depth=100).depth == 4
    with pytest.raises(ValueError):
        merge_msas([a], max_depth=0)


def test_merge_errors():
    a = _msa(["MKV", "MKA"], source="a.a3m")
    with pytest.raises(MSAError, match="b.a3m.*length"):
        merge_msas([a, _msa(["MKVL"], source="b.a3m")])
    with pytest.raises(MSAError, match="c.sto.*query row differs.*residue 3"):
        merge_msas([a, _msa(["MKA"], source="c.sto")])
    assert merge_msas([a, _msa(["MKA"], source="c.sto")], check_query=False).depth == 2
    with pytest.raises(MSAError):
        merge_msas([])


@needs_data
def test_merge_large_matches_python_dedup():
    path = AF3PT / "pdb_data/data_caches/msa/msas/721p-assembly1A_protein.a3m"
    msa = read_msa_file(path)
    t0 = time.perf_counter()
    merged = merge_msas([msa, msa, msa])
    elapsed = time.perf_counter() - t0
    seen, keep = set(), []
    for i, row in enumerate(msa.aatype):
        key = row.tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    np.testing.assert_array_equal(merged.aatype, msa.aatype[keep])
    np.testing.assert_array_equal(merged.deletions, msa.deletions[keep])
    assert merged.depth < msa.depth  # the file does contain duplicate aligned rows
    assert elapsed < 2.0, f"merging 3 x {msa.depth} rows took {elapsed:.2f}s"


# --------------------------------------------------------------------------------------------------
# AF2-layout directories
# --------------------------------------------------------------------------------------------------


@needs_data
def test_find_chain_msa_files_af2_order_and_caps():
    files = find_chain_msa_files(PER_CHAIN / "3zee_A")
    assert [(p.name, cap) for p, cap in files] == [
        ("uniref90_hits.sto", 10_000), ("bfd_uniclust_hits.a3m", None), ("mgnify_hits.sto", 501)]
    # uniprot_hits.sto (multimer pairing) and hmm_output.sto (templates) are not used
    capped = find_chain_msa_files(PER_CHAIN / "3zee_A", per_file_max=100)
    assert [cap for _, cap in capped] == [100, 100, 100]
    mapped = find_chain_msa_files(PER_CHAIN / "3zee_A", per_file_max={"mgnify_hits": None, "uniref90_hits": 5})
    assert [cap for _, cap in mapped] == [5, None, None]


def _link(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)


@needs_data
def test_load_chain_msas_extensions_extra_files_and_caps(tmp_path):
    src = AF3PT / "afdb_data/data_caches/train/1a0g_A/a3m"  # a3m-only AF2 layout, mgnify has 5000 rows
    chain = tmp_path / "chain"
    chain.mkdir()
    _link(src / "bfd_uniclust_hits.a3m", chain / "bfd_uniclust_hits.a3m")
    _link(src / "mgnify_hits.a3m", chain / "mgnify_hits.a3m")
    _link(src / "bfd_uniclust_hits.a3m", chain / "zz_extra.a3m")
    _link(src / "mgnify_hits.a3m", chain / "aa_extra.a3m")
    _link(src / "mgnify_hits.a3m", chain / "uniprot_hits.a3m")  # pairing only: skipped
    (chain / "hmm_output.sto").write_text("not an msa")  # template hits: skipped
    names = [p.name for p, _ in find_chain_msa_files(chain)]
    assert names == ["bfd_uniclust_hits.a3m", "mgnify_hits.a3m", "aa_extra.a3m", "zz_extra.a3m"]

    bfd = read_msa_file(src / "bfd_uniclust_hits.a3m")
    mgnify = read_msa_file(src / "mgnify_hits.a3m")
    assert mgnify.depth > 501
    merged = load_chain_msas(chain)
    expected = merge_msas([bfd, mgnify.truncate(501), mgnify, bfd])
    np.testing.assert_array_equal(merged.aatype, expected.aatype)
    np.testing.assert_array_equal(merged.deletions, expected.deletions)
    assert load_chain_msas(chain, max_depth=10).depth == 10
    assert load_chain_msas(chain, per_file_max=1).depth == 1


@needs_data
def test_load_chain_msas_query_mismatch_names_file(tmp_path):
    chain = tmp_path / "chain"
    chain.mkdir()
    _link(QUERY_73 / "uniref90_hits.sto", chain / "uniref90_hits.sto")
    _link(PER_CHAIN / "1psm_A" / "bfd_uniclust_hits.a3m", chain / "bfd_uniclust_hits.a3m")
    with pytest.raises(MSAError, match="bfd_uniclust_hits.a3m"):
        load_chain_msas(chain)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MSAError, match="no MSA files"):
        load_chain_msas(empty)


@needs_data
@pytest.mark.parametrize("chain", sorted(p.name for p in PER_CHAIN.iterdir()) if PER_CHAIN.is_dir() else [])
def test_load_every_af2_chain_dir(chain):
    merged = load_chain_msas(PER_CHAIN / chain)
    uniref = read_msa_file(PER_CHAIN / chain / "uniref90_hits.sto")
    np.testing.assert_array_equal(merged.aatype[0], uniref.aatype[0])
    assert len({r.tobytes() for r in merged.aatype}) == merged.depth  # no duplicate rows


# --------------------------------------------------------------------------------------------------
# Every real file parses to rows of query length
# --------------------------------------------------------------------------------------------------


def _real_msa_files() -> list[Path]:
    if not DATA.is_dir():
        return []
    files = sorted(PER_CHAIN.glob("*/*.a3m")) + sorted(PER_CHAIN.glob("*/*.sto"))
    files += sorted(QUERY_73.glob("*.a3m")) + sorted(QUERY_73.glob("*.sto"))
    files += sorted(PROTENIX.rglob("*.a3m")) + sorted(AF3PT.rglob("*.a3m"))
    return files


@needs_data
def test_every_real_msa_file_parses():
    files = _real_msa_files()
    assert len(files) > 150
    for path in files:
        msa = read_msa_file(path)
        assert msa.aatype.ndim == 2 and msa.depth >= 1 and msa.length >= 1, path
        assert msa.aatype.min() >= 0 and msa.aatype.max() <= rc.GAP_ID, path
        assert len(msa.descriptions) == msa.depth, path
        if path.suffix == ".a3m":
            # row 0 is the query as written in the file (no insertions, no gaps in a query row)
            first = path.read_text().split(">", 2)[1].split("\n", 1)[1]
            query = "".join(c for c in first if not c.isspace() and not c.islower() and c != ".")
            np.testing.assert_array_equal(msa.aatype[0], aa(query), err_msg=str(path))


@needs_data
def test_parse_speed_large_a3m():
    path = AF3PT / "pdb_data/data_caches/msa/msas/721p-assembly1A_protein.a3m"
    data = path.read_bytes()
    t0 = time.perf_counter()
    msa = parse_a3m(data, source=str(path))
    elapsed = time.perf_counter() - t0
    assert msa.aatype.shape == (15953, 166)
    assert elapsed < 1.5, f"parsing {len(data) / 1e6:.1f} MB took {elapsed:.2f}s"
