"""Template hits -> AF2 template features (AF2 Suppl. 1.2.3; AF2 ``data/templates.py`` semantics).

The parity test compares against the raw feature dict AlphaFold2's own pipeline produced from
``query_73aa/pdb70_hits.hhr`` (``expected_af2_feature_dict.pickle``). The parsers run on every real
hhr / m8 / hmmsearch-sto file in the shared data.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from foldforge.data import residue_constants as rc
from foldforge.data.template_hits import TemplateError, TemplateHit, parse_hhr, parse_hmmsearch_sto, parse_m8
from foldforge.data.templates import (
    BLOSUM62, TemplateFeaturizer, align_sequences, fix_arginine_naming, load_chain_hits,
)

try:
    from tests.af2_reference import load_af2_feature_dict
except ModuleNotFoundError:  # plain `pytest` leaves the repo root off sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.af2_reference import load_af2_feature_dict

DATA = Path("/work/shared/data")
OF = DATA / "openfold_af2_testdata"
Q73 = OF / "query_73aa"
PROTENIX = DATA / "protenix_af3_msa/msa_pipeline_demo"
AF3PT = DATA / "af3pytorch_testdata/pdb_data/data_caches"
OF3 = DATA / "openfold3_template_alignment_vectors/inputs"

pytestmark = pytest.mark.skipif(not (Q73 / "pdb70_hits.hhr").exists(), reason="shared test data absent")

# AF2 stores template_aatype one-hot in HHblits order (residue_constants.HHBLITS_AA_TO_ID).
HHBLITS_ORDER = "ACDEFGHIKLMNPQRSTVWYX-"


def _query73() -> str:
    return "".join(Q73.joinpath("query.fasta").read_text().split("\n", 1)[1].split())


def _hits73() -> list[TemplateHit]:
    path = Q73 / "pdb70_hits.hhr"
    return parse_hhr(path.read_text(), source=str(path))


def _fasta(path: Path) -> dict[str, str]:
    out = {}
    for chunk in path.read_text().split(">")[1:]:
        head, *seq = chunk.split("\n")
        out[head.split()[0]] = "".join(seq).replace("-", "")
    return out


# ------------------------------------------------------------------------------------ AF2 parity

@pytest.fixture(scope="module")
def af2():
    return load_af2_feature_dict(Q73 / "expected_af2_feature_dict.pickle")


@pytest.fixture(scope="module")
def feats73():
    # AF2 defaults: max_hits 20, no cutoff that bites (every template predates any 2021 cutoff)
    return TemplateFeaturizer(OF / "mmcifs", max_hits=20).featurize(_query73(), _hits73())


def test_af2_aatype_is_hhblits_order(af2):
    # decoding AF2's one-hot with the HHblits alphabet reproduces its own template_sequence strings
    for onehot, seq in zip(af2["template_aatype"], af2["template_sequence"]):
        assert onehot.shape[-1] == 22 and np.all(onehot.sum(-1) == 1)
        assert "".join(HHBLITS_ORDER[k] for k in onehot.argmax(-1)) == seq.decode()


def test_af2_parity_query_73aa(af2, feats73):
    names = [n.decode() for n in af2["template_domain_names"]]
    # AF2 had 1hf9's mmCIF; the shared set does not, so it is the one row we cannot reproduce
    keep = [i for i, n in enumerate(names) if n != "1hf9_B"]
    assert len(names) == 8 and len(keep) == 7
    f = feats73
    assert f.template_domain_names == [names[i] for i in keep]
    assert f.template_aatype.dtype == np.int8 and f.template_aatype.shape == (7, 73)
    assert f.template_all_atom_positions.dtype == np.float32 and f.template_all_atom_positions.shape == (7, 73, 37, 3)
    assert f.template_all_atom_mask.dtype == np.uint8 and f.template_all_atom_mask.shape == (7, 73, 37)
    hh_to_ours = np.array([rc.HHBLITS_LETTER_TO_AATYPE[c] for c in HHBLITS_ORDER], np.int8)
    ref_aatype = hh_to_ours[af2["template_aatype"][keep].argmax(-1)]
    np.testing.assert_array_equal(f.template_aatype, ref_aatype)
    assert f.template_sequences == [af2["template_sequence"][i].decode() for i in keep]
    np.testing.assert_array_equal(f.template_all_atom_mask, af2["template_all_atom_masks"][keep].astype(np.uint8))
    np.testing.assert_allclose(f.template_all_atom_positions, af2["template_all_atom_positions"][keep], atol=1e-3)
    np.testing.assert_allclose(f.template_sum_probs, af2["template_sum_probs"][keep, 0], atol=1e-6)
    # every hit is accounted for: 7 kept + 1hf9 (no file) + 5kc1_F/J (aligned residues 25-41 unobserved,
    # AF2's TemplateAtomMaskAllZerosError -- why AF2's dict has 8 of the 10 hits)
    reasons = {(r.name, r.reason) for r in f.rejected}
    assert reasons == {("1hf9_B", "missing_mmcif"), ("5kc1_F", "no_atoms"), ("5kc1_J", "no_atoms")}
    assert f.template_release_dates[0] == "2011-11-09"  # 3u8v


def test_sorted_by_sum_probs_not_file_order():
    hits = _hits73()
    assert [h.short_name for h in hits][:4] == ["1hf9_B", "2crb_A", "4zey_A", "3u8v_A"]  # hhr order: by Prob
    f = TemplateFeaturizer(OF / "mmcifs", max_hits=2).featurize(_query73(), hits)
    assert f.template_domain_names == ["3u8v_A", "2crb_A"]  # 3u8v has the largest Sum_probs (15.8)
    assert len(f.rejected) + f.num_templates == len(hits)
    assert [r.name for r in f.rejected if r.reason == "max_hits"] == ["4zey_A", "1psm_A", "3zee_A", "5kc1_F",
                                                                       "5kc1_J", "4i6p_A", "2q2k_A"]


def test_release_date_cutoffs():
    q, hits = _query73(), _hits73()
    fz = TemplateFeaturizer(OF / "mmcifs")
    # any cutoff in [4zey release, 5kc1 release) reproduces AF2's set; 5kc1 is dropped either way
    for cutoff in ("2015-05-06", "2016-10-04", None):
        assert fz.featurize(q, hits, release_date_cutoff=cutoff).num_templates == 7
    f = TemplateFeaturizer(OF / "mmcifs", release_date_cutoff="2012-01-01").featurize(q, hits)
    assert f.template_domain_names == ["3u8v_A", "2crb_A", "1psm_A", "2q2k_A"]
    dated = {r.name: r.detail for r in f.rejected if r.reason == "release_date"}
    assert set(dated) == {"4zey_A", "3zee_A", "4i6p_A", "5kc1_F", "5kc1_J"}
    assert "2015-05-06" in dated["4zey_A"]
    # query release date - 60 days (AF2); 3u8v was released 2011-11-09: kept on the day, dropped a day earlier
    assert "3u8v_A" in fz.featurize(q, hits, query_release_date="2012-01-08").template_domain_names
    f = fz.featurize(q, hits, query_release_date="2012-01-07")
    assert "3u8v_A" not in f.template_domain_names and f.release_date_cutoff == "2011-11-08"


def test_empty_hits_give_zero_templates():
    f = TemplateFeaturizer(OF / "mmcifs").featurize("ACDEFGHIKL", [])
    assert f.template_aatype.shape == (0, 10) and f.template_all_atom_positions.shape == (0, 10, 37, 3)
    assert f.template_sum_probs.shape == (0,) and f.template_domain_names == []


# ------------------------------------------------------------------------------------------- hhr

_TABLE = re.compile(r"^\s*(\d+)\s+(\S+).*?\s(\d+)-(\d+)\s+(\d+)-(\d+)\s*\((\d+)\)\s*$")


@pytest.mark.parametrize("path", sorted(DATA.rglob("*.hhr")), ids=lambda p: str(p.relative_to(DATA)))
def test_parse_every_real_hhr(path):
    text = path.read_text()
    hits = parse_hhr(text, source=str(path))
    table = {}
    for line in text.split("\n\n", 2)[1].splitlines()[1:]:  # the summary table after the header
        m = _TABLE.match(line)
        if m:
            table[int(m.group(1))] = tuple(int(m.group(k)) for k in (3, 4, 5, 6, 7))
    assert len(hits) == text.count("\nNo ") == len(table) > 0
    for h in hits:
        assert len(h.query) == len(h.hit_sequence) == len(h.indices_query) == len(h.indices_hit)
        assert h.pdb_chain is not None and h.sum_probs is not None and h.aligned_cols > 0
        q0, q1, t0, t1, t_len = table[h.index]  # multi-block alignments cover the table's ranges
        assert (h.query_start + 1, h.query_end, h.hit_start + 1, h.hit_end, h.hit_length) == (q0, q1, t0, t1, t_len)
        for s, idx in ((h.query, h.indices_query), (h.hit_sequence, h.indices_hit)):
            res = [i for c, i in zip(s, idx) if c != "-"]
            assert res == list(range(res[0], res[0] + len(res))) and all(i == -1 for c, i in zip(s, idx) if c == "-")


def test_hhr_hit_fields():
    h = _hits73()[0]
    assert (h.index, h.pdb_id, h.chain_id, h.aligned_cols, h.sum_probs) == (1, "1hf9", "B", 22, 13.1)
    assert h.name.startswith("1HF9_B ATPASE INHIBITOR") and h.e_value == pytest.approx(380.0)
    assert h.query == "AEHHHKAAEHHEQAAKHHHAAA" and h.hit_sequence == "ISHHAKEIERLQKEIERHKQSI"
    assert h.indices_query == list(range(6, 28)) and h.indices_hit == list(range(9, 31))
    q = _query73()
    assert all(q[i] == c for i, c in zip(h.indices_query, h.query))


def _broken(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("old,new,line", [
    ("T 2CRB_A           32 EEAISCHRKATTYLSEAMKL   51 (97)", "T 2CRB_A           32 EEAISCHRKATTYLSEAMK   51 (97)", 43),  # 19 residues
    ("Q query            11 HKAAEHHEQAAKHHHAAAEH   30 (73)", "Q query            11 HKAAEHHEQAAKHHHAAAEH   31 (73)", 39),
    ("Probab=6.35", "Prob=6.35", 37),
    (">2CRB_A nuclear", "2CRB_A nuclear", 36),
    ("No 2\n", "No two\n", 35),
])
def test_malformed_hhr_raises_with_file_and_line(tmp_path, old, new, line):
    path = tmp_path / "broken.hhr"
    path.write_text(_broken((Q73 / "pdb70_hits.hhr").read_text(), old, new))
    with pytest.raises(TemplateError, match=rf"broken\.hhr:{line}:"):
        parse_hhr(path.read_text(), source=str(path))
    assert issubclass(TemplateError, ValueError)


def test_truncated_hhr_raises(tmp_path):
    text = (Q73 / "pdb70_hits.hhr").read_text()
    cut = text[: text.index("T 2CRB_A           32")]
    with pytest.raises(TemplateError, match="cut.hhr"):
        parse_hhr(cut, source="cut.hhr")
    assert parse_hhr("", source="empty.hhr") == []


# -------------------------------------------------------------------------------------------- m8

def _af3pt_cases():
    for path in sorted((AF3PT / "template/templates").glob("*.m8")):
        key = path.name.replace("_pdball_230102_db.m8", "")
        yield path, _fasta(AF3PT / f"msa/msas/{key}.a3m")["101"]


@pytest.mark.parametrize("path,query", list(_af3pt_cases()), ids=lambda x: getattr(x, "name", ""))
def test_parse_real_m8_af3pytorch(path, query):
    hits = parse_m8(path.read_text(), query, source=str(path))
    n_lines = sum(1 for line in path.read_text().splitlines() if line.strip())
    assert len(hits) == n_lines
    for h in hits:
        assert h.has_alignment and h.pdb_chain is not None and h.sum_probs is None
        assert h.query.replace("-", "") == query[h.query_start:h.query_end]
        assert len(h.indices_hit) == len(h.indices_query) and h.hit_sequence == ""
        assert sum(i >= 0 for i in h.indices_hit) == h.hit_end - h.hit_start
        assert 0.0 <= h.identity <= 1.0


def test_parse_real_m8_protenix_multi_query():
    text = (PROTENIX / "mmcif_msa_initial/pdb70_220313_db.m8").read_text()
    seqs = _fasta(PROTENIX / "pdb_seqs/pdb_seq.fasta")
    with pytest.raises(TemplateError, match="query_id"):
        parse_m8(text, seqs["102m_1"], source="pdb70_220313_db.m8")
    counts = {qid: len(parse_m8(text, seqs[qid], query_id=qid, source="x.m8"))
              for qid in ("102m_1", "1k1a_1", "5zyh_1", "7zzx_1")}
    assert counts == {"102m_1": 151, "1k1a_1": 257, "5zyh_1": 17, "7zzx_1": 73}
    h = parse_m8(text, seqs["102m_1"], query_id="102m_1")[0]  # 2DC3_A 3-152 / 22-174, 82M3D68M
    assert (h.pdb_id, h.chain_id, h.query_start, h.query_end, h.hit_start, h.hit_end) == ("2dc3", "A", 2, 152, 21, 174)
    assert h.indices_query[82:85] == [-1, -1, -1] and h.indices_hit[82:85] == [103, 104, 105]
    assert h.identity == pytest.approx(0.3) and h.e_value == pytest.approx(3.961e-41) and h.score == 149


def test_parse_m8_openfold3_vector():
    # openfold-3 template_alignment vectors (outputs/m8_cigar.npz): (entry, chain, seq_id) per row
    query = _fasta(OF3 / "a3m_no_realign.a3m")["query_A/1-253"]
    text = (OF3 / "m8_cigar.m8").read_text()
    expected = [("7cnz", "A", 1.0), ("7cnz", "G", 0.995)]
    for cols in (None, 12):
        t = text if cols is None else "\n".join("\t".join(x.split("\t")[:12]) for x in text.splitlines())
        hits = parse_m8(t, query, source="m8_cigar.m8")
        assert [(h.pdb_id, h.chain_id, h.identity) for h in hits] == expected
        assert [h.has_alignment for h in hits] == [cols is None] * 2
    g = parse_m8(text, query)[1]  # 229M1I17M: query residue 236 (1-based) faces a template gap
    assert g.indices_query[229] == 235 and g.indices_hit[229] == -1
    tseq = query[6:235] + query[236:]  # 7cnz_G = query 7-253 without residue 236
    with_seq = parse_m8(text, query, target_sequences={"7cnz_G": tseq})[1]
    assert with_seq.hit_sequence[229] == "-" and with_seq.template_segment == tseq


@pytest.mark.parametrize("line,msg", [
    ("101\t7cnz_A\t1.000\t245\t0\t0\t9\t253\t1\t245\t5.8E-95\t310\t244M", r"CIGAR 244M covers 244"),
    ("101\t7cnz_A\t1.000\t245\t0\t0\t9\t260\t1\t245\t5.8E-95\t310", r"qend=260 beyond"),
    ("101\t7cnz_A\tx\t245\t0\t0\t9\t253\t1\t245\t5.8E-95\t310", r"non-numeric"),
    ("101\t7cnz_A\t1.000\t245\t0\t0\t9\t253\t1\t245\t5.8E-95\t310\t245Q", r"bad CIGAR"),
])
def test_malformed_m8_raises_with_file_and_line(line, msg):
    query = _fasta(OF3 / "a3m_no_realign.a3m")["query_A/1-253"]
    good = (OF3 / "m8_cigar.m8").read_text().splitlines()[0]
    if len(line.split("\t")) == 12:
        good = "\t".join(good.split("\t")[:12])
    with pytest.raises(TemplateError, match=rf"hits\.m8:2: {msg}"):
        parse_m8(good + "\n" + line + "\n", query, source="hits.m8")


@pytest.fixture(scope="module")
def k1a():
    from foldforge.data.mmcif import parse_structure
    seqs = _fasta(PROTENIX / "pdb_seqs/pdb_seq.fasta")
    text = (PROTENIX / "mmcif_msa_initial/pdb70_220313_db.m8").read_text()
    return seqs["1k1a_1"], text, parse_structure(PROTENIX / "mmcif/1k1a.cif").chains["A"]


def test_m8_featurize_self_hit(k1a):
    query, text, chain = k1a
    hits = parse_m8(text, query, query_id="1k1a_1", source="pdb70_220313_db.m8")
    f = TemplateFeaturizer(PROTENIX / "mmcif").featurize(query, hits)
    assert f.num_templates == 0  # the only entry on disk is the query itself
    assert [(r.name, r.reason) for r in f.rejected if r.reason != "missing_mmcif"] == [("1k1a_A", "duplicate")]
    assert f.template_aatype.shape == (0, len(query))
    f = TemplateFeaturizer(PROTENIX / "mmcif", release_date_cutoff="2000-01-01").featurize(query, hits[:40])
    assert ("1k1a_A", "release_date") in {(r.name, r.reason) for r in f.rejected}
    assert TemplateFeaturizer(PROTENIX / "mmcif").featurize(
        query, hits, query_pdb_id="1k1a").rejected[hits.index(next(h for h in hits if h.pdb_id == "1k1a"))][1] \
        == "same_entry"

    # allowed through (ratio > 1): with CIGAR and coordinates only, the template is the chain itself
    expected_pos = chain.all_atom_positions.copy()
    expected_mask = chain.all_atom_mask.copy()
    fix_arginine_naming(chain.sequence, expected_pos, expected_mask)
    self_hit = [h for h in hits if h.pdb_id == "1k1a"]
    no_cigar = parse_m8("\n".join("\t".join(x.split("\t")[:12]) for x in text.splitlines()), query,
                        query_id="1k1a_1")
    for hs in (self_hit, [h for h in no_cigar if h.pdb_id == "1k1a"]):
        f = TemplateFeaturizer(PROTENIX / "mmcif", max_subsequence_ratio=1.01).featurize(query, hs)
        assert f.template_domain_names == ["1k1a_A"]
        np.testing.assert_array_equal(f.template_aatype[0], chain.aatype)
        np.testing.assert_array_equal(f.template_all_atom_mask[0], expected_mask)
        np.testing.assert_array_equal(f.template_all_atom_positions[0], expected_pos)


def test_coordinate_only_hit_is_aligned(k1a):
    query, _, chain = k1a
    # query = template residues 11-200 with two substitutions and a 3-residue deletion
    q = list(query[10:200])
    q[50:52] = "WW"
    del q[100:103]
    q = "".join(q)
    hit = TemplateHit(index=1, name="1K1A_A", aligned_cols=187, sum_probs=None, query="", hit_sequence="",
                      indices_query=[], indices_hit=[], query_start=0, query_end=len(q), hit_start=10,
                      hit_end=200, identity=0.98)
    f = TemplateFeaturizer(PROTENIX / "mmcif").featurize(q, [hit])
    assert f.template_domain_names == ["1k1a_A"] and not f.rejected
    t = f.template_sequences[0]
    assert "-" not in t and sum(a != b for a, b in zip(q, t)) == 2
    # query residue 101 (0-based 100) is template residue 10 + 103 + 3
    np.testing.assert_array_equal(f.template_all_atom_mask[0, 100], chain.all_atom_mask[113])


# --------------------------------------------------------------------------------- hmmsearch sto

def test_hmmsearch_sto_featurize_real():
    from foldforge.data.mmcif import parse_structure
    q = parse_structure(OF / "mmcifs/2crb.cif").chains["A"].sequence
    hits = load_chain_hits(OF / "alignments_per_chain/2crb_A", q)  # hmm_output.sto (no hhr there)
    assert len(hits) > 1000 and all(h.sum_probs is None for h in hits)
    by_name = {h.short_name: h for h in hits}
    h = by_name["4zey_A"]
    assert h.hit_start == 1 and h.hit_end == 84 and len(h.hit_sequence.replace("-", "")) == 83
    f = TemplateFeaturizer(OF / "mmcifs").featurize(q, hits, query_pdb_id="2crb")
    assert f.template_domain_names == ["4zey_A"]
    reasons = {r.name: r.reason for r in f.rejected}
    assert reasons["2crb_A"] == "same_entry" and reasons["5kc1_A"] == "no_atoms"
    zey = parse_structure(OF / "mmcifs/4zey.cif").chains["A"]
    t = f.template_sequences[0]
    aligned = [(i, c) for i, c in enumerate(t) if c != "-"]
    assert len(aligned) > 70 and np.mean([q[i] == c for i, c in aligned]) > 0.9  # mouse vs human NRBF2
    # every template letter is the 4zey SEQRES residue whose atoms were copied (MSE read as MET)
    offset = zey.sequence.find(h.hit_sequence.replace("-", ""))
    assert offset == 1
    assert "M" in t and f.template_all_atom_mask[0][:, rc.atom_order["SD"]].sum() > 0


def test_hmmsearch_sto_openfold3_vector():
    query = _fasta(OF3 / "a3m_no_realign.a3m")["query_A/1-253"]
    hits = parse_hmmsearch_sto((OF3 / "sto_hmmsearch_diff_seq.sto").read_text(), query, source="diff.sto")
    # outputs/sto_hmmsearch_diff_seq.npz: entries, chains and ungapped template sequences
    assert [(h.pdb_id, h.chain_id) for h in hits] == [("2jsf", "A"), ("4ut6", "A")]
    assert hits[0].template_segment == "LQLKGMSYSMCTGKFKVVKEIAETQHGTIVIRVQYEGDGSPCKIPFEIMDLEKRHVLGRLITVNPIVTEK"
    assert hits[1].template_segment == "KLQLKGMSYSMCTGKFKIVKEIAETQHGTIVIRVQYEGDGSPCKIPFEITDLEKRHVLGRLITVNPIVTEK"
    pairs = [(a + 1, b + 1) for a, b in zip(hits[0].indices_query, hits[0].indices_hit) if a >= 0 and b >= 0]
    assert pairs[:10] == [(105 + k, 4 + k) for k in range(10)]  # as in the vector (1-based)
    # the leading 'k' of 4ut6 and trailing 'k' are HMM insert states: template residues facing query gaps
    assert hits[1].indices_hit[0] == 290 and hits[1].indices_query[0] == -1
    with pytest.raises(TemplateError, match="diff.sto:6: .*match columns"):
        parse_hmmsearch_sto((OF3 / "sto_hmmsearch_diff_seq.sto").read_text(), query[:-1], source="diff.sto")


def test_load_chain_hits_prefers_hhr(tmp_path):
    (tmp_path / "pdb70_hits.hhr").write_text((Q73 / "pdb70_hits.hhr").read_text())
    (tmp_path / "hmm_output.sto").write_text("garbage that would not parse\n")
    assert len(load_chain_hits(tmp_path, _query73())) == 10
    assert load_chain_hits(tmp_path / "nothing", "ACD") == []


# ----------------------------------------------------------------------------- alignment, geometry

def test_blosum62_table():
    assert BLOSUM62.shape == (23, 23) and np.array_equal(BLOSUM62, BLOSUM62.T)
    assert BLOSUM62[0, 0] == 4 and BLOSUM62[4, 4] == 9 and BLOSUM62[17, 17] == 11


def test_align_sequences():
    assert align_sequences("ACDEFGHIK", "ACDEFGHIK") == [(i, i) for i in range(9)]
    # segment inside a longer sequence: end gaps are free
    pairs = align_sequences("HIKLMN", "ACDEFGHIKLMNPQRST")
    assert pairs == [(i, i + 6) for i in range(6)]
    # a deletion in the first sequence opens one gap
    a, b = "MKTAYIAKQRQISFVKSHFSRQ", "MKTAYIAKQRQGGGISFVKSHFSRQ"
    pairs = align_sequences(a, b)
    assert len(pairs) == len(a) and all(a[i] == b[j] for i, j in pairs)
    assert align_sequences("", "ACD") == []


def test_arginine_nh1_nh2_fix():
    pos = np.zeros((2, 37, 3), np.float32)
    mask = np.zeros((2, 37), np.uint8)
    cd, nh1, nh2 = rc.atom_order["CD"], rc.atom_order["NH1"], rc.atom_order["NH2"]
    for r in range(2):
        mask[r, [cd, nh1, nh2]] = 1
        pos[r, nh1] = (3.0, 0, 0)  # NH1 farther from CD than NH2: mislabelled
        pos[r, nh2] = (2.0, 0, 0)
    fix_arginine_naming("RK", pos, mask)
    assert pos[0, nh1, 0] == 2.0 and pos[0, nh2, 0] == 3.0  # swapped for ARG
    assert pos[1, nh1, 0] == 3.0  # untouched for LYS
    fix_arginine_naming("RK", pos, mask)  # idempotent
    assert pos[0, nh1, 0] == 2.0
