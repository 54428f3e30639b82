"""``foldforge report``: PNG plots from a run's metrics.jsonl (synthetic, and from a real 3-step run)."""
import importlib.util
import json
import math
import shutil

import pytest

from foldforge.cli import main
from foldforge.data.prepare import SAMPLE_DIR, PrepareOptions, run_prepare
from foldforge.eval.report import PLOT_FILES, ReportError, read_metrics, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _synthetic_run(run_dir, steps=120, eval_every=40):
    """A metrics.jsonl with the schema the training loop writes, plus a truncated last line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"name": "tiny_af2"}))
    lines = []
    for step in range(0, steps + 1):
        if step % eval_every == 0:
            per_chain = {f"{i}abc_A": {"lddt_ca": min(1.0, 0.1 + 0.005 * step + 0.03 * i), "lddt": 0.2}
                         for i in range(1, 8)}
            mean = sum(c["lddt_ca"] for c in per_chain.values()) / len(per_chain)
            lines.append({"kind": "eval", "step": step, "mean_lddt_ca": mean, "mean_lddt": mean * 0.8,
                          "per_chain": per_chain, "eval_s": 1.0})
        if step == 0:
            continue
        decay = math.exp(-step / 60)
        lines.append({"kind": "train", "step": step, "loss": 60 * decay + 5, "fape_backbone": 0.9 * decay + 0.1,
                      "fape_sidechain": 0.8 * decay + 0.2, "supervised_chi": 0.7, "distogram": 4 * decay + 0.5,
                      "masked_msa": 3.0, "plddt": 3.9 * decay, "experimentally_resolved": 0.0,
                      "lddt_ca": 0.9 - 0.8 * decay, "lr": 1e-3, "grad_norm": 10.0, "step_time": 0.5,
                      "skipped": False})
    lines.append({"kind": "train", "step": 7, "loss": None, "skipped": True})  # a resumed step: last wins
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"kind": "train", "step": 121, "lo'
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_report_from_synthetic_metrics(tmp_path, capsys):
    run_dir = _synthetic_run(tmp_path / "run")
    train, evals = read_metrics(run_dir)
    assert len(train) == 120 and len(evals) == 4
    assert train[6]["skipped"] is True  # step 7 logged twice: the later record wins
    paths = write_report(run_dir)
    assert [p.name for p in paths] == list(PLOT_FILES)
    for p in paths:
        assert p.parent == run_dir / "plots" and p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    assert "malformed" in capsys.readouterr().err  # the truncated last line is reported, not fatal


def test_report_cli(tmp_path, capsys):
    run_dir = _synthetic_run(tmp_path / "run", steps=3, eval_every=3)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PLOT_FILES)
    assert all((run_dir / "plots" / name).is_file() for name in PLOT_FILES)


def test_report_without_metrics_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ReportError, match="metrics.jsonl not found"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="no train or eval records"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "no train or eval records" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


def test_report_before_the_first_evaluation(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 50.0, "lddt_ca": 0.1}))
    assert [p.name for p in write_report(run_dir)] == list(PLOT_FILES[:2])
    assert "no eval records" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("foldforge.train.loop") is None, reason="foldforge.train not present")
def test_report_from_a_real_three_step_run(tmp_path):
    """A real 3-step tiny_af2 run on two small sample chains (one trains, one is held out for evaluation)."""
    from foldforge.train.loop import run

    mmcif = tmp_path / "mmcif"
    mmcif.mkdir()
    for name in ("1psm.cif.gz", "1aap.pdb.gz"):
        shutil.copy(SAMPLE_DIR / "mmcif" / name, mmcif / name)
    run_prepare(PrepareOptions(mmcif_dir=str(mmcif), out=str(tmp_path / "cache"), workers=1,
                               msa_dir=str(SAMPLE_DIR / "alignments"), allow_missing_msa=True), progress=False)
    run_dir = tmp_path / "run"
    run(preset="tiny_af2", data=str(tmp_path / "cache"), out=str(run_dir), max_steps=3, progress=False,
        overrides=["train.eval_every=3", "train.checkpoint_every=3", "train.num_workers=0",
                   "data.max_recycling_iters=0", "data.crop_size=32"])
    train, evals = read_metrics(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3] and evals and evals[-1]["per_chain"]
    for p in write_report(run_dir):
        assert p.read_bytes()[:8] == PNG
    assert {p.name for p in (run_dir / "plots").glob("*.png")} >= set(PLOT_FILES)
