"""``foldforge score`` on real structure pairs, against an independent O(N²) restatement of the metrics.

The restatement reads the files with gemmi directly (not through foldforge's parser), matches residues by
(chain, author number, insertion code), and scores with plain Python loops over atom pairs.
"""
import json
import math

import gemmi
import numpy as np
import pytest

from foldforge.cli import main
from foldforge.data import residue_constants as rc
from foldforge.data.prepare import SAMPLE_DIR
from foldforge.eval.score import SCORE_KEYS, ScoreError, score_structures

MMCIF = SAMPLE_DIR / "mmcif"
THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
SWAPS = {"ASP": [("OD1", "OD2")], "GLU": [("OE1", "OE2")], "PHE": [("CD1", "CD2"), ("CE1", "CE2")],
         "TYR": [("CD1", "CD2"), ("CE1", "CE2")]}
# heavy atoms of each residue type (atom14 names: no OXT, no hydrogens)
HEAVY = {name: {a for a in atoms if a} for name, atoms in rc.restype_name_to_atom14_names.items()}


# ---- the independent restatement ----

def read_residues(path):
    """{(chain, number, icode): (resname, {atom: xyz})} of the first model's amino acids. MSE is read as
    MET with SE at SD; of alternative locations the highest occupancy wins (the first on ties)."""
    st = gemmi.read_structure(str(path))
    out = {}
    for chain in st[0]:
        for res in chain:
            name = "MET" if res.name == "MSE" else res.name
            if name not in HEAVY or name == "UNK":
                continue
            key = (chain.name, res.seqid.num, res.seqid.icode.strip())
            if key in out:
                continue
            atoms, occ = {}, {}
            for a in res:
                an = "SD" if (res.name == "MSE" and a.name == "SE") else a.name
                if an in HEAVY[name] and (an not in atoms or a.occ > occ[an]):
                    atoms[an] = (a.pos.x, a.pos.y, a.pos.z)
                    occ[an] = a.occ
            out[key] = (name, atoms)
    return out


def pair_score(d_true, d_pred):
    err = abs(d_true - d_pred)
    return sum(err < t for t in THRESHOLDS) / 4.0


def restated_scores(model_path, ref_path):
    model, ref = read_residues(model_path), read_residues(ref_path)
    keys = [k for k in ref if k in model and "CA" in ref[k][1] and "CA" in model[k][1]]
    # lDDT-Cα: pairs i != j within 15 Å in the reference
    num = den = 0.0
    for i in keys:
        for j in keys:
            if i == j:
                continue
            d_true = math.dist(ref[i][1]["CA"], ref[j][1]["CA"])
            if d_true < 15.0:
                num += pair_score(d_true, math.dist(model[i][1]["CA"], model[j][1]["CA"]))
                den += 1
    lddt_ca = num / den
    # full-atom lDDT: the reference's heavy atoms, pairs of different residues; the model's naming of
    # symmetric atoms chosen per residue against everyone else's original naming
    atoms = [(k, a) for k in keys for a in sorted(ref[k][1])]

    def model_xyz(k, a, swapped):
        name = a
        if swapped:
            for x, y in SWAPS.get(ref[k][0], []):
                name = y if a == x else x if a == y else name
        return model[k][1].get(name)

    def row_sum(k, a, swapped):
        s, p = 0.0, model_xyz(k, a, swapped)
        for (k2, b) in atoms:
            if k2 == k:
                continue
            d_true = math.dist(ref[k][1][a], ref[k2][1][b])
            q = model[k2][1].get(b)
            if d_true < 15.0 and p is not None and q is not None:
                s += pair_score(d_true, math.dist(p, q))
        return s

    swapped = {}
    for k in keys:
        amb = [a for pair in SWAPS.get(ref[k][0], []) for a in pair if a in ref[k][1]]
        swapped[k] = bool(amb) and sum(row_sum(k, a, True) for a in amb) > sum(row_sum(k, a, False) for a in amb)
    num = den = 0.0
    for (k, a) in atoms:
        p = model_xyz(k, a, swapped[k])
        for (k2, b) in atoms:
            if k2 == k:
                continue
            d_true = math.dist(ref[k][1][a], ref[k2][1][b])
            if d_true < 15.0:
                den += 1
                q = model_xyz(k2, b, swapped[k2])
                if p is not None and q is not None:
                    num += pair_score(d_true, math.dist(p, q))
    lddt = num / den
    # Cα RMSD after superposition (Kabsch, written out again)
    P = np.array([model[k][1]["CA"] for k in keys])
    Q = np.array([ref[k][1]["CA"] for k in keys])
    P, Q = P - P.mean(0), Q - Q.mean(0)
    u, _, vt = np.linalg.svd(P.T @ Q)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1, 1, d]) @ vt
    rmsd = float(np.sqrt((((P @ rot) - Q) ** 2).sum(1).mean()))
    return {"lddt_ca": lddt_ca, "lddt": lddt, "rmsd_ca": rmsd}


# ---- real structure pairs ----

