"""Checkpoints: atomic writes, keep-last-K, fallback past a corrupt newest file, pickle-free loading."""
import os
import random
import warnings

import numpy as np
import pytest
import torch

from foldforge.train import checkpoint as ckpt


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4, 4), value)}, "config": {"name": "x", "train": {"lr": 1e-3}},
            "data": {"epoch": 1, "index": 3}, "rng": ckpt.rng_state(), "betas": (0.9, 0.999)}


def test_save_is_atomic_and_keeps_last_k(tmp_path):
    for step in range(1, 6):
        path = ckpt.save_checkpoint(tmp_path, step, _state(step), keep=3)
        assert path.name == f"step_{step:07d}.pt"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4, 5]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000003.pt", "step_0000004.pt", "step_0000005.pt"]
    path, state = ckpt.load_latest(tmp_path)
    assert path.name == "step_0000005.pt" and state["step"] == 5 and state["format"] == ckpt.FORMAT
    assert torch.equal(state["model"]["w"], torch.full((4, 4), 5.0))


def test_checkpoints_load_with_weights_only(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 7, _state(1.0))
    state = torch.load(path, weights_only=True)   # raises on any pickled object
    assert state["data"] == {"epoch": 1, "index": 3} and tuple(state["betas"]) == (0.9, 0.999)


def test_a_write_that_dies_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, _state(1.0))
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, _state(2.0))
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000001.pt"]   # no partial file, no temp file
    # a temp file left by a SIGKILLed writer is never listed and is cleaned at the next start
    (tmp_path / "checkpoints" / ".step_0000002.pt.tmp123").write_bytes(b"junk")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    ckpt.clean_temp_files(tmp_path)
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000001.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage):
    ckpt.save_checkpoint(tmp_path, 1, _state(1.0))
    newest = ckpt.save_checkpoint(tmp_path, 2, _state(2.0))
    data = newest.read_bytes()
    newest.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(1000), "empty": b""}[damage])
    with pytest.warns(UserWarning, match="does not load"):
        path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 1 and path.name == "step_0000001.pt"
    newest.unlink()
    (tmp_path / "checkpoints" / "step_0000001.pt").write_bytes(b"")
    with pytest.warns(UserWarning):
        assert ckpt.load_latest(tmp_path) is None
    assert ckpt.load_latest(tmp_path / "nothing") is None


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()   # leaves a cached gaussian in numpy's legacy state
    random.gauss(0, 1)
    ckpt.save_checkpoint(tmp_path, 1, {"rng": ckpt.rng_state()})
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, state = ckpt.load_latest(tmp_path)
    ckpt.set_rng_state(state["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]
