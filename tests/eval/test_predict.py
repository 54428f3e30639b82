"""``foldforge predict``: FASTA (+ A3M) -> mmCIF / PDB that round-trip through gemmi and foldforge's parser."""
import json

import gemmi
import numpy as np
import pytest

from foldforge.cli import main
from foldforge.data import residue_constants as rc
from foldforge.data.mmcif import parse_structure
from foldforge.data.prepare import SAMPLE_DIR
from foldforge.eval.checkpoint_io import load_model
from foldforge.eval.predict import (PredictError, assign_msas, parse_fasta, predict_arrays, prediction_inputs,
                                    read_fasta)

A3M = SAMPLE_DIR / "alignments" / "1psm_A" / "bfd_uniclust_hits.a3m"
SEQ_1PSM = "".join(parse_structure(SAMPLE_DIR / "mmcif" / "1psm.cif.gz").chains["A"].sequence)
SEQ_SHORT = "MKTAYIAKQRQISFVKSHFSRQ"


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    path = tmp_path_factory.mktemp("fasta") / "query.fasta"
    path.write_text(f">1psm_A the bundled chain\n{SEQ_1PSM[:20]}\n{SEQ_1PSM[20:]}\n\n"
                    f">short|demo protein\n{SEQ_SHORT.lower()}*\n")
    return path


@pytest.fixture(scope="module")
def predicted(fasta, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred")
    rc_ = main(["predict", "--checkpoint", str(tiny_checkpoint), "--fasta", str(fasta), "--msa", str(A3M),
                "--out", str(out), "--format", "both", "--num-recycles", "0", "--device", "cpu"])
    assert rc_ == 0
    return out


def test_outputs_and_summary(predicted):
    assert sorted(p.name for p in predicted.iterdir()) == [
        "1psm_A.cif", "1psm_A.json", "1psm_A.pdb", "short_demo.cif", "short_demo.json", "short_demo.pdb"]
    s = json.loads((predicted / "1psm_A.json").read_text())
    assert s["sequence"] == SEQ_1PSM and s["length"] == len(SEQ_1PSM) and len(s["plddt"]) == len(SEQ_1PSM)
    assert s["msa_depth"] > 1 and s["msa_files"] == [str(A3M)] and s["step"] == 7 and s["weights"] == "ema"
    assert s["mean_plddt"] == pytest.approx(np.mean(s["plddt"]), abs=0.01)
    assert 0 < min(s["plddt"]) < max(s["plddt"]) < 100  # varies per residue
    short = json.loads((predicted / "short_demo.json").read_text())
    assert short["sequence"] == SEQ_SHORT and short["msa_depth"] == 1 and short["description"] == "short|demo protein"


@pytest.mark.parametrize("suffix", ["cif", "pdb"])
def test_structure_round_trip(predicted, tiny_checkpoint, suffix):
    """Re-read with gemmi and with parse_structure: sequence, coordinates, atoms and B-factors (pLDDT)."""
    path = predicted / f"1psm_A.{suffix}"
    summary = json.loads((predicted / "1psm_A.json").read_text())
    plddt = np.array(summary["plddt"])
    # the same prediction, recomputed: inference is deterministic (eval mode, seeded MSA sampling)
    model, cfg = load_model(tiny_checkpoint)
    record = parse_fasta(f">1psm_A\n{SEQ_1PSM}\n")[0]
    arrays, _ = prediction_inputs(record, assign_msas([record], [A3M])["1psm_A"])
    pred = predict_arrays(model, cfg, arrays, num_recycles=0, device="cpu")
    np.testing.assert_allclose(pred["plddt"], plddt, atol=0.006)

    st = gemmi.read_structure(str(path))
    assert len(st) == 1 and [ch.name for ch in st[0]] == ["A"]
    chain = st[0]["A"]
    assert gemmi.one_letter_code([r.name for r in chain]) == SEQ_1PSM
    assert st.entities and gemmi.one_letter_code(list(st.entities[0].full_sequence)) == SEQ_1PSM
    for i, res in enumerate(chain):
        assert res.seqid.num == i + 1
        assert all(abs(a.b_iso - plddt[i]) < 0.006 for a in res)
        names = [a.name for a in res]
        expected = [rc.atom_types[k] for k in np.flatnonzero(pred["final_atom_mask"][i])]
        assert names == expected
        for a in res:
            np.testing.assert_allclose([a.pos.x, a.pos.y, a.pos.z],
                                       pred["final_atom_positions"][i, rc.atom_order[a.name]], atol=1e-3)

    parsed = parse_structure(path).chains["A"]
    assert parsed.sequence == SEQ_1PSM
    np.testing.assert_array_equal(parsed.all_atom_mask, pred["final_atom_mask"].astype(np.uint8))
    np.testing.assert_allclose(parsed.all_atom_positions * parsed.all_atom_mask[..., None],
                               pred["final_atom_positions"] * pred["final_atom_mask"][..., None], atol=1e-3)
    np.testing.assert_array_equal(parsed.author_resnum, np.arange(1, len(SEQ_1PSM) + 1))


def test_mmcif_categories(predicted):
    block = gemmi.cif.read(str(predicted / "1psm_A.cif")).sole_block()
    seq = block.find("_entity_poly_seq.", ["entity_id", "num", "mon_id"])
    assert [row[2] for row in seq] == [rc.restype_1to3[c] for c in SEQ_1PSM]
    assert block.find_value("_entity_poly.type").strip("'") == "polypeptide(L)"
    assert block.find_value("_entity.type") == "polymer"
    assert block.find_values("_atom_site.B_iso_or_equiv")
    assert set(block.find_values("_chem_comp.type")) <= {"L-peptide linking", "'L-peptide linking'",
                                                        "'peptide linking'", "peptide linking"}


def test_fasta_errors(tmp_path):
    with pytest.raises(PredictError, match="not found"):
        read_fasta(tmp_path / "missing.fasta")
    for text, match in (("", "no FASTA records"), ("MKV\n>a\nMKV\n", "before the first '>'"),
                        (">a\n\n>b\nMKV\n", "empty sequence"), (">a\nMK1V\n", "invalid character '1' at residue 3"),
                        (">a\nMK-V\n", "alignment")):
        with pytest.raises(PredictError, match=match):
            parse_fasta(text)
    recs = parse_fasta(">x\nMKV\n>x\nGGG\n")
    assert [r.name for r in recs] == ["x", "x_2"]


def test_msa_errors(tmp_path, tiny_checkpoint, capsys):
    records = parse_fasta(f">other\n{SEQ_SHORT}\n")
    with pytest.raises(PredictError, match="matches no FASTA record"):
        assign_msas(records, [A3M])
    with pytest.raises(PredictError, match="MSA file not found"):
        assign_msas(records, [tmp_path / "x.a3m"])
    bad = tmp_path / "hits.txt"
    bad.write_text(">q\nMKV\n")
    with pytest.raises(PredictError, match="unknown MSA format"):
        assign_msas(records, [bad])
    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">other\n{SEQ_SHORT}\n")
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--fasta", str(fasta), "--msa", str(A3M),
                 "--out", str(tmp_path / "o")]) == 2
    assert "matches no FASTA record" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # inputs are checked before anything is written