def _write_model(src, keep_model: int, path):
    st = gemmi.read_structure(str(src))
    for i in range(len(st) - 1, -1, -1):
        if i != keep_model:
            del st[i]
    st.setup_entities()
    if str(path).endswith(".pdb"):
        path.write_text(st.make_pdb_string())
    else:
        st.make_mmcif_document().write_file(str(path))
    return path


@pytest.fixture(scope="module")
def nmr_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("2crb")
    return (_write_model(MMCIF / "2crb.cif.gz", 0, d / "model1.cif"),
            _write_model(MMCIF / "2crb.cif.gz", 1, d / "model2.pdb"))


@pytest.fixture(scope="module")
def perturbed_4zey(tmp_path_factory):
    """4zey with noise (0.5 Å per coordinate), a rigid motion, three residues deleted, half of the
    symmetric side chains renamed the other way round, one residue without side chain and one with an
    insertion code (so it matches nothing)."""
    rng = np.random.default_rng(0)
    st = gemmi.read_structure(str(MMCIF / "4zey.cif.gz"))
    st.remove_alternative_conformations()
    st.remove_ligands_and_waters()
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = q * np.sign(np.diag(r)) * (1 if np.linalg.det(q * np.sign(np.diag(r))) > 0 else -1)
    chain = st[0][0]
    flipped = 0
    for res in chain:
        if res.name in SWAPS and flipped % 2 == 0:
            for a, b in SWAPS[res.name]:
                ia, ib = res[a][0].pos, res[b][0].pos
                res[a][0].pos, res[b][0].pos = ib, ia
        flipped += res.name in SWAPS
        for atom in res:
            x = np.array([atom.pos.x, atom.pos.y, atom.pos.z]) + rng.normal(0, 0.5, 3)
            atom.pos = gemmi.Position(*(rot @ x + np.array([10.0, -4.0, 3.0])))
    for idx in (40, 20, 5):
        del chain[idx]
    side = chain[30]
    for i in range(len(side) - 1, -1, -1):
        if side[i].name not in ("N", "CA", "C", "O"):
            del side[i]
    chain[50].seqid = gemmi.SeqId(chain[50].seqid.num, "A")
    path = tmp_path_factory.mktemp("4zey") / "4zey_perturbed.pdb"
    st.setup_entities()
    path.write_text(st.make_pdb_string())
    return path


def _check_against_restatement(model, ref):
    ours = score_structures(model, ref)
    theirs = restated_scores(model, ref)
    for key in SCORE_KEYS:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), (key, ours, theirs)
    return ours


def test_nmr_models_agree_with_restatement(nmr_pair):
    m1, m2 = nmr_pair
    s = _check_against_restatement(m2, m1)
    assert 0.5 < s["lddt_ca"] < 1.0 and 0.5 < s["lddt"] < 1.0 and s["rmsd_ca"] > 0.5
    _check_against_restatement(m1, m2)  # lDDT is not symmetric in model and reference


def test_perturbed_structure_agrees_with_restatement(perturbed_4zey):
    s = _check_against_restatement(perturbed_4zey, MMCIF / "4zey.cif.gz")
    assert 0.3 < s["lddt"] < s["lddt_ca"] < 0.99
    assert 0.5 < s["rmsd_ca"] < 1.5  # ~0.87 Å = sqrt(3) x 0.5 Å of noise; the rigid motion is removed


def test_identical_files_score_perfectly(nmr_pair):
    m1, _ = nmr_pair
    s = score_structures(m1, MMCIF / "2crb.cif.gz")  # model 1 is also the first model of the ensemble
    assert s["lddt_ca"] == pytest.approx(1.0) and s["lddt"] == pytest.approx(1.0)
    assert s["rmsd_ca"] == pytest.approx(0.0, abs=1e-6)


def test_cli_prints_one_json_line(nmr_pair, capsys):
    m1, m2 = nmr_pair
    assert main(["score", "--model", str(m2), "--reference", str(m1)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    assert set(result) == {"lddt_ca", "lddt", "rmsd_ca"}
    assert result == pytest.approx(score_structures(m2, m1))


def test_unmatched_structures_are_clear_errors(nmr_pair, tmp_path, capsys):
    m1, _ = nmr_pair
    st = gemmi.read_structure(str(m1))
    st[0][0].name = "Z"
    other_chain = tmp_path / "chain_z.pdb"
    other_chain.write_text(st.make_pdb_string())
    with pytest.raises(ScoreError, match="no common protein chain"):
        score_structures(other_chain, m1)
    st = gemmi.read_structure(str(m1))
    for res in st[0][0]:
        res.seqid = gemmi.SeqId(res.seqid.num + 1000, " ")
    renumbered = tmp_path / "renumbered.pdb"
    renumbered.write_text(st.make_pdb_string())
    with pytest.raises(ScoreError, match="no residue"):
        score_structures(renumbered, m1)
    assert main(["score", "--model", str(tmp_path / "missing.cif"), "--reference", str(m1)]) == 2
    assert "file not found" in capsys.readouterr().err
