"""Record store: round trip, zero-copy reads, checksum and truncation detection, atomic writes."""
import json

import numpy as np
import pytest

from foldforge.data import cache as cache_mod
from foldforge.data.cache import CacheError, FeatureCache, read_record, write_manifest, write_record


def _arrays(rng):
    return {
        "aatype": rng.integers(0, 21, 37).astype(np.int8),
        "msa": rng.integers(0, 22, (5, 37)).astype(np.int8),
        "deletion_matrix": rng.integers(0, 900, (5, 37)).astype(np.uint16),
        "all_atom_positions": rng.normal(size=(37, 37, 3)).astype(np.float32),
        "template_sum_probs": np.zeros((0,), np.float32),
    }


def test_round_trip_is_exact_and_read_only(tmp_path):
    arrays = _arrays(np.random.default_rng(0))
    checksum = write_record(tmp_path / "r.ffr", "1abc_A", arrays, {"resolution": 2.1, "sequence": "ACD"})
    rec = read_record(tmp_path / "r.ffr")
    assert rec.id == "1abc_A" and rec.checksum == checksum and rec.meta["resolution"] == 2.1
    for k, v in arrays.items():
        assert rec[k].dtype == v.dtype and rec[k].shape == v.shape
        np.testing.assert_array_equal(rec[k], v)
        assert not rec[k].flags.writeable
    # arrays are views into a page-aligned mmap at 64-byte aligned offsets
    assert all(rec[k].ctypes.data % 64 == 0 for k in arrays if rec[k].size)
    assert list(tmp_path.iterdir()) == [tmp_path / "r.ffr"]  # no temp files left behind


def test_flipped_byte_is_detected(tmp_path):
    write_record(tmp_path / "r.ffr", "x", _arrays(np.random.default_rng(1)))
    raw = bytearray((tmp_path / "r.ffr").read_bytes())
    raw[-100] ^= 0xFF
    (tmp_path / "r.ffr").write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="checksum mismatch"):
        read_record(tmp_path / "r.ffr")
    read_record(tmp_path / "r.ffr", verify=False)  # explicit opt-out still maps it


def test_truncated_and_foreign_files(tmp_path):
    write_record(tmp_path / "r.ffr", "x", _arrays(np.random.default_rng(2)))
    raw = (tmp_path / "r.ffr").read_bytes()
    (tmp_path / "t.ffr").write_bytes(raw[:-10])
    with pytest.raises(CacheError, match="truncated"):
        read_record(tmp_path / "t.ffr")
    (tmp_path / "f.ffr").write_bytes(b"PK\x03\x04 not a record")
    with pytest.raises(CacheError, match="not a foldforge record"):
        read_record(tmp_path / "f.ffr")
    with pytest.raises(CacheError, match="missing"):
        read_record(tmp_path / "nope.ffr")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_record(tmp_path / "r.ffr", "x", _arrays(np.random.default_rng(3)))
    assert list(tmp_path.iterdir()) == []


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(TypeError, match="object"):
        write_record(tmp_path / "r.ffr", "x", {"names": np.array(["a", None], dtype=object)})


def test_feature_cache_checks_manifest_checksum(tmp_path):
    rng = np.random.default_rng(4)
    entries = []
    for rid in ("1abc_A", "2xyz_B"):
        rel = cache_mod.record_relpath(rid)
        c = write_record(tmp_path / rel, rid, _arrays(rng))
        entries.append({"id": rid, "path": rel, "checksum": c, "length": 37, "msa_depth": 5, "num_templates": 0})
    write_manifest(tmp_path, entries, [], {})
    fc = FeatureCache(tmp_path, verify="always")
    assert len(fc) == 2 and fc.load(fc.index_of("2xyz_B")).id == "2xyz_B"
    assert fc.verify_all() == []
    # a record rewritten behind the manifest's back no longer matches it
    write_record(tmp_path / entries[0]["path"], "1abc_A", _arrays(rng))
    with pytest.raises(CacheError, match="manifest"):
        fc.load(0)
    assert [i for i, _ in fc.verify_all()] == ["1abc_A"]
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(CacheError, match="format"):
        FeatureCache(tmp_path)


def test_missing_cache_has_a_clear_error(tmp_path):
    with pytest.raises(CacheError, match="foldforge prepare"):
        FeatureCache(tmp_path / "none")
