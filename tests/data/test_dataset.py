"""Dataset, sampler and loader over the prepared bundled sample."""
import numpy as np
import pytest
import torch

from foldforge.data.batch import AF2Batch
from foldforge.data.dataset import AF2Dataset, SampleKey, WeightedChainSampler, make_loader, sampling_weights
from foldforge.data.prepare import PrepareOptions, SAMPLE_DIR, run_prepare
from foldforge.presets import af2_initial, tiny_af2


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "cache"
    run_prepare(PrepareOptions(mmcif_dir=str(SAMPLE_DIR / "mmcif"), out=str(out),
                               msa_dir=str(SAMPLE_DIR / "alignments"), allow_missing_msa=True,
                               template_mmcif_dir=str(SAMPLE_DIR / "mmcif"), workers=2), progress=False)
    return out


def _equal(a: AF2Batch, b: AF2Batch) -> bool:
    da, db = a.as_dict(), b.as_dict()
    return da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def test_sample_is_reproducible_from_seed_and_key(cache_dir):
    cfg = tiny_af2().data
    ds = AF2Dataset(cache_dir, cfg, seed=7)
    i = ds.cache.index_of("4zey_A")
    a, b = ds[SampleKey(i, 3, 0)], AF2Dataset(cache_dir, cfg, seed=7)[SampleKey(i, 3, 0)]
    assert _equal(a, b)
    assert not _equal(a, ds[SampleKey(i, 4, 0)])                       # another epoch
    assert not _equal(a, ds[SampleKey(i, 3, 1)])                       # another draw
    assert not _equal(a, AF2Dataset(cache_dir, cfg, seed=8)[SampleKey(i, 3, 0)])  # another seed


def test_mlperf_shapes_from_real_records(cache_dir):
    cfg = af2_initial().data
    ds = AF2Dataset(cache_dir, cfg, seed=0)
    batch = ds[ds.cache.index_of("3u8v_A")].as_dict()
    assert batch["msa"].shape == (4, 124, 256) and batch["extra_msa"].shape == (4, 1024, 256)
    assert batch["template_aatype"].shape == (4, 256)
    assert batch["aatype"].shape == (256,) and int(batch["seq_mask"].sum()) == 93


def test_sampling_weights_follow_af2():
    cfg = af2_initial().data
    entries = [{"length": 100, "cluster_id": "a"}, {"length": 300, "cluster_id": "a"},
               {"length": 1000, "cluster_id": None}]
    w = sampling_weights(entries, cfg)
    np.testing.assert_allclose(w, [256 / 512 / 2, 300 / 512 / 2, 1.0])


def test_sampler_shards_one_global_sequence():
    w = np.array([1.0, 2.0, 3.0, 4.0])
    full = WeightedChainSampler(w, num_samples=40, seed=1).keys(epoch=2)
    shards = [WeightedChainSampler(w, num_samples=40, seed=1, rank=r, world_size=3).keys(epoch=2) for r in range(3)]
    assert sorted(k for s in shards for k in s) == sorted(full)
    assert full != WeightedChainSampler(w, num_samples=40, seed=1).keys(epoch=3)
    counts = np.bincount([k.index for k in WeightedChainSampler(w, num_samples=4000, seed=0).keys(0)], minlength=4)
    np.testing.assert_allclose(counts / 4000, w / w.sum(), atol=0.03)


def test_loader_with_workers_matches_direct_indexing(cache_dir):
    cfg = tiny_af2().data
    ds = AF2Dataset(cache_dir, cfg, seed=3)
    sampler = WeightedChainSampler(sampling_weights(ds.cache.entries, cfg), num_samples=4, seed=3)
    batches = list(make_loader(ds, sampler, batch_size=2, num_workers=2, pin_memory=False))
    assert len(batches) == 2 and batches[0].as_dict()["msa"].shape[0] == 2
    keys = list(sampler)
    direct = ds[keys[1]].as_dict()
    got = batches[0].as_dict()
    for k in direct:
        assert torch.equal(got[k][1], direct[k]), k
