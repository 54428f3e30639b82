"""Whole-chain evaluation of a checkpoint on the bundled sample cache, and checkpoint loading."""
import csv
import dataclasses
import json
import math

import pytest
import torch

from foldforge.cli import main
from foldforge.data.dataset import AF2Dataset
from foldforge.eval.checkpoint_io import CheckpointError, latest_checkpoint, load_model
from foldforge.eval.evaluate import eval_batch, evaluate_model, run_evaluate
from foldforge.eval.metrics import chain_metrics

from .conftest import make_checkpoint

IDS = ["1psm_A", "2q2k_A", "1aap_A"]  # 38 residues; 70 with 25 unobserved; 56 (single sequence)
METRICS = ("lddt_ca", "lddt", "rmsd_ca", "distogram_acc", "mean_plddt")


def test_load_model_picks_ema_or_raw_weights(tiny_checkpoint, tmp_path):
    ema, cfg = load_model(tiny_checkpoint)
    raw, _ = load_model(tiny_checkpoint, weights="model")
    assert cfg.name == "tiny_af2" and not ema.training
    saved = torch.load(tiny_checkpoint, weights_only=True)
    name = "heads.plddt.linear_3.weight"
    assert torch.equal(ema.state_dict()[name], saved["ema"][name])
    assert torch.equal(raw.state_dict()[name], saved["model"][name])
    # the training loop's EMA object state ({"decay", "num_updates", "shadow"}) loads the same weights
    obj = make_checkpoint(tmp_path / "checkpoints" / "step_0000002.pt", ema_as_object=True)
    ema2, _ = load_model(obj)
    assert torch.equal(ema2.state_dict()[name], saved["ema"][name])
    # a run directory means its latest checkpoint
    make_checkpoint(tmp_path / "checkpoints" / "step_0000010.pt")
    assert latest_checkpoint(tmp_path).name == "step_0000010.pt"


def test_bad_checkpoints_are_clear_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "junk.pt")
    state = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({**state, "format": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        load_model(tmp_path / "future.pt")
    torch.save({k: v for k, v in state.items() if k != "ema"}, tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError, match="--weights model"):
        load_model(tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        load_model(tmp_path)


def test_evaluate_model_scores_whole_chains(sample_cache, tiny_checkpoint):
    model, cfg = load_model(tiny_checkpoint)
    model.train()  # evaluation switches to eval mode and back
    # a training-mode dataset whose crop (16) is shorter than every chain: evaluation still uses whole chains
    data_cfg = dataclasses.replace(cfg.data, crop_size=16)
    ds = AF2Dataset(sample_cache, data_cfg, train=True)
    res = evaluate_model(model, ds, num_recycles=0, device="cpu", ids=IDS)
    assert model.training
    assert list(res["per_chain"]) == IDS and res["num_chains"] == 3
    for key in ("mean_lddt_ca", "mean_lddt", "mean_rmsd_ca", "mean_distogram_acc"):
        assert math.isfinite(res[key])
    for rid in IDS:
        m = res["per_chain"][rid]
        record = ds.cache.load(ds.cache.index_of(rid))
        assert m["num_residues"] == record.meta["length"]
        assert m["num_observed_ca"] == record.meta["num_observed"]
        assert 0.0 <= m["lddt_ca"] <= 1.0 and 0.0 <= m["lddt"] <= 1.0 and 0.0 <= m["distogram_acc"] <= 1.0
        assert m["rmsd_ca"] > 0 and 0.0 < m["mean_plddt"] < 100.0
    assert res["mean_lddt_ca"] == pytest.approx(sum(m["lddt_ca"] for m in res["per_chain"].values()) / 3)
    assert res["per_chain"]["2q2k_A"]["num_observed_ca"] == 45  # unobserved residues are not scored


def test_padding_is_excluded(sample_cache, tiny_checkpoint):
    """A chain padded to 60 residues scores as without padding, and as the metrics computed directly from
    the unpadded model outputs."""
    model, cfg = load_model(tiny_checkpoint)
    rid, n = "1psm_A", 38
    ds = AF2Dataset(sample_cache, cfg.data, train=False)
    a = evaluate_model(model, ds, num_recycles=0, ids=[rid])["per_chain"][rid]
    b = evaluate_model(model, ds, num_recycles=0, ids=[rid], pad_to=60)["per_chain"][rid]
    assert eval_batch(ds, ds.cache.index_of(rid), pad_to=60).aatype.shape[-1] == 60
    batch = eval_batch(ds, ds.cache.index_of(rid))
    assert batch.aatype.shape[-1] == n  # whole chain at its own length, not padded to the crop (64)
    with torch.no_grad():
        out = model(batch.as_dict(), num_recycles=0)
    direct = chain_metrics(out["final_atom_positions"][0], out["final_atom_mask"][0], batch.all_atom_positions[0],
                           batch.all_atom_mask[0], batch.aatype[0], distogram_logits=out["distogram_logits"][0],
                           pseudo_beta=batch.pseudo_beta[0], pseudo_beta_mask=batch.pseudo_beta_mask[0],
                           plddt_logits=out["plddt_logits"][0])
    assert direct == pytest.approx(a)
    for key in METRICS:  # padding changes float rounding inside the model, nothing else
        assert b[key] == pytest.approx(a[key], abs=2e-3, rel=1e-3), key
    assert b["num_residues"] == a["num_residues"] == n


def test_evaluate_cli_prints_and_writes_tables(sample_cache, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval" / "table.csv"
    rc = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(sample_cache), "--out", str(out),
               "--num-recycles", "0", "--ids", "1psm_A", "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "1psm_A" in text and "mean" in text and "step 7" in text
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == ["1psm_A", "mean"]
    saved = json.loads((tmp_path / "eval" / "table.json").read_text())
    assert set(saved["per_chain"]) == {"1psm_A"} and saved["num_recycles"] == 0 and saved["step"] == 7
    assert float(rows[-1]["lddt_ca"]) == pytest.approx(saved["mean_lddt_ca"])
    raw = run_evaluate(tiny_checkpoint, sample_cache, weights="model", ids=["1psm_A"], num_recycles=0,
                       progress=False, device="cpu")
    assert raw["per_chain"]["1psm_A"]["lddt_ca"] != pytest.approx(saved["per_chain"]["1psm_A"]["lddt_ca"], abs=1e-9)
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(sample_cache),
                 "--ids", "9xyz_A", "--device", "cpu"]) == 2
    assert "9xyz_A" in capsys.readouterr().err
