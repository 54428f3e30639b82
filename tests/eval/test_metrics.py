"""Metric semantics against values computed by hand (AF2's lddt_test.py style)."""
import math

import numpy as np
import pytest
import torch

from foldforge.data import residue_constants as rc
from foldforge.eval.metrics import (distogram_accuracy, kabsch_rmsd, lddt_all_atom, lddt_ca_chain,
                                    plddt_from_logits)
from foldforge.model.lddt import lddt

CA = rc.atom_order["CA"]


def _line(xs):
    return torch.tensor([[x, 0.0, 0.0] for x in xs])


# ---- lDDT / lDDT-Cα ----

def test_identical_points_score_one():
    true = torch.randn(20, 3) * 8
    assert float(lddt(true, true, torch.ones(20), per_residue=False)) == pytest.approx(1.0)
    assert torch.allclose(lddt(true, true, torch.ones(20)), torch.ones(20))


def test_one_point_moved_between_thresholds():
    # points at 0, 5, 10 Å: all 6 ordered pairs are within 15 Å. Moving the last point by 0.7 Å along the
    # line changes its two distances by 0.7 Å: each of those pairs passes 3 of 4 thresholds (1, 2, 4 Å).
    true, pred = _line([0, 5, 10]), _line([0, 5, 10.7])
    per_res = lddt(pred, true, torch.ones(3))
    assert per_res.tolist() == pytest.approx([(1 + 0.75) / 2, (1 + 0.75) / 2, 0.75])
    assert float(lddt(pred, true, torch.ones(3), per_residue=False)) == pytest.approx((2 + 4 * 0.75) / 6)


def test_moves_past_every_threshold():
    # errors of 0.3, 0.7, 1.5, 3, 5 Å pass 4, 3, 2, 1, 0 thresholds
    for shift, expected in ((0.3, 1.0), (0.7, 0.75), (1.5, 0.5), (3.0, 0.25), (5.0, 0.0)):
        score = lddt(_line([0, 6 + shift]), _line([0, 6]), torch.ones(2), per_residue=False)
        assert float(score) == pytest.approx(expected, abs=1e-6), shift  # AF2's eps normalisation


def test_cutoff_and_mask():
    # pair (0, 2) is 16 Å apart in the truth: not scored, however wrong the model is
    true, pred = _line([0, 8, 16]), _line([0, 8, 40])
    per_res = lddt(pred, true, torch.ones(3))
    # point 2 keeps only its pair with point 1 (error 24 Å -> 0); point 0 only its pair with point 1
    assert per_res.tolist() == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)
    # without point 2 in the truth, nothing is wrong
    assert float(lddt(pred, true, torch.tensor([1.0, 1.0, 0.0]), per_residue=False)) == pytest.approx(1.0)


def test_lddt_ca_reads_the_ca_atom():
    true = torch.zeros(3, 37, 3)
    true[:, CA] = _line([0, 5, 10])
    pred = true.clone()
    pred[:, CA] = _line([0, 5, 10.7])
    pred[:, 0] += 100.0  # other atoms do not matter
    mask = torch.zeros(3, 37)
    mask[:, CA] = 1
    assert lddt_ca_chain(pred, true, mask) == pytest.approx((2 + 4 * 0.75) / 6)


# ---- full-atom lDDT ----

def _gly_chain(n, spacing=3.8):
    """n glycines along x, backbone atoms 1 Å apart inside each residue."""
    aatype = torch.full((n,), rc.restype_order["G"])
    pos = torch.zeros(n, 37, 3)
    mask = torch.zeros(n, 37)
    for i in range(n):
        for k, name in enumerate(("N", "CA", "C", "O")):
            pos[i, rc.atom_order[name]] = torch.tensor([i * spacing, float(k), 0.0])
            mask[i, rc.atom_order[name]] = 1
    return aatype, pos, mask


def test_full_atom_lddt_ignores_intra_residue_pairs():
    aatype, pos, mask = _gly_chain(1)
    pred = pos.clone()
    pred[0, rc.atom_order["O"]] += torch.tensor([0.0, 0.0, 9.0])  # only intra-residue distances change
    assert lddt_all_atom(pred, pos, mask, aatype) == pytest.approx(1.0)


def test_full_atom_lddt_by_hand():
    # two glycines 20 Å apart in x: O of residue 1 moved by 0.7 Å in x away from residue 0.
    aatype, pos, mask = _gly_chain(2, spacing=10.0)
    pred = pos.clone()
    pred[1, rc.atom_order["O"], 0] += 0.7
    true_np, pred_np = pos.numpy().astype(np.float64), pred.numpy().astype(np.float64)
    atoms = [(i, k) for i in range(2) for k in range(37) if mask[i, k]]
    num = den = 0.0
    for (i, a) in atoms:
        for (j, b) in atoms:
            if i == j:
                continue
            d_true = np.linalg.norm(true_np[i, a] - true_np[j, b])
            if d_true < 15.0:
                err = abs(d_true - np.linalg.norm(pred_np[i, a] - pred_np[j, b]))
                num += np.mean([err < t for t in (0.5, 1.0, 2.0, 4.0)])
                den += 1
    assert den == 32  # 4 x 4 atoms, both orders
    assert lddt_all_atom(pred, pos, mask, aatype) == pytest.approx(num / den, abs=1e-12)
    assert num / den < 1.0


