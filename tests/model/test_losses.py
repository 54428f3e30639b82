"""AF2 losses (AF2 Suppl. 1.9) and lDDT on synthetic inputs and on real chains of the bundled sample."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from foldforge.config import LossConfig
from foldforge.data import residue_constants as rc
from foldforge.data.mmcif import parse_structure
from foldforge.data.prepare import SAMPLE_DIR
from foldforge.data.targets import make_targets
from foldforge.model.af2.fape import backbone_fape, compute_renamed_ground_truth, fape, sidechain_fape
from foldforge.model.af2.losses import af2_loss, distogram_loss, masked_msa_loss, supervised_chi_loss
from foldforge.model.af2.violations import atom14_distance_bounds, find_structural_violations, violation_loss
from foldforge.model.geometry import Rigid, quat_to_rot
from foldforge.model.lddt import lddt, lddt_ca

EPS = 1e-4  # AF2's FAPE eps: identical inputs give sqrt(EPS) / 10


def _random_rigid(shape, gen, scale=10.0) -> Rigid:
    rot = quat_to_rot(torch.randn(*shape, 4, generator=gen))
    return Rigid(rot, scale * torch.randn(*shape, 3, generator=gen))


@pytest.fixture(scope="module")
def chain():
    """4zey chain A (84 residues, X-ray 1.5 Å) with its ground-truth targets as tensors."""
    st = parse_structure(SAMPLE_DIR / "mmcif" / "4zey.cif.gz")
    ch = st.chains["A"]
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in
           make_targets(ch.aatype, ch.all_atom_positions, ch.all_atom_mask).items()}
    out = {k: v.float() if v.dtype == torch.uint8 else v for k, v in out.items()}
    out["aatype"] = torch.from_numpy(ch.aatype.astype(np.int64))
    out["residue_index"] = torch.from_numpy(ch.residue_index.astype(np.int64))
    out["all_atom_positions"] = torch.from_numpy(ch.all_atom_positions)
    out["all_atom_mask"] = torch.from_numpy(ch.all_atom_mask).float()
    return out


# ---------------------------------------------------------------- FAPE (Alg. 28)

def test_fape_zero_for_identical_and_grows_with_noise():
    gen = torch.Generator().manual_seed(0)
    frames = _random_rigid((2, 30), gen)
    pos = 10 * torch.randn(2, 50, 3, generator=gen)
    fm, pm = torch.ones(2, 30), torch.ones(2, 50)
    same = fape(frames, frames, fm, pos, pos, pm, clamp=10.0)
    torch.testing.assert_close(same, torch.full((2,), math.sqrt(EPS) / 10), rtol=1e-4, atol=1e-6)
    prev = same
    for sigma in (0.3, 1.0, 3.0):
        noisy = pos + sigma * torch.randn(pos.shape, generator=gen)
        cur = fape(frames, frames, fm, noisy, pos, pm, clamp=None)
        assert (cur > prev).all()
        prev = cur


def test_fape_invariant_to_global_rigid_motion():
    gen = torch.Generator().manual_seed(1)
    tgt_frames = _random_rigid((40,), gen)
    tgt_pos = 10 * torch.randn(60, 3, generator=gen)
    pred_frames = tgt_frames.compose(_random_rigid((40,), gen, scale=1.0))
    pred_pos = tgt_pos + torch.randn(60, 3, generator=gen)
    fm = (torch.rand(40, generator=gen) > 0.2).float()
    pm = (torch.rand(60, generator=gen) > 0.2).float()
    ref = fape(pred_frames, tgt_frames, fm, pred_pos, tgt_pos, pm, clamp=10.0)
    g = _random_rigid((), gen, scale=50.0)
    moved = fape(g.compose(pred_frames), tgt_frames, fm, g.apply(pred_pos), tgt_pos, pm, clamp=10.0)
    moved_t = fape(pred_frames, g.compose(tgt_frames), fm, pred_pos, g.apply(tgt_pos), pm, clamp=10.0)
    assert ref > 0.05
    torch.testing.assert_close(moved, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moved_t, ref, rtol=1e-4, atol=1e-5)


def test_fape_clamp_caps_each_point_error():
    frames = Rigid.identity((1,))
    target = torch.zeros(2, 3)
    pred = torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # one point 50 Å off, one exact
    ones_f, ones_p = torch.ones(1), torch.ones(2)
    clamped = fape(frames, frames, ones_f, pred, target, ones_p, clamp=10.0, eps=1e-12)
    unclamped = fape(frames, frames, ones_f, pred, target, ones_p, clamp=None, eps=1e-12)
    torch.testing.assert_close(clamped, torch.tensor(10.0 / 10 / 2))
    torch.testing.assert_close(unclamped, torch.tensor(50.0 / 10 / 2))


def test_backbone_fape_mixes_clamped_and_unclamped_per_sample():
    gen = torch.Generator().manual_seed(2)
    gt = _random_rigid((2, 20), gen, scale=30.0)
    pred = Rigid(gt.rot, gt.trans + 15 * torch.randn(gt.trans.shape, generator=gen))  # large errors
    pred_blocks = torch.stack([pred.to_tensor_4x4(), gt.to_tensor_4x4()])  # [NB=2, 2, 20, 4, 4]
    mask = torch.ones(2, 20)
    gt4 = gt.to_tensor_4x4()
    clamped = backbone_fape(pred_blocks, gt4, mask, torch.ones(2))
    unclamped = backbone_fape(pred_blocks, gt4, mask, torch.zeros(2))
    mixed = backbone_fape(pred_blocks, gt4, mask, torch.tensor([1.0, 0.0]))
    assert (unclamped > clamped).all()
    torch.testing.assert_close(mixed, torch.stack([clamped[0], unclamped[1]]))
    # Average over blocks: block 1 is exact, so the result is half of block 0's FAPE (plus eps floor).
    one = fape(pred, gt, mask, pred.trans, gt.trans, mask, clamp=10.0)
    torch.testing.assert_close(clamped, 0.5 * (one + math.sqrt(EPS) / 10), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- renaming (Alg. 26) + side-chain FAPE

def _renamed(chain, pred_pos):
    return compute_renamed_ground_truth(pred_pos, chain["atom14_gt_positions"], chain["atom14_alt_gt_positions"],
                                        chain["atom14_gt_exists"], chain["atom14_alt_gt_exists"],
                                        chain["atom14_atom_is_ambiguous"])


def test_renaming_picks_alt_when_prediction_is_alt(chain):
    swappable = (chain["atom14_atom_is_ambiguous"] * chain["atom14_gt_exists"]).sum(-1) > 0  # [L]
    assert swappable.sum() >= 10  # 4zey has many GLU/ASP/TYR
    ren = _renamed(chain, chain["atom14_alt_gt_positions"])
    assert torch.equal(ren["alt_naming_is_better"].bool(), swappable)
    torch.testing.assert_close(ren["renamed_atom14_gt_positions"], chain["atom14_alt_gt_positions"])
    ren_gt = _renamed(chain, chain["atom14_gt_positions"])
    assert ren_gt["alt_naming_is_better"].sum() == 0

    # Predicting the alternative atoms and frames: side-chain FAPE ~ 0 after renaming, not without it.
    alt = ren["alt_naming_is_better"]
    pred_frames = torch.where(alt[:, None, None, None] > 0, chain["rigidgroups_alt_gt_frames"],
                              chain["rigidgroups_gt_frames"])
    args = (chain["rigidgroups_gt_frames"], chain["rigidgroups_alt_gt_frames"], chain["rigidgroups_gt_exists"])
    sc = sidechain_fape(pred_frames, chain["atom14_alt_gt_positions"], *args,
                        ren["renamed_atom14_gt_positions"], ren["renamed_atom14_gt_exists"], alt)
    assert sc < 1.5 * math.sqrt(EPS) / 10
    sc_no_rename = sidechain_fape(pred_frames, chain["atom14_alt_gt_positions"], *args,
                                  chain["atom14_gt_positions"], chain["atom14_gt_exists"], torch.zeros_like(alt))
    assert sc_no_rename > 10 * sc


# ---------------------------------------------------------------- chi loss (Alg. 27)

def _unit_angles(chain):
    """True (sin, cos) with masked angles set to (0, 1), so every angle vector has norm 1."""
    sc = chain["torsion_angles_sin_cos"].clone()
    sc[chain["torsion_angles_mask"] == 0] = torch.tensor([0.0, 1.0])
    return sc


def test_chi_loss_zero_for_true_angles_and_pi_periodic(chain):
    true = _unit_angles(chain)
    angles = torch.stack([true, true])  # [NB=2, L, 7, 2]
    args = (chain["aatype"], torch.ones(len(chain["aatype"])), chain["torsion_angles_mask"][..., 3:],
            chain["torsion_angles_sin_cos"][..., 3:, :])
    zero = supervised_chi_loss(angles, angles, *args)
    assert zero < 1e-5
    periodic = torch.as_tensor(rc.restype_chi_pi_periodic)[chain["aatype"]].bool()  # [L, 4]
    assert (periodic & (chain["torsion_angles_mask"][..., 3:] > 0)).sum() >= 5
    flipped = angles.clone()
    flipped[..., 3:, :][:, periodic] *= -1  # chi + pi for the pi-periodic chis
    torch.testing.assert_close(supervised_chi_loss(flipped, flipped, *args), zero)
    wrong = angles.clone()
    wrong[..., 3:, :] *= -1  # every chi + pi: large error for the non-periodic ones
    assert supervised_chi_loss(wrong, wrong, *args) > 0.1
    assert supervised_chi_loss(angles, 2 * angles, *args) > supervised_chi_loss(angles, angles, *args) + 5e-3


# ---------------------------------------------------------------- lDDT

def _naive_lddt_global(pred, true, mask, cutoff=15.0):
    num = den = 0.0
    n = len(pred)
    for i in range(n):
        for j in range(n):
            if i == j or not (mask[i] and mask[j]):
                continue
            dt = np.linalg.norm(true[i] - true[j])
            if dt >= cutoff:
                continue
            err = abs(dt - np.linalg.norm(pred[i] - pred[j]))
            num += sum(err < t for t in (0.5, 1.0, 2.0, 4.0)) / 4
            den += 1
    return num / den


def test_lddt_identity_monotone_and_matches_naive(chain):
    ca = chain["all_atom_positions"][:, 1].double()
    mask = chain["all_atom_mask"][:, 1]
    assert torch.allclose(lddt(ca, ca, mask, per_residue=False), torch.tensor(1.0))
    assert torch.allclose(lddt(ca, ca, mask), torch.ones(len(ca)))
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(ca.shape, generator=gen, dtype=torch.float64)
    scores = [float(lddt(ca + s * noise, ca, mask, per_residue=False)) for s in (0.1, 0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    pred = (ca + 1.0 * noise).float()
    naive = _naive_lddt_global(pred.numpy().astype(np.float64), ca.numpy(), mask.numpy() > 0)
    assert abs(float(lddt(pred, ca.float(), mask, per_residue=False)) - naive) < 1e-6
    pred37 = chain["all_atom_positions"].clone()
    pred37[:, 1] = pred
    torch.testing.assert_close(lddt_ca(pred37, chain["all_atom_positions"], chain["all_atom_mask"]),
                               lddt(pred, ca.float(), mask))


# ---------------------------------------------------------------- distogram / masked MSA

def test_distogram_loss_matches_manual_cross_entropy():
    gen = torch.Generator().manual_seed(4)
    L, B = 12, 64
    pb = 8 * torch.randn(2, L, 3, generator=gen)
    mask = (torch.rand(2, L, generator=gen) > 0.3).float()
    logits = torch.randn(2, L, L, B, generator=gen)
    got = distogram_loss(logits, pb, mask, min_bin=2.3125, max_bin=21.6875)
    edges = np.linspace(2.3125, 21.6875, B - 1)
    for b in range(2):
        num = den = 0.0
        for i in range(L):
            for j in range(L):
                if mask[b, i] and mask[b, j]:
                    d = float(torch.linalg.norm(pb[b, i] - pb[b, j]))
                    k = int(np.sum(d > edges))
                    num += float(F.cross_entropy(logits[b, i, j][None], torch.tensor([k])))
                    den += 1
        assert abs(float(got[b]) - num / den) < 1e-4


def test_masked_msa_loss_matches_manual_cross_entropy():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, 23, generator=gen)
    true = torch.randint(0, 22, (3, 7), generator=gen)
    bert = (torch.rand(3, 7, generator=gen) > 0.6).float()
    ce = F.cross_entropy(logits.reshape(-1, 23), true.reshape(-1), reduction="none")
    expected = (ce * bert.reshape(-1)).sum() / bert.sum()
    torch.testing.assert_close(masked_msa_loss(logits, true, bert), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- violations (1.9.11)

def _violations(chain, pos):
    v = find_structural_violations(pos, chain["aatype"], chain["residue_index"], chain["atom14_gt_exists"])
    return v, violation_loss(v, chain["atom14_gt_exists"])


def test_violation_loss_real_chain_move_ca_and_clash(chain):
    pos = chain["atom14_gt_positions"].clone()
    _, base = _violations(chain, pos)
    assert base < 1e-3  # a 1.5 Å X-ray structure satisfies the literature geometry
    moved = pos.clone()
    moved[40, 1] += torch.tensor([1.5, 0.0, 0.0])  # one CA moved by 1.5 Å
    v, loss = _violations(chain, moved)
    assert loss > base + 0.005  # bond terms are means over all L-1 peptide bonds, clashes per atom
    assert v["per_residue_violation_mask"][40] == 1 and v["per_residue_violation_mask"][10] == 0
    clash = pos.clone()
    clash[60, 4] = pos[20, 4] + torch.tensor([0.5, 0.0, 0.0])  # CB of residue 60 onto CB of residue 20
    v, loss = _violations(chain, clash)
    assert loss > base + 0.01
    assert v["clash_per_atom_clash_mask"][20, 4] == 1 and v["clash_per_atom_clash_mask"][60, 4] == 1


def test_stereo_props_bounds_and_lazy_parse():
    lower, upper = atom14_distance_bounds(1.5, 12.0)
    ala = rc.restype_order["A"]  # ALA CA-CB bond: 1.520 ± 12 x 0.021
    assert abs(lower[ala, 1, 4] - (1.520 - 12 * 0.021)) < 1e-5 and abs(upper[ala, 1, 4] - (1.520 + 12 * 0.021)) < 1e-5
    code = ("import foldforge.model.af2.losses, foldforge.model.af2.violations as v; "
            "assert v.load_stereo_chemical_props.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- af2_loss on a real batch

@pytest.fixture(scope="module")
def real_batches(tmp_path_factory):
    from foldforge.data.dataset import AF2Dataset
    from foldforge.data.prepare import PrepareOptions, run_prepare
    from foldforge.presets import tiny_af2

    out = tmp_path_factory.mktemp("cache")
    run_prepare(PrepareOptions(mmcif_dir=str(SAMPLE_DIR / "mmcif"), out=str(out),
                               msa_dir=str(SAMPLE_DIR / "alignments"), allow_missing_msa=True, workers=1),
                progress=False)
    ds = AF2Dataset(out, tiny_af2().data)
    batches = [ds[i].as_dict() for i in range(len(ds))]
    good = [b for b in batches if 0.1 <= float(b["resolution"]) <= 3.0 and b["seq_mask"].sum() >= 40]
    assert len(good) >= 2
    return good[:2]


def _fake_outputs(batch, sigma: float, gen: torch.Generator, num_blocks: int = 2):
    """Model outputs made from the ground truth, translations/atoms perturbed by ``sigma`` Å."""
    L = batch["aatype"].shape[-1]
    noise = lambda shape: sigma * torch.randn(shape, generator=gen)  # noqa: E731
    frames = batch["rigidgroups_gt_frames"].clone()  # [L, 8, 4, 4]
    frames[..., :3, 3] += noise(frames[..., :3, 3].shape)
    pos14 = batch["atom14_gt_positions"] + noise(batch["atom14_gt_positions"].shape)
    angles = batch["torsion_angles_sin_cos"].clone()
    angles[batch["torsion_angles_mask"] == 0] = torch.tensor([0.0, 1.0])
    angles = F.normalize(angles + 0.3 * noise(angles.shape), dim=-1)
    pos37 = batch["all_atom_positions"] + noise(batch["all_atom_positions"].shape)
    true_msa = batch["true_msa"][-1].long()
    pb = batch["pseudo_beta"]
    d = torch.linalg.norm(pb[:, None] - pb[None], dim=-1)
    bins = (d[..., None] > torch.linspace(2.3125, 21.6875, 63)).sum(-1)
    out = {
        "sm_frames": frames[:, 0].expand(num_blocks, L, 4, 4).clone(),
        "sm_sidechain_frames": frames.expand(num_blocks, L, 8, 4, 4).clone(),
        "sm_positions": pos14.expand(num_blocks, L, 14, 3).clone(),
        "sm_angles": angles.expand(num_blocks, L, 7, 2).clone(),
        "sm_unnormalized_angles": (1.1 * angles).expand(num_blocks, L, 7, 2).clone(),
        "final_atom_positions": pos37,
        "distogram_logits": 5.0 * F.one_hot(bins, 64).float(),
        "masked_msa_logits": 5.0 * F.one_hot(true_msa, 23).float(),
        "plddt_logits": 5.0 * F.one_hot(torch.full((L,), 49), 50).float(),  # "lDDT-Ca ~ 1 everywhere"
        "experimentally_resolved_logits": torch.zeros(L, 37),
    }
    return {k: v.requires_grad_(True) for k, v in out.items()}


def test_af2_loss_real_batch(real_batches):
    batch = real_batches[0]
    # MLPerf weights (violation and experimentally resolved off): the truth scores lower than a perturbation.
    cfg = LossConfig()
    gen = torch.Generator().manual_seed(6)
    total, terms = af2_loss(_fake_outputs(batch, 0.0, gen), batch, cfg)
    assert total.dim() == 0 and torch.isfinite(total)
    for name in ("fape_backbone", "fape_sidechain", "supervised_chi", "distogram", "masked_msa", "plddt",
                 "experimentally_resolved", "unscaled_loss", "loss", "lddt_ca"):
        assert name in terms and torch.isfinite(terms[name]) and not terms[name].requires_grad, name
    assert "violation" not in terms  # weight 0 and not cheap: skipped
    assert terms["fape_backbone"] < 2e-3 and terms["fape_sidechain"] < 2e-3 and terms["lddt_ca"] > 0.999
    perturbed_total, perturbed = af2_loss(_fake_outputs(batch, 1.0, gen), batch, cfg)
    assert perturbed_total > total + 0.1
    for name in ("fape_backbone", "fape_sidechain", "supervised_chi", "plddt"):
        assert perturbed[name] > terms[name], name
    assert perturbed["lddt_ca"] < terms["lddt_ca"]
    n_res = float(batch["seq_length"])
    torch.testing.assert_close(terms["loss"], terms["unscaled_loss"] * math.sqrt(n_res))

    # Fine-tuning weights: every term contributes, and each reaches its model output with a gradient.
    # (The fake prediction leaves unobserved atoms at the origin, so the violation term is large here.)
    cfg = LossConfig(violation_weight=1.0, experimentally_resolved_weight=0.01)
    outputs = _fake_outputs(batch, 1.0, gen)
    total, terms = af2_loss(outputs, batch, cfg)
    assert torch.isfinite(total) and torch.isfinite(terms["violation"]) and terms["violation"] > 0
    total.backward()
    for key in ("sm_frames", "sm_sidechain_frames", "sm_positions", "sm_angles", "sm_unnormalized_angles",
                "distogram_logits", "masked_msa_logits", "plddt_logits", "experimentally_resolved_logits"):
        g = outputs[key].grad
        assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0, key
    assert outputs["final_atom_positions"].grad is None  # only used through the detached lDDT target


def test_af2_loss_batched_equals_mean_of_samples(real_batches):
    cfg = LossConfig()  # MLPerf weights: violation / experimentally resolved skipped or logged only
    gen = torch.Generator().manual_seed(7)
    outs = [_fake_outputs(b, 0.5, gen) for b in real_batches]
    singles = [af2_loss(o, b, cfg) for o, b in zip(outs, real_batches)]
    batch = {k: torch.stack([b[k] for b in real_batches]) for k in real_batches[0]}
    stacked = {k: torch.stack([o[k].detach() for o in outs], dim=1 if k.startswith("sm_") and k != "sm_single"
                              else 0) for k in outs[0]}
    total, terms = af2_loss(stacked, batch, cfg)
    torch.testing.assert_close(total, (singles[0][0] + singles[1][0]).detach() / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["fape_sidechain"], (singles[0][1]["fape_sidechain"]
                                                         + singles[1][1]["fape_sidechain"]) / 2)
    assert "violation" not in terms and "experimentally_resolved" in terms
