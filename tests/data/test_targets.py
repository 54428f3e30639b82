"""Tests for foldforge.data.targets on real structures (AF2 Suppl. 1.8.1, 1.8.5, 1.9.1; Alg. 21, 24, 26).

Chains are read with gemmi directly (an independent parse from the project's own mmCIF parser, which is
exercised by the last test), so every geometric check compares make_targets against raw coordinates.
"""
from __future__ import annotations

import time
from pathlib import Path

import gemmi
import numpy as np
import pytest

from foldforge.data import residue_constants as rc
from foldforge.data.targets import make_targets

from tests.paths import SHARED as DATA  # noqa: E402
MYOGLOBIN = DATA / "psicov150_structures/pdb/1a6m.pdb"  # sperm-whale myoglobin, 1.0 A X-ray, 151 res
CRYO_EM = DATA / "openfold_af2_testdata/mmcifs/3zee.cif"  # 84 res, has ASP/GLU/PHE/TYR
GAPPED = DATA / "openfold_af2_testdata/mmcifs/3u8v.cif"  # 93-res SEQRES, 83 observed

pytestmark = pytest.mark.skipif(not MYOGLOBIN.exists() or not CRYO_EM.exists(), reason="shared test data absent")

A = rc.atom_order


def load_chain(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First chain of the first model as (aatype int8 [L], atom37 positions f32 [L,37,3], mask u8 [L,37])."""
    st = gemmi.read_structure(str(path))
    st.remove_alternative_conformations()
    st.remove_hydrogens()
    residues = [r for r in st[0][0] if r.name in rc.restype_3to1 or r.name == "MSE"]
    aatype = np.full(len(residues), rc.UNK_ID, dtype=np.int8)
    pos = np.zeros((len(residues), 37, 3), dtype=np.float32)
    mask = np.zeros((len(residues), 37), dtype=np.uint8)
    for i, res in enumerate(residues):
        name = "MET" if res.name == "MSE" else res.name
        aatype[i] = rc.restype_order[rc.restype_3to1[name]]
        for atom in res:
            atom_name = "SD" if (res.name == "MSE" and atom.name == "SE") else atom.name
            if atom_name in A:
                pos[i, A[atom_name]] = atom.pos.tolist()
                mask[i, A[atom_name]] = 1
    return aatype, pos, mask


@pytest.fixture(scope="module")
def myoglobin():
    aatype, pos, mask = load_chain(MYOGLOBIN)
    return aatype, pos, mask, make_targets(aatype, pos, mask)


@pytest.fixture(scope="module")
def cryo_em():
    aatype, pos, mask = load_chain(CRYO_EM)
    return aatype, pos, mask, make_targets(aatype, pos, mask)


def dihedral(p0, p1, p2, p3):
    """Reference IUPAC dihedral in radians (praxeolitic formula), vectorized over leading axes."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - np.sum(b0 * b1, -1, keepdims=True) * b1
    w = b2 - np.sum(b2 * b1, -1, keepdims=True) * b1
    return np.arctan2(np.sum(np.cross(b1, v) * w, -1), np.sum(v * w, -1))


def angle_diff(a, b):
    return np.abs(np.angle(np.exp(1j * (a - b))))


def local_coords(frames4x4, points):
    """Points [..., 3] expressed in frames [..., 4, 4]: R^T (x - t)."""
    rot, trans = frames4x4[..., :3, :3], frames4x4[..., :3, 3]
    return np.einsum("...ji,...j->...i", rot, points - trans)


EXPECTED = {
    "atom14_gt_positions": ((14, 3), np.float32), "atom14_gt_exists": ((14,), np.uint8),
    "atom14_atom_exists": ((14,), np.uint8), "residx_atom14_to_atom37": ((14,), np.int32),
    "residx_atom37_to_atom14": ((37,), np.int32), "atom37_atom_exists": ((37,), np.uint8),
    "atom14_atom_is_ambiguous": ((14,), np.uint8), "atom14_alt_gt_positions": ((14, 3), np.float32),
    "atom14_alt_gt_exists": ((14,), np.uint8), "rigidgroups_gt_frames": ((8, 4, 4), np.float32),
    "rigidgroups_gt_exists": ((8,), np.uint8), "rigidgroups_group_exists": ((8,), np.uint8),
    "rigidgroups_group_is_ambiguous": ((8,), np.uint8), "rigidgroups_alt_gt_frames": ((8, 4, 4), np.float32),
    "torsion_angles_sin_cos": ((7, 2), np.float32), "alt_torsion_angles_sin_cos": ((7, 2), np.float32),
    "torsion_angles_mask": ((7,), np.uint8), "pseudo_beta": ((3,), np.float32),
    "pseudo_beta_mask": ((), np.uint8),
}


def test_keys_shapes_dtypes(cryo_em):
    aatype, _, _, out = cryo_em
    assert set(out) == set(EXPECTED)
    for key, (shape, dtype) in EXPECTED.items():
        assert out[key].shape == (len(aatype),) + shape, key
        assert out[key].dtype == dtype, key
        assert np.isfinite(out[key]).all(), key


def test_tables_consistent():
    # Every literature atom is an atom14 atom of its residue and vice versa; chi atoms exist too.
    for name in rc.resnames[:20]:
        lit = {a for a, _, _ in rc.rigid_group_atom_positions[name]}
        assert lit == {a for a in rc.restype_name_to_atom14_names[name] if a}, name
        assert all(a in lit for quad in rc.chi_angles_atoms[name] for a in quad), name
    heavy_atoms = [5, 11, 8, 8, 6, 9, 9, 4, 10, 8, 8, 9, 8, 11, 7, 6, 7, 14, 12, 7, 0]  # A R N D ... V, UNK
    assert rc.restype_atom14_mask.sum(1).tolist() == heavy_atoms
    assert rc.restype_rigidgroup_is_ambiguous.nonzero()[1].tolist() == [5, 6, 5, 5]  # ASP chi2, GLU chi3, PHE, TYR
    assert np.array_equal(rc.restype_rigidgroup_is_ambiguous[:, 4:], rc.restype_chi_pi_periodic)


def test_atom14_atom37_round_trip(cryo_em):
    aatype, pos, mask, out = cryo_em
    L = len(aatype)
    gt14, ex14 = out["atom14_gt_positions"], out["atom14_gt_exists"].astype(bool)
    a37 = out["residx_atom14_to_atom37"]
    back = np.zeros_like(pos)
    rows = np.repeat(np.arange(L), 14).reshape(L, 14)
    back[rows[ex14], a37[ex14]] = gt14[ex14]
    keep = (mask * out["atom37_atom_exists"]).astype(bool)
    assert np.array_equal(back, pos * keep[..., None])  # exact
    # atom37 -> atom14 index map is the inverse on existing atoms.
    a14 = out["residx_atom37_to_atom14"]
    r, c = np.nonzero(keep)
    assert np.array_equal(gt14[r, a14[r, c]], pos[r, c])
    assert ex14.sum() == keep.sum()
    assert not out["atom14_gt_positions"][~ex14].any()


def test_alt_positions_swap_exactly_the_ambiguous_pairs(cryo_em):
    aatype, _, _, out = cryo_em
    gt, alt = out["atom14_gt_positions"], out["atom14_alt_gt_positions"]
    amb = out["atom14_atom_is_ambiguous"].astype(bool)
    seen = set()
    for i, a in enumerate(aatype):
        name = rc.resnames[a]
        names14 = rc.restype_name_to_atom14_names[name]
        swaps = rc.residue_atom_renaming_swaps.get(name, {})
        partner = {**swaps, **{v: k for k, v in swaps.items()}}
        for k, atom in enumerate(names14):
            if atom in partner:
                seen.add(name)
                assert amb[i, k]
                assert np.array_equal(alt[i, k], gt[i, names14.index(partner[atom])])
                assert not np.array_equal(alt[i, k], gt[i, k])
            else:
                assert not amb[i, k]
                assert np.array_equal(alt[i, k], gt[i, k])
    assert seen == {"ASP", "GLU", "PHE", "TYR"}
    assert np.array_equal(out["atom14_alt_gt_exists"], out["atom14_gt_exists"])  # complete side chains here


@pytest.mark.parametrize("which", ["myoglobin", "cryo_em"])
def test_frames_are_proper_rotations(which, request):
    _, _, _, out = request.getfixturevalue(which)
    ex = out["rigidgroups_gt_exists"].astype(bool)
    assert np.array_equal(ex, ex & out["rigidgroups_group_exists"].astype(bool))
    for key in ("rigidgroups_gt_frames", "rigidgroups_alt_gt_frames"):
        f = out[key].astype(np.float64)
        rot = f[ex][:, :3, :3]
        assert np.allclose(np.einsum("nji,njk->nik", rot, rot), np.eye(3), atol=1e-5)
        assert np.allclose(np.linalg.det(rot), 1.0, atol=1e-5)
        assert np.array_equal(f[..., 3, :], np.broadcast_to([0, 0, 0, 1], f.shape[:-2] + (4,)))
        assert np.array_equal(f[~ex], np.broadcast_to(np.eye(4), f[~ex].shape))
    # Alternative frames: rotated 180 deg about x for the pi-periodic group only, identical elsewhere.
    gt, alt = out["rigidgroups_gt_frames"], out["rigidgroups_alt_gt_frames"]
    amb = out["rigidgroups_group_is_ambiguous"].astype(bool)
    assert np.array_equal(gt[~amb], alt[~amb])
    assert np.allclose(alt[amb & ex], gt[amb & ex] @ np.diag([1.0, -1.0, -1.0, 1.0]), atol=1e-6)


def test_backbone_frame_is_alg21_and_matches_literature(myoglobin):
    aatype, pos, mask, out = myoglobin
    f = out["rigidgroups_gt_frames"][:, 0].astype(np.float64)
    ex = out["rigidgroups_gt_exists"][:, 0].astype(bool)
    assert ex.all()
    n, ca, c = (pos[:, A[a]].astype(np.float64) for a in ("N", "CA", "C"))
    # Independent Alg. 21: x along CA->C, N in the xy-plane with positive y, origin CA.
    x = (c - ca) / np.linalg.norm(c - ca, axis=-1, keepdims=True)
    y = (n - ca) - np.sum((n - ca) * x, -1, keepdims=True) * x
    y /= np.linalg.norm(y, axis=-1, keepdims=True)
    assert np.allclose(f[:, :3, 0], x, atol=1e-5) and np.allclose(f[:, :3, 1], y, atol=1e-5)
    assert np.allclose(f[:, :3, 3], ca, atol=1e-5)
    # N, CA, C in the backbone frame sit at the idealized literature positions (1.0 A structure).
    local = local_coords(f[:, None], np.stack([n, ca, c], 1))
    lit = rc.restype_atom14_rigid_group_positions[aatype][:, :3]
    assert np.abs(local - lit).max() < 0.2


def test_every_group_maps_its_atoms_to_literature_positions(myoglobin):
    aatype, _, _, out = myoglobin
    frames = out["rigidgroups_gt_frames"].astype(np.float64)
    group = rc.restype_atom14_to_rigid_group[aatype]  # [L, 14]
    f_atom = np.take_along_axis(frames, group[..., None, None], axis=1)  # [L, 14, 4, 4]
    ok = out["atom14_gt_exists"].astype(bool) & np.take_along_axis(out["rigidgroups_gt_exists"], group, 1).astype(bool)
    pts = out["atom14_gt_positions"].astype(np.float64)
    local = local_coords(f_atom, pts)
    # Round trip local -> global reproduces the coordinates.
    back = np.einsum("...ij,...j->...i", f_atom[..., :3, :3], local) + f_atom[..., :3, 3]
    assert np.allclose(back[ok], pts[ok], atol=1e-4)
    # Physically: every heavy atom sits near its idealized position in its group's frame. A frame with
    # the wrong handedness, axis order or chi convention would be off by 1-3 A (CB alone tests chirality).
    err = np.linalg.norm(local - rc.restype_atom14_rigid_group_positions[aatype], axis=-1)[ok]
    assert ok.sum() > 1000
    assert np.median(err) < 0.1 and np.percentile(err, 95) < 0.3 and err.max() < 0.6
    # The same holds with the alternative frames and the renamed (alternative) atoms.
    alt_f = np.take_along_axis(out["rigidgroups_alt_gt_frames"].astype(np.float64), group[..., None, None], 1)
    amb = ok & out["atom14_atom_is_ambiguous"].astype(bool)
    assert amb.sum() >= 10
    alt_local = local_coords(alt_f, out["atom14_alt_gt_positions"].astype(np.float64))
    alt_err = np.linalg.norm(alt_local - rc.restype_atom14_rigid_group_positions[aatype], axis=-1)[amb]
    assert alt_err.max() < 0.6


@pytest.mark.parametrize("which", ["myoglobin", "cryo_em"])
def test_torsions_match_reference_dihedrals(which, request):
    aatype, pos, mask, out = request.getfixturevalue(which)
    p = pos.astype(np.float64)
    sc, tm = out["torsion_angles_sin_cos"].astype(np.float64), out["torsion_angles_mask"].astype(bool)
    ang = np.arctan2(sc[..., 0], sc[..., 1])
    assert np.allclose(np.sum(sc**2, -1)[tm], 1.0, atol=1e-5)
    assert not sc[~tm].any()
    assert not tm[0, :2].any() and tm[1:, :3].all()  # complete chains: only residue 0 lacks omega/phi
    N, CA, C, O = A["N"], A["CA"], A["C"], A["O"]
    omega = dihedral(p[:-1, CA], p[:-1, C], p[1:, N], p[1:, CA])
    phi = dihedral(p[:-1, C], p[1:, N], p[1:, CA], p[1:, C])
    psi_o = dihedral(p[:, N], p[:, CA], p[:, C], p[:, O])
    psi = dihedral(p[:-1, N], p[:-1, CA], p[:-1, C], p[1:, N])  # the textbook psi, via N(i+1)
    assert angle_diff(ang[1:, 0], omega).max() < 1e-4
    assert angle_diff(ang[1:, 1], phi).max() < 1e-4
    assert angle_diff(ang[:, 2], psi_o + np.pi).max() < 1e-4
    assert np.median(angle_diff(ang[:-1, 2], psi)) < np.radians(5)  # O is ~anti to N(i+1)
    # Chis from the residue tables' atom quadruples.
    for i, a in enumerate(aatype):
        quads = rc.chi_angles_atoms[rc.resnames[a]]
        assert tm[i, 3:].tolist() == [k < len(quads) for k in range(4)]
        for k, quad in enumerate(quads):
            ref = dihedral(*(p[i, A[x]] for x in quad))
            assert angle_diff(ang[i, 3 + k], ref) < 1e-4
    # Alternative torsions: pi added to the pi-periodic chis only.
    alt = out["alt_torsion_angles_sin_cos"]
    flip = np.concatenate([np.zeros((len(aatype), 3)), rc.restype_chi_pi_periodic[aatype]], 1).astype(bool)
    assert flip.any()
    assert np.array_equal(alt[flip], -out["torsion_angles_sin_cos"][flip])
    assert np.array_equal(alt[~flip], out["torsion_angles_sin_cos"][~flip])


def test_torsions_rebuild_frames_alg24(myoglobin):
    """Backbone frame @ default frame @ rotX(torsion) reproduces each group's ground-truth frame."""
    aatype, _, _, out = myoglobin
    frames = out["rigidgroups_gt_frames"].astype(np.float64)
    ex = out["rigidgroups_gt_exists"].astype(bool)
    sc, tm = out["torsion_angles_sin_cos"].astype(np.float64), out["torsion_angles_mask"].astype(bool)
    default = rc.restype_rigid_group_default_frame[aatype].astype(np.float64)
    for g in range(3, 8):
        parent = 0 if g <= 4 else g - 1
        s, c = sc[:, g - 1, 0], sc[:, g - 1, 1]
        rot_x = np.zeros((len(aatype), 4, 4))
        rot_x[:, 0, 0] = rot_x[:, 3, 3] = 1
        rot_x[:, 1, 1], rot_x[:, 1, 2], rot_x[:, 2, 1], rot_x[:, 2, 2] = c, -s, s, c
        pred = frames[:, parent] @ default[:, g] @ rot_x
        sel = ex[:, g] & ex[:, parent] & tm[:, g - 1]
        rel = np.einsum("lji,ljk->lik", pred[sel, :3, :3], frames[sel, g, :3, :3])
        err = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
        assert sel.sum() > 10
        assert np.median(err) < 5 and err.max() < 20, g
        assert np.linalg.norm(pred[sel, :3, 3] - frames[sel, g, :3, 3], axis=-1).max() < 0.4


def test_pseudo_beta(cryo_em):
    aatype, pos, _, out = cryo_em
    gly = aatype == rc.restype_order["G"]
    assert gly.any() and (~gly).any()
    assert np.array_equal(out["pseudo_beta"][gly], pos[gly, A["CA"]])
    assert np.array_equal(out["pseudo_beta"][~gly], pos[~gly, A["CB"]])
    assert out["pseudo_beta_mask"].all()


def test_missing_atoms_unknown_and_gap_residues(myoglobin):
    aatype, pos, mask, _ = myoglobin
    aatype, pos, mask = aatype.copy(), pos.copy(), mask.copy()
    # Residue 10 loses CB (kills chi1, pseudo-beta), residue 20 loses C (kills its backbone frame, psi
    # and residue 21's omega/phi), residue 30 becomes UNK, residue 40 a gap token with no atoms.
    # Missing coordinates are NaN to prove they are never read.
    def drop(i, atoms):
        for a in atoms:
            mask[i, A[a]] = 0
            pos[i, A[a]] = np.nan
    drop(10, ["CB"])
    drop(20, ["C"])
    aatype[30] = rc.UNK_ID
    aatype[40] = rc.GAP_ID
    drop(40, [a for a in rc.atom_types])
    # An ASP missing OD1 (its alternative lacks OD2 instead), and a side chain with CG put on the CA->CB
    # line (degenerate geometry: chi1/chi2 frames and angles undefined, masked rather than garbage).
    asp = 50 + int(np.nonzero(aatype[50:] == rc.restype_order["D"])[0][0])
    drop(asp, ["OD1"])
    has_chi2 = rc.restype_chi_angles_mask[aatype[50:], 1].astype(bool) & (aatype[50:] != rc.restype_order["D"])
    bent = 50 + int(np.nonzero(has_chi2)[0][0])
    pos[bent, A["CG"]] = 2 * pos[bent, A["CB"]] - pos[bent, A["CA"]]
    pos[60, A["O"]] = np.nan  # mask says observed, coordinate is not: treated as missing
    out = make_targets(aatype, pos, mask)
    for key, val in out.items():
        assert np.isfinite(val).all(), key
    ex, tm = out["rigidgroups_gt_exists"], out["torsion_angles_mask"]
    assert out["pseudo_beta_mask"][10] == 0 and not out["pseudo_beta"][10].any()
    assert ex[10, 0] == 1 and ex[10, 4] == 0 and tm[10, 3] == 0
    assert out["atom14_gt_exists"][10, 4] == 0 and out["atom14_atom_exists"][10, 4] == 1
    assert ex[20, 0] == 0 and ex[20, 3] == 0 and tm[20, 2] == 0 and tm[20, 1] == 0
    assert tm[21, 0] == 0 and tm[21, 1] == 0 and tm[21, 2] == 1
    assert np.array_equal(out["rigidgroups_gt_frames"][20, 0], np.eye(4))
    # UNK: backbone and psi frames from atom37, no atom14 atoms, no chis.
    assert ex[30].tolist() == [1, 0, 0, 1, 0, 0, 0, 0] and tm[30].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert not out["atom14_atom_exists"][30].any() and not out["atom37_atom_exists"][30].any()
    # Gap: nothing exists, frames are identity, neighbours lose the torsions that need it.
    assert not ex[40].any() and not tm[40].any() and not out["atom14_gt_exists"][40].any()
    assert np.array_equal(out["rigidgroups_gt_frames"][40], np.broadcast_to(np.eye(4), (8, 4, 4)))
    assert tm[41, :2].tolist() == [0, 0]
    names = rc.restype_name_to_atom14_names["ASP"]
    od1, od2 = names.index("OD1"), names.index("OD2")
    assert out["atom14_gt_exists"][asp, [od1, od2]].tolist() == [0, 1]
    assert out["atom14_alt_gt_exists"][asp, [od1, od2]].tolist() == [1, 0]
    assert np.array_equal(out["atom14_alt_gt_positions"][asp, od1], out["atom14_gt_positions"][asp, od2])
    assert not out["atom14_alt_gt_positions"][asp, od2].any()
    assert ex[asp, 5] == 0 and tm[asp, 4] == 0 and ex[asp, 4] == 1
    # chi1 frame (CA, CB, CG) and both torsions are degenerate; the chi2 frame (CB, CG, CD) is not.
    assert ex[bent, 4] == 0 and tm[bent, 3] == 0 and tm[bent, 4] == 0 and ex[bent, 5] == 1
    assert ex[60, 3] == 0 and tm[60, 2] == 0 and ex[60, 0] == 1
    # Nothing else changed.
    ref = make_targets(*myoglobin[:3])
    untouched = np.setdiff1d(np.arange(len(aatype)), [10, 20, 21, 30, 40, 41, 60, asp, bent])
    for key in ("rigidgroups_gt_frames", "torsion_angles_sin_cos", "atom14_gt_positions"):
        assert np.array_equal(out[key][untouched], ref[key][untouched]), key


def test_empty_and_long_chain_fast(myoglobin):
    out = make_targets(np.zeros(0, np.int8), np.zeros((0, 37, 3), np.float32), np.zeros((0, 37), np.uint8))
    assert out["rigidgroups_gt_frames"].shape == (0, 8, 4, 4)
    aatype, pos, mask, ref = myoglobin
    reps = 20  # ~3000 residues
    t0 = time.perf_counter()
    out = make_targets(np.tile(aatype, reps), np.tile(pos, (reps, 1, 1)), np.tile(mask, (reps, 1)))
    assert time.perf_counter() - t0 < 2.0
    assert np.array_equal(out["rigidgroups_gt_frames"][-len(aatype):], ref["rigidgroups_gt_frames"])


def test_project_parser_chain_with_unobserved_residues():
    mmcif = pytest.importorskip("foldforge.data.mmcif")
    if not GAPPED.exists():
        pytest.skip("3u8v.cif absent")
    chain = next(iter(mmcif.parse_structure(GAPPED).chains.values()))
    out = make_targets(chain.aatype, chain.all_atom_positions, chain.all_atom_mask)
    for key, val in out.items():
        assert np.isfinite(val).all() and val.shape[0] == len(chain.aatype), key
    observed = chain.all_atom_mask[:, A["CA"]].astype(bool)
    assert (~observed).any()
    backbone_observed = chain.all_atom_mask[:, :3].all(1).astype(bool)  # N, CA, C
    assert np.array_equal(out["rigidgroups_gt_exists"][:, 0].astype(bool), backbone_observed)
    assert not out["torsion_angles_mask"][~observed].any()
    after_gap = np.nonzero(observed[1:] & ~observed[:-1])[0] + 1
    assert not out["torsion_angles_mask"][after_gap, :2].any()