def test_missing_model_atom_fails_its_pairs():
    aatype, pos, mask = _gly_chain(2, spacing=5.0)
    pred_mask = torch.ones(2, 37)
    pred_mask[1, rc.atom_order["O"]] = 0
    # 32 scored pairs, the 8 that involve residue 1's O score 0
    assert lddt_all_atom(pos, pos, mask, aatype, pred_mask37=pred_mask) == pytest.approx(24 / 32)


def test_oxt_is_not_scored():
    aatype, pos, mask = _gly_chain(2, spacing=5.0)
    mask[1, rc.atom_order["OXT"]] = 1
    pos[1, rc.atom_order["OXT"]] = torch.tensor([5.0, 4.0, 0.0])
    pred = pos.clone()
    pred[1, rc.atom_order["OXT"]] += 50.0
    assert lddt_all_atom(pred, pos, mask, aatype) == pytest.approx(1.0)


def test_symmetric_side_chain_atoms_are_resolved():
    # an ASP between two glycines; the model names OD1/OD2 the other way round
    aatype, pos, mask = _gly_chain(3)
    aatype[1] = rc.restype_order["D"]
    od1, od2 = rc.atom_order["OD1"], rc.atom_order["OD2"]
    for name, xyz in (("CB", (3.8, 1.0, 1.5)), ("CG", (3.8, 1.0, 3.0)), ("OD1", (4.9, 1.0, 3.8)),
                      ("OD2", (2.7, 1.0, 3.8))):
        pos[1, rc.atom_order[name]] = torch.tensor(xyz)
        mask[1, rc.atom_order[name]] = 1
    pred = pos.clone()
    pred[1, od1], pred[1, od2] = pos[1, od2], pos[1, od1]
    assert lddt_all_atom(pred, pos, mask, aatype, resolve_symmetry=False) < 0.99
    assert lddt_all_atom(pred, pos, mask, aatype) == pytest.approx(1.0)


# ---- Cα-RMSD ----

def _random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def test_rmsd_is_invariant_to_rigid_motion():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(50, 3)) * 10
    pred = true @ _random_rotation(rng).T + np.array([5.0, -3.0, 20.0])
    assert kabsch_rmsd(pred, true) == pytest.approx(0.0, abs=1e-9)


def test_rmsd_by_hand():
    # after centring, the best rotation of a symmetric pair is the identity: errors of 1 Å at both points
    true = np.array([[1.0, 0, 0], [-1.0, 0, 0]])
    pred = np.array([[2.0, 0, 0], [-2.0, 0, 0]]) + 7.0
    assert kabsch_rmsd(pred, true) == pytest.approx(1.0)
    # masked points are left out; no points -> NaN
    assert kabsch_rmsd(np.vstack([pred, [[99, 99, 99]]]), np.vstack([true, [[0, 0, 0]]]),
                       np.array([1, 1, 0])) == pytest.approx(1.0)
    assert math.isnan(kabsch_rmsd(pred, true, np.zeros(2)))


def test_rmsd_allows_no_reflection():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(30, 3)) * 5
    mirrored = true * np.array([1.0, 1.0, -1.0])
    assert kabsch_rmsd(mirrored, true) > 1.0


# ---- distogram accuracy, pLDDT ----

def test_distogram_accuracy_by_hand():
    # pseudo-betas at 0, 3 and 30 Å: 63 edges 2.3125 + 0.3125 k; 3 Å is bin 3, 27 and 30 Å the last (63)
    pb = _line([0.0, 3.0, 30.0])
    logits = torch.zeros(3, 3, 64)
    logits[0, 1, 3] = logits[1, 0, 3] = 1.0       # right
    logits[0, 2, 63] = logits[2, 0, 63] = 1.0     # right
    logits[1, 2, 10] = logits[2, 1, 10] = 1.0     # wrong
    logits[0, 0, 40] = 1.0                        # the diagonal never counts
    assert distogram_accuracy(logits, pb, torch.ones(3)) == pytest.approx(4 / 6)
    assert distogram_accuracy(logits, pb, torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(1.0)
    assert math.isnan(distogram_accuracy(logits, pb, torch.tensor([1.0, 0.0, 0.0])))


def test_plddt_expected_value():
    assert plddt_from_logits(torch.zeros(4, 50)).tolist() == pytest.approx([50.0] * 4)
    peaked = torch.full((1, 50), -1e4)
    peaked[0, 49] = 0.0
    assert float(plddt_from_logits(peaked)) == pytest.approx(99.0)
