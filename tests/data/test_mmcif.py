"""mmCIF/PDB parsing on real PDB entries (the shared data folder and the bundled sample)."""
import gzip
from pathlib import Path

import gemmi
import numpy as np
import pytest

from foldforge.data import residue_constants as rc
from foldforge.data.mmcif import StructureError, parse_structure
from foldforge.data.prepare import SAMPLE_DIR
from tests.paths import SHARED, needs_shared

OPENFOLD = SHARED / "openfold_af2_testdata" / "mmcifs"
SAMPLE = SAMPLE_DIR / "mmcif"
CA = rc.atom_order["CA"]


def test_mse_becomes_met_with_selenium_at_sd():
    chain = parse_structure(SAMPLE / "4zey.cif.gz").chains["A"]
    st = gemmi.read_structure(str(SAMPLE / "4zey.cif.gz"))
    mse = [r for r in st[0]["A"] if r.name == "MSE"]
    assert mse, "4zey contains selenomethionine"
    for res in mse:
        i = res.label_seq - 1
        assert chain.sequence[i] == "M" and chain.aatype[i] == rc.restype_order["M"]
        se = res["SE"][0].pos
        np.testing.assert_allclose(chain.all_atom_positions[i, rc.atom_order["SD"]], [se.x, se.y, se.z], atol=1e-3)
        assert chain.all_atom_mask[i, rc.atom_order["SD"]] == 1


def test_missing_residues_are_gaps_aligned_to_the_entity_sequence():
    s = parse_structure(SAMPLE / "2q2k.cif.gz")
    chain = s.chains["A"]
    assert chain.num_residues == 70 and 0 < chain.num_observed < 70
    st = gemmi.read_structure(str(SAMPLE / "2q2k.cif.gz"))
    observed = {r.label_seq - 1: r for r in st[0]["A"].get_polymer()}
    for i in range(chain.num_residues):
        if i in observed:
            assert rc.restype_3to1.get(observed[i].name, "X") == chain.sequence[i]
            ca = observed[i]["CA"][0].pos
            np.testing.assert_allclose(chain.all_atom_positions[i, CA], [ca.x, ca.y, ca.z], atol=1e-3)
        else:
            assert chain.all_atom_mask[i].sum() == 0 and not chain.all_atom_positions[i].any()
    np.testing.assert_array_equal(chain.residue_index, np.arange(70))
    # the DNA chain is recorded, not featurised
    assert s.other_chains and all(kind == "Dna" for _, kind in s.other_chains)
    assert set(s.chains) == {"A", "B"}


def test_nmr_takes_first_model_and_has_no_resolution():
    s = parse_structure(SAMPLE / "2crb.cif.gz")
    st = gemmi.read_structure(str(SAMPLE / "2crb.cif.gz"))
    assert len(st) > 1 and np.isnan(s.resolution) and "NMR" in s.method
    first = st[0]["A"].get_polymer()[0]["CA"][0].pos
    second = st[1]["A"].get_polymer()[0]["CA"][0].pos
    assert first.dist(second) > 1e-3
    np.testing.assert_allclose(s.chains["A"].all_atom_positions[first_res_index(st)], [first.x, first.y, first.z],
                               atol=1e-3)


def first_res_index(st):
    return st[0]["A"].get_polymer()[0].label_seq - 1, CA


def test_metadata_and_hetero_residues():
    s = parse_structure(SAMPLE / "4zey.cif.gz")
    assert s.pdb_id == "4zey" and s.resolution == pytest.approx(1.5) and s.release_date == "2015-05-06"
    assert list(s.chains) == ["A"]  # SO4 and waters never become chains
    chain = s.chains["A"]
    assert chain.all_atom_positions.dtype == np.float32 and chain.all_atom_mask.dtype == np.uint8
    # only atoms the residue type has: no side chain beyond CB on alanine
    ala = chain.aatype == rc.restype_order["A"]
    allowed = {rc.atom_order[a] for a in ("N", "CA", "C", "O", "CB", "OXT")}
    assert not chain.all_atom_mask[ala][:, [i for i in range(37) if i not in allowed]].any()


@needs_shared
def test_altloc_keeps_highest_occupancy():
    path = SHARED / "protenix_af3_msa" / "msa_pipeline_demo" / "mmcif" / "1k1a.cif"
    s = parse_structure(path)
    st = gemmi.read_structure(str(path))
    checked = 0
    for res in st[0]["A"].get_polymer():
        names = {a.name for a in res if a.altloc != "\0"}
        for name in names & set(rc.atom_types):
            best = max(res[name], key=lambda a: a.occ)
            got = s.chains["A"].all_atom_positions[res.label_seq - 1, rc.atom_order[name]]
            np.testing.assert_allclose(got, [best.pos.x, best.pos.y, best.pos.z], atol=1e-3)
            checked += 1
    assert checked > 5


def test_insertion_codes_do_not_shift_the_alignment(tmp_path):
    # a real entry with an insertion code set on one residue (author numbering only)
    doc = gemmi.cif.read(str(SAMPLE / "3zee.cif.gz"))
    table = doc.sole_block().find("_atom_site.", ["auth_seq_id", "pdbx_PDB_ins_code", "label_seq_id"])
    for row in table:
        if row[2] == "10":
            row[1] = "A"
    doc.write_file(str(tmp_path / "3zee.cif"))
    ref = parse_structure(SAMPLE / "3zee.cif.gz").chains["A"]
    got = parse_structure(tmp_path / "3zee.cif").chains["A"]
    assert got.insertion_code[9] == "A" and ref.insertion_code[9] == ""
    np.testing.assert_array_equal(got.all_atom_positions, ref.all_atom_positions)
    assert got.sequence == ref.sequence


def test_pdb_format_without_seqres():
    s = parse_structure(SAMPLE / "1aap.pdb.gz")
    chain = s.chains["A"]
    assert chain.num_residues == chain.num_observed == 56
    assert s.release_date is None and np.isnan(s.resolution)


@needs_shared
@pytest.mark.parametrize("path", sorted(OPENFOLD.glob("*.cif")), ids=lambda p: p.stem)
def test_real_entries_parse(path):
    s = parse_structure(path)
    assert s.chains
    for chain in s.chains.values():
        assert len(chain.sequence) == chain.aatype.shape[0] == chain.all_atom_positions.shape[0]
        assert np.isfinite(chain.all_atom_positions).all()
        assert chain.num_observed > 0


@needs_shared
def test_all_psicov_structures_parse():
    for path in sorted((SHARED / "psicov150_structures" / "pdb").glob("*.pdb")):
        s = parse_structure(path)
        assert len(s.chains) == 1, path


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.cif"
    empty.write_text("")
    with pytest.raises(StructureError, match="empty"):
        parse_structure(empty)
    text = gzip.open(SAMPLE / "3zee.cif.gz", "rt").read()
    trunc = tmp_path / "trunc.cif"
    trunc.write_text(text[: len(text) // 3])
    with pytest.raises(StructureError, match="trunc.cif"):
        parse_structure(trunc)
    with pytest.raises(StructureError, match="not found"):
        parse_structure(tmp_path / "missing.cif")
    other = tmp_path / "x.txt"
    other.write_text("hello")
    with pytest.raises(StructureError, match="unknown structure format"):
        parse_structure(other)
