"""Short real training runs on the bundled sample (CPU): the `foldforge train` smoke run, the NaN guard."""
import json
import math

import pytest
import torch

from foldforge.cli import main
from foldforge.eval.checkpoint_io import load_model
from foldforge.train import checkpoint as ckpt
from foldforge.train import loop
from foldforge.train.metrics import read_metrics


def test_foldforge_train_smoke(sample_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(sample_cache), "--out", str(run), "--max-steps", "3", "--no-progress",
                 "--set", "train.checkpoint_every=2"]) == 0
    out = capsys.readouterr().out
    assert "done: 3 steps" in out and "train lDDT-Ca" in out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["name"] == "tiny_af2" and cfg["train"]["max_steps"] == 3
    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert {"loss", "fape_backbone", "lddt_ca", "lr", "grad_norm", "step_time", "samples_per_s",
                "data_wait_s", "num_recycles", "skipped"} <= set(r)
        assert math.isfinite(r["loss"]) and r["skipped"] is False and 0 <= r["num_recycles"] <= 1
    assert train[0]["lr"] == pytest.approx(1e-3 / 20)   # tiny_af2: warm-up over 20 steps
    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [0, 3] and len(evals[0]["per_chain"]) == 1   # 10% of 12 chains
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 3]
    state = torch.load(run / "checkpoints" / "step_0000003.pt", weights_only=True)
    assert state["step"] == 3 and state["data"] == {"epoch": 0, "index": 3}
    model, _ = load_model(run, weights="ema")   # the evaluation side reads our checkpoints
    torch.testing.assert_close(model.state_dict(), state["ema"]["shadow"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["val_lddt_ca_end"] == evals[-1]["mean_lddt_ca"]
    # unknown override keys are a clear error, not a traceback
    assert main(["train", "--data", str(sample_cache), "--out", str(tmp_path / "r2"), "--set", "train.lrr=1"]) == 1
    assert "did you mean lr" in capsys.readouterr().err


def _nan_loss_at(monkeypatch, bad_steps: set[int]):
    """Make af2_loss return NaN on the given (1-based) steps; grad_accum = 1, one call per step."""
    calls = {"n": 0}
    real = loop.af2_loss

    def loss(outputs, batch, cfg):
        calls["n"] += 1
        total, terms = real(outputs, batch, cfg)
        if calls["n"] in bad_steps:
            total = total * float("nan")
        return total, terms

    monkeypatch.setattr(loop, "af2_loss", loss)


def _run(sample_cache, out, steps, extra=()):
    return loop.run(data=str(sample_cache), out=str(out), max_steps=steps, progress=False,
                    overrides=["train.val_fraction=0", "train.checkpoint_every=1", "train.keep_checkpoints=20",
                               "train.num_workers=0", *extra])


def test_nonfinite_loss_skips_the_update(sample_cache, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {3})
    summary = _run(sample_cache, tmp_path / "run", 4)
    assert summary["nonfinite_skipped"] == 1
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["skipped"] for r in rows] == [False, False, True, False]
    assert rows[2]["loss"] is None and [r["nonfinite_total"] for r in rows] == [0, 0, 1, 1]
    # no periodic checkpoint of the skipped step; the update after it starts from step 2's weights
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [1, 2, 4]


def test_nonfinite_in_a_row_stops_with_the_last_good_checkpoint(sample_cache, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, set(range(3, 100)))
    with pytest.raises(loop.TrainingStopped, match="3 non-finite steps in a row") as e:
        _run(sample_cache, tmp_path / "run", 10, ["train.max_nonfinite_in_a_row=3"])
    assert "step_0000002.pt" in str(e.value)
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and all(r["skipped"] for r in rows[2:])
    path, state = ckpt.load_latest(tmp_path / "run")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    # the CLI reports it as an error with the message
    monkeypatch.setattr(loop, "af2_loss", lambda o, b, c: (torch.tensor(float("nan"), requires_grad=True),
                                                          {"loss": torch.tensor(float("nan"))}))
    assert main(["train", "--data", str(sample_cache), "--out", str(tmp_path / "r2"), "--max-steps", "5",
                 "--no-progress", "--set", "train.max_nonfinite_in_a_row=2", "train.val_fraction=0"]) == 1


def test_target_lddt_stops_and_reports_time_to_target(sample_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(sample_cache), "--out", str(run), "--max-steps", "6", "--no-progress",
                 "--target-lddt", "0.0", "--set", "train.eval_every=2", "train.num_workers=0"]) == 0
    assert "target lDDT-Ca 0.0: reached at step 2 after" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["time_to_target"]["step"] == 2
    assert summary["time_to_target"]["wall_s"] > 0
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert main(["train", "--data", str(sample_cache), "--out", str(tmp_path / "r2"), "--target-lddt", "0.5",
                 "--set", "train.val_fraction=0"]) == 1
    assert "needs validation" in capsys.readouterr().err


def test_training_chains_evaluated_and_used_as_target(sample_cache, tmp_path, capsys):
    """train.eval_train_chains scores whole training chains with the EMA weights beside validation;
    train.target_split=train makes their mean the --target-lddt criterion."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(sample_cache), "--out", str(run), "--max-steps", "2", "--no-progress",
                 "--target-lddt", "0.0", "--set", "train.eval_every=1", "train.num_workers=0",
                 "train.eval_train_chains=2", "train.target_split=train"]) == 0
    assert "target lDDT-Ca 0.0: reached at step 1 after" in capsys.readouterr().out
    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [0, 1]
    for e in evals:
        assert len(e["train_per_chain"]) == 2 and len(e["per_chain"]) == 1
        assert set(e["train_per_chain"]).isdisjoint(e["per_chain"])       # training chains, not validation
        vals = [c["lddt_ca"] for c in e["train_per_chain"].values()]
        assert e["train_mean_lddt_ca"] == pytest.approx(sum(vals) / 2) and 0.0 <= e["train_mean_lddt_ca"] <= 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_eval_lddt_ca_end"] == evals[-1]["train_mean_lddt_ca"]
    assert summary["time_to_target"]["mean_lddt_ca"] == evals[-1]["train_mean_lddt_ca"]
    assert main(["train", "--data", str(sample_cache), "--out", str(tmp_path / "r2"), "--target-lddt", "0.5",
                 "--set", "train.target_split=train"]) == 1
    assert "needs training chains to evaluate" in capsys.readouterr().err


def test_bad_train_value_is_an_error_before_the_run_directory_is_written(sample_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(sample_cache), "--out", str(run), "--max-steps", "1", "--no-progress",
                 "--set", "train.target_split=holdout"]) == 1
    assert "train.target_split must be 'val' or 'train', not 'holdout'" in capsys.readouterr().err
    assert not run.exists()   # nothing half-written: the same --out works once the value is fixed
