"""AF2 training transforms (crop, templates, per-recycle MSA sampling, padding) and AF2Batch."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from foldforge.data import residue_constants as rc
from foldforge.data.msa import parse_a3m
from foldforge.data.batch import AF2Batch, collate
from foldforge.data.msa_sampling import (
    _agreement_reference, block_delete_rows, cluster_agreement, mask_msa, summarize_clusters,
)
from foldforge.data.transforms import make_af2_batch, spatial_crop
from foldforge.presets import af2_initial, tiny_af2
from tests.data.test_targets import EXPECTED
from tests.paths import SHARED

A3M = SHARED / "openfold_af2_testdata" / "query_73aa" / "bfd_uniclust_hits.a3m"

# Ground-truth target arrays (name -> trailing shape, dtype), as foldforge.data.targets writes them.
TARGETS = EXPECTED


@functools.lru_cache(maxsize=1)
def real_msa() -> tuple[np.ndarray, np.ndarray]:
    """(aatype int8 [1024, 73], deletions uint16) of the real query_73aa BFD/Uniclust a3m."""
    if not A3M.is_file():
        pytest.skip(f"shared real-data file {A3M} not present")
    return _read_a3m(A3M)


def _read_a3m(path: Path) -> tuple[np.ndarray, np.ndarray]:
    m = parse_a3m(path.read_bytes(), source=str(path))
    return m.aatype, m.deletions


def make_record(num_res: int | None = None, depth: int | None = None, num_templates: int = 3,
                seed: int = 0, resolution=2.5) -> dict[str, np.ndarray]:
    """Real MSA (query_73aa, optionally tiled/truncated to ``num_res`` columns and ``depth`` rows) plus
    structure-like arrays with random coordinates; every array read-only."""
    rng = np.random.default_rng(seed)
    msa, dels = real_msa()
    if depth is not None:
        msa, dels = msa[:depth], dels[:depth]
    if num_res is not None:
        reps = -(-num_res // msa.shape[1])
        msa, dels = np.tile(msa, (1, reps))[:, :num_res], np.tile(dels, (1, reps))[:, :num_res]
    msa, dels = np.ascontiguousarray(msa), np.ascontiguousarray(dels)
    n = msa.shape[1]
    aatype = msa[0].copy()
    rec = {
        "aatype": aatype,
        "residue_index": np.arange(n, dtype=np.int32),
        "all_atom_positions": rng.normal(0, 15, (n, 37, 3)).astype(np.float32),
        "all_atom_mask": (rng.random((n, 37)) < 0.6).astype(np.uint8),
        "msa": msa,
        "deletion_matrix": dels,
        "template_aatype": np.where(rng.random((num_templates, n)) < 0.3, rc.GAP_ID, aatype).astype(np.int8),
        "template_all_atom_positions": rng.normal(0, 15, (num_templates, n, 37, 3)).astype(np.float32),
        "template_all_atom_mask": (rng.random((num_templates, n, 37)) < 0.5).astype(np.uint8),
        "template_sum_probs": (np.arange(num_templates, dtype=np.float32) + 1) * 10,
        "resolution": np.float32(resolution),
    }
    rec["all_atom_mask"][:, rc.atom_order["CA"]] = 1
    for name, (shape, dtype) in TARGETS.items():
        rec[name] = (rng.normal(0, 1, (n, *shape)) * 10).astype(dtype)
    # a residue-identity target to check the crop: position in the full chain
    rec["pseudo_beta"][:, 0] = np.arange(n)
    for v in rec.values():
        if isinstance(v, np.ndarray):
            v.setflags(write=False)
    return rec


def expected_spec(cfg, padded: int, with_targets: bool = True) -> dict[str, tuple[tuple, np.dtype]]:
    R, Nc, Ne, T, L = cfg.num_recycle_copies, cfg.max_msa_clusters, cfg.max_extra_msa, cfg.max_templates, padded
    spec = {
        "aatype": ((L,), np.int8), "residue_index": ((L,), np.int32), "seq_mask": ((L,), np.float32),
        "seq_length": ((), np.int32), "resolution": ((), np.float32), "use_clamped_fape": ((), np.float32),
        "msa": ((R, Nc, L), np.int8), "true_msa": ((R, Nc, L), np.int8),
        "bert_mask": ((R, Nc, L), np.float32), "msa_mask": ((R, Nc, L), np.float32),
        "msa_has_deletion": ((R, Nc, L), np.float32), "msa_deletion_value": ((R, Nc, L), np.float32),
        "cluster_profile": ((R, Nc, L, 23), np.float32), "cluster_deletion_mean": ((R, Nc, L), np.float32),
        "extra_msa": ((R, Ne, L), np.int8), "extra_msa_mask": ((R, Ne, L), np.float32),
        "extra_has_deletion": ((R, Ne, L), np.float32), "extra_deletion_value": ((R, Ne, L), np.float32),
        "template_aatype": ((T, L), np.int8), "template_all_atom_positions": ((T, L, 37, 3), np.float32),
        "template_all_atom_mask": ((T, L, 37), np.float32), "template_mask": ((T,), np.float32),
        "template_sum_probs": ((T,), np.float32),
        "all_atom_positions": ((L, 37, 3), np.float32), "all_atom_mask": ((L, 37), np.float32),
    }
    if with_targets:
        for name, (shape, dtype) in TARGETS.items():
            spec[name] = ((L, *shape), np.float32 if dtype == np.uint8 else dtype)
    return spec


def check_spec(batch, spec):
    assert set(batch) == set(spec), (set(batch) ^ set(spec))
    for k, (shape, dtype) in spec.items():
        assert batch[k].shape == shape, (k, batch[k].shape, shape)
        assert batch[k].dtype == dtype, (k, batch[k].dtype, dtype)


def rng(*seed):
    return np.random.default_rng(list(seed))


# --------------------------------------------------------------------------------------------------
# shapes, determinism, invariants
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", [tiny_af2, af2_initial])
def test_shapes_and_dtypes(preset):
    cfg = preset().data
    rec = make_record()
    batch = make_af2_batch(rec, cfg, rng(0))
    check_spec(batch, expected_spec(cfg, cfg.crop_size))
    n = min(73, cfg.crop_size)
    assert int(batch["seq_length"]) == n and batch["seq_mask"].sum() == n
    assert float(batch["resolution"]) == pytest.approx(2.5)
    assert AF2Batch.from_numpy(batch).msa.shape == batch["msa"].shape


def test_determinism():
    cfg = tiny_af2().data
    rec = make_record()
    a, b, c = (make_af2_batch(rec, cfg, rng(s)) for s in (1, 1, 2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    # the recycling copies are sampled independently
    assert not np.array_equal(a["msa"][0], a["msa"][1])


def test_inputs_are_not_modified():
    rec = make_record()  # every array read-only: a write would raise
    before = {k: np.array(v, copy=True) for k, v in rec.items()}
    for s in range(3):
        make_af2_batch(rec, tiny_af2().data, rng(s))
        make_af2_batch(rec, af2_initial().data, rng(s), train=False)
    assert all(np.array_equal(before[k], rec[k], equal_nan=True) for k in rec)


def _check_crop_alignment(rec, batch):
    n = int(batch["seq_length"])
    idx = batch["residue_index"][:n]
    assert np.all(np.diff(idx) > 0)                                          # sequence order
    np.testing.assert_array_equal(batch["aatype"][:n], rec["aatype"][idx])
    np.testing.assert_array_equal(batch["pseudo_beta"][:n, 0], idx)          # targets cropped alike
    np.testing.assert_array_equal(batch["all_atom_positions"][:n], rec["all_atom_positions"][idx])
    for r in range(batch["msa"].shape[0]):
        np.testing.assert_array_equal(batch["true_msa"][r, 0, :n], batch["aatype"][:n])   # query row
        # every centre / extra row is a row of the record's MSA at the cropped columns
        full = {bytes(row) for row in np.ascontiguousarray(rec["msa"][:, idx])}
        n_c = int(batch["msa_mask"][r, :, 0].sum())
        n_e = int(batch["extra_msa_mask"][r, :, 0].sum())
        assert all(bytes(row) in full for row in batch["true_msa"][r, :n_c, :n])
        assert all(bytes(row) in full for row in batch["extra_msa"][r, :n_e, :n])
    for t in range(int(batch["template_mask"].sum())):
        k = int(batch["template_sum_probs"][t] / 10) - 1                      # which record template
        np.testing.assert_array_equal(batch["template_aatype"][t, :n], rec["template_aatype"][k, idx])


def test_crop_keeps_residue_arrays_aligned():
    cfg = tiny_af2().data  # crop 64 < L = 73
    rec = make_record()
    starts = set()
    for s in range(8):
        batch = make_af2_batch(rec, cfg, rng(s))
        assert int(batch["seq_length"]) == 64
        _check_crop_alignment(rec, batch)
        starts.add(int(batch["residue_index"][0]))
    assert len(starts) > 1


@pytest.mark.parametrize("num_res", [1, 20, 64, 200])
def test_lengths_around_the_crop(num_res):
    cfg = tiny_af2().data
    rec = make_record(num_res=num_res)
    batch = make_af2_batch(rec, cfg, rng(num_res))
    check_spec(batch, expected_spec(cfg, 64))
    n = min(num_res, 64)
    assert int(batch["seq_length"]) == n
    assert batch["seq_mask"][:n].all() and not batch["seq_mask"][n:].any()
    for k in ("msa_mask", "extra_msa_mask", "bert_mask", "cluster_profile"):
        assert not batch[k][:, :, n:].any(), k
    assert not batch["all_atom_mask"][n:].any() and not batch["atom14_gt_exists"][n:].any()
    _check_crop_alignment(rec, batch)


def test_eval_mode_keeps_full_length():
    cfg = tiny_af2().data
    long = make_record(num_res=100)
    batch = make_af2_batch(long, cfg, rng(0), train=False)
    check_spec(batch, expected_spec(cfg, 100))                                # no crop, no padding
    np.testing.assert_array_equal(batch["residue_index"], np.arange(100))
    np.testing.assert_array_equal(batch["template_sum_probs"][:2], [10, 20])  # the first templates
    short = make_af2_batch(make_record(), cfg, rng(0), train=False)
    check_spec(short, expected_spec(cfg, 73))
    cfg2 = dataclasses.replace(cfg, crop_size=80)
    check_spec(make_af2_batch(make_record(), cfg2, rng(0), train=False), expected_spec(cfg2, 80))


def test_single_sequence_and_no_templates():
    cfg = af2_initial().data
    rec = make_record(depth=1, num_templates=0, resolution=np.nan)
    batch = make_af2_batch(rec, cfg, rng(3))
    check_spec(batch, expected_spec(cfg, 256))
    assert float(batch["resolution"]) == 0.0
    assert not batch["template_mask"].any() and not batch["template_all_atom_mask"].any()
    assert batch["msa_mask"][:, 0, :73].all() and not batch["msa_mask"][:, 1:].any()
    assert not batch["extra_msa_mask"].any()
    # a lone centre: its profile is its own (masked) row
    prof = batch["cluster_profile"][:, 0, :73]
    np.testing.assert_array_equal(prof.argmax(-1), batch["msa"][:, 0, :73])
    assert np.all(prof.max(-1) == 1.0)


def test_template_subsampling():
    cfg = tiny_af2().data  # max 2 templates
    rec = make_record(num_templates=5)
    counts, picked = [], set()
    for s in range(60):
        b = make_af2_batch(rec, cfg, rng(s))
        n = int(b["template_mask"].sum())
        counts.append(n)
        probs = b["template_sum_probs"][:n]
        assert len(set(probs.tolist())) == n and set(probs.tolist()) <= {10.0, 20.0, 30.0, 40.0, 50.0}
        assert not b["template_sum_probs"][n:].any() and not b["template_all_atom_mask"][n:].any()
        picked.update(probs.tolist())
    # OpenFold random_crop_to_size: start uniform in [0, T] -> 0, 1 or 2 templates
    assert set(counts) == {0, 1, 2} and picked == {10.0, 20.0, 30.0, 40.0, 50.0}


def test_spatial_crop_is_a_neighbourhood():
    cfg = dataclasses.replace(tiny_af2().data, crop_size=24, spatial_crop_prob=1.0)
    rec = make_record()
    ca = rec["all_atom_positions"][:, rc.atom_order["CA"]].astype(np.float64)
    for s in range(5):
        b = make_af2_batch(rec, cfg, rng(s))
        sel = b["residue_index"][: int(b["seq_length"])]
        assert len(sel) == 24 and np.all(np.diff(sel) > 0)
        _check_crop_alignment(rec, b)
        others = np.setdiff1d(np.arange(73), sel)
        d = np.linalg.norm(ca[:, None] - ca[None], axis=-1)
        # some selected residue has every selected residue at least as close as every other one
        assert any(d[c, sel].max() <= d[c, others].min() for c in sel)
    # unobserved CAs come last; no observed CA at all -> None
    mask = np.zeros(73, bool)
    mask[:5] = True
    got = spatial_crop(ca, mask, 10, rng(0))
    assert set(range(5)) <= set(got.tolist())
    assert spatial_crop(ca, np.zeros(73, bool), 10, rng(0)) is None


# --------------------------------------------------------------------------------------------------
# MSA sampling
# --------------------------------------------------------------------------------------------------


def test_block_deletion_keeps_the_query():
    cfg = af2_initial().data
    for n in (1, 2, 5, 100, 1024):
        for s in range(20):
            keep = block_delete_rows(n, cfg, rng(n, s))
            assert keep[0] == 0 and np.all(np.diff(keep) > 0) and keep[-1] < n
    keep = block_delete_rows(1000, cfg, rng(0))
    assert 50 < len(keep) < 700  # 5 blocks of 30%
    rec = make_record()
    for s in range(5):
        b = make_af2_batch(rec, cfg, rng(s))
        np.testing.assert_array_equal(b["true_msa"][:, 0, :73], np.broadcast_to(rec["aatype"], (4, 73)))


def test_masked_msa_statistics():
    cfg = af2_initial().data
    rec = make_record()
    selected = masked_token = real = 0
    changed_same = 0
    for s in range(6):
        b = make_af2_batch(rec, cfg, rng(s))
        real_mask = b["msa_mask"] > 0
        bert = b["bert_mask"] > 0
        assert not (bert & ~real_mask).any()
        assert np.array_equal(b["msa"][~bert], b["true_msa"][~bert])          # only selected change
        real += int(real_mask.sum())
        selected += int(bert.sum())
        masked_token += int((b["msa"][bert] == rc.MASK_ID).sum())
        changed_same += int((b["msa"][bert] == b["true_msa"][bert]).sum())
    assert selected / real == pytest.approx(0.15, abs=0.01)
    assert masked_token / selected == pytest.approx(0.7, abs=0.02)
    # same (10%) plus uniform/profile draws that happen to equal the original
    assert 0.1 < changed_same / selected < 0.2


def test_mask_msa_profile_draws_come_from_the_column():
    cfg = dataclasses.replace(af2_initial().data, masked_msa_replace_fraction=1.0, masked_msa_uniform_prob=0.0,
                              masked_msa_profile_prob=1.0, masked_msa_same_prob=0.0)
    col = np.array([[3], [3], [3], [5]], dtype=np.int8)  # column profile: 3 (3/4), 5 (1/4)
    true = np.zeros((2000, 1), np.int8)
    out, bert = mask_msa(true, lambda c, g: col[g.integers(0, 4, c.shape[0]), c], cfg, rng(0))
    assert bert.all() and set(np.unique(out).tolist()) == {3, 5}
    assert (out == 3).mean() == pytest.approx(0.75, abs=0.04)


def _random_msa(g, n, num_res, gap=0.2, mask=0.0):
    x = g.integers(0, 21, (n, num_res)).astype(np.int8)
    x[g.random((n, num_res)) < gap] = rc.GAP_ID
    x[g.random((n, num_res)) < mask] = rc.MASK_ID
    return x


@pytest.mark.parametrize("n_c,n_e,num_res", [(1, 1, 1), (3, 5, 7), (16, 17, 64), (124, 300, 73), (9, 40, 301)])
def test_fast_agreement_equals_reference(n_c, n_e, num_res):
    g = rng(n_c, n_e, num_res)
    centres = _random_msa(g, n_c, num_res, mask=0.1)
    extras = _random_msa(g, n_e, num_res)
    query = centres[0].copy()
    query[query > 20] = 0
    ref = _agreement_reference(centres, extras)
    np.testing.assert_array_equal(cluster_agreement(centres, extras, query), ref)
    # the query only chooses the split: any row (even gaps or mask tokens) gives the same counts
    np.testing.assert_array_equal(cluster_agreement(centres, extras, extras[0]), ref)


def test_fast_agreement_on_real_msa():
    msa, _ = real_msa()
    g = rng(7)
    order = np.concatenate([[0], 1 + g.permutation(msa.shape[0] - 1)])
    centres, extras = msa[order[:124]].copy(), msa[order[124:]]
    centres[g.random(centres.shape) < 0.1] = rc.MASK_ID
    np.testing.assert_array_equal(cluster_agreement(centres, extras, msa[0]), _agreement_reference(centres, extras))


def test_summarize_clusters_matches_openfold_formula():
    g = rng(11)
    n_c, n_e, num_res = 6, 40, 9
    centres, extras = _random_msa(g, n_c, num_res, mask=0.1), _random_msa(g, n_e, num_res)
    cdel = g.integers(0, 4, (n_c, num_res)).astype(np.uint16)
    edel = g.integers(0, 30, (n_e, num_res)).astype(np.uint16)
    assign = np.argmax(_agreement_reference(centres, extras), axis=1)
    prof = np.zeros((n_c, num_res, 23), np.float32)
    dmean = np.zeros((n_c, num_res), np.float32)
    summarize_clusters(centres, cdel, extras, edel, assign, prof, dmean)
    onehot = np.eye(23)
    msa_sum = onehot[centres].copy()
    del_sum = cdel.astype(np.float64)
    cnt = np.ones(n_c)
    for e, c in enumerate(assign):
        msa_sum[c] += onehot[extras[e]]
        del_sum[c] += edel[e]
        cnt[c] += 1
    np.testing.assert_allclose(prof, msa_sum / cnt[:, None, None], rtol=1e-6)
    np.testing.assert_allclose(dmean, np.arctan(del_sum / cnt[:, None] / 3) * 2 / np.pi, rtol=1e-5, atol=1e-7)


def test_cluster_profile_and_deletion_features():
    cfg = af2_initial().data
    rec = make_record()
    b = make_af2_batch(rec, cfg, rng(5))
    m = b["msa_mask"] > 0
    sums = b["cluster_profile"].sum(-1)
    np.testing.assert_allclose(sums[m], 1.0, atol=1e-5)
    assert not sums[~m].any()
    # the centre's own (masked) residue is always in its profile
    prof_at_own = np.take_along_axis(b["cluster_profile"], b["msa"][..., None].astype(np.int64), -1)[..., 0]
    assert (prof_at_own[m] > 0).all()
    for p in ("msa", "extra"):
        has, val = b[f"{p}_has_deletion"], b[f"{p}_deletion_value"]
        assert np.array_equal(has > 0, val > 0) and val.max() < 1.0
    assert b["extra_has_deletion"].any() and (b["cluster_deletion_mean"] >= 0).all()
    # extra rows: real rows are contiguous from the top, masks are 0/1
    em = b["extra_msa_mask"][:, :, 0]
    n_e = em.sum(1).astype(int)
    assert all(em[r, :n].all() and not em[r, n:].any() for r, n in enumerate(n_e))


# --------------------------------------------------------------------------------------------------
# AF2Batch
# --------------------------------------------------------------------------------------------------


def test_af2batch_zero_copy_collate_and_to():
    cfg = tiny_af2().data
    rec = make_record()
    feats = [make_af2_batch(rec, cfg, rng(s)) for s in range(3)]
    b = AF2Batch.from_numpy(feats[0])
    assert b.msa.data_ptr() == feats[0]["msa"].ctypes.data                  # no copy
    assert set(b.as_dict()) == set(feats[0])
    stacked = collate([AF2Batch.from_numpy(f) for f in feats])
    assert stacked.cluster_profile.shape == (3, 2, 16, 64, 23) and stacked.seq_length.shape == (3,)
    assert torch.equal(stacked.msa[1], torch.from_numpy(feats[1]["msa"]))
    moved = stacked.to("cpu")
    assert isinstance(moved, AF2Batch) and torch.equal(moved.aatype, stacked.aatype)
    if torch.cuda.is_available():
        assert stacked.pin_memory().msa.is_pinned()
    with pytest.raises(KeyError):
        AF2Batch.from_numpy({**feats[0], "bogus": np.zeros(1)})
    no_targets = {k: v for k, v in feats[0].items() if k not in TARGETS}
    assert AF2Batch.from_numpy(no_targets).pseudo_beta is None


def test_clamped_fape_flag_follows_its_probability():
    cfg = tiny_af2().data
    record = make_record(num_res=40, depth=50)
    flags = [float(make_af2_batch(record, cfg, np.random.default_rng(s))["use_clamped_fape"]) for s in range(200)]
    assert set(flags) <= {0.0, 1.0} and 0.8 < np.mean(flags) < 0.97
    assert float(make_af2_batch(record, cfg, np.random.default_rng(0), train=False)["use_clamped_fape"]) == 1.0
