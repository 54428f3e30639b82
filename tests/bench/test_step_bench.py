"""`foldforge bench step` runs real training steps of the tiny preset on CPU and writes a results row."""
import json

from foldforge.cli import main


def test_bench_step_row(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["prepare", "--out", str(cache), "--quiet", "--workers", "1"]) == 0
    results = tmp_path / "r.jsonl"
    assert main(["bench", "step", "--preset", "tiny_af2", "--data", str(cache), "--steps", "2", "--warmup", "1",
                 "--recycles", "1", "--results", str(results)]) == 0
    row = json.loads(results.read_text().splitlines()[-1])
    assert row["oom"] is False and row["step_s_median"] > 0 and row["parameters"] == 103114
    assert row["num_recycles"] == 1 and row["crop"] == 64 and row["kernels"]["attention"] == "reference"
    assert set(row["loss_last"]) >= {"fape_backbone", "lddt_ca", "loss"}
