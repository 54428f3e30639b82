"""`foldforge bench ops --quick` runs on the CPU (reference and torch.compile only) and writes one row per
measurement with the documented schema; the markdown report is built from those rows."""
import json

import pytest
import torch

from foldforge.bench.ops import MODES, OPS, format_report
from foldforge.cli import main

# the quick shapes of foldforge.bench.shapes: [rows, C(, C_out | n C)] or the dropout update's dims
DIMS = {"layer_norm": [64, 32], "ln_linear": [64, 32, 16], "transition": [64, 32, 64], "gated_output": [64, 32, 16],
        "dropout": [4, 8, 16]}
ROW_KEYS = {"bench", "op", "impl", "design", "chosen", "mode", "shape", "dims", "dtype", "median_ms", "p20_ms",
            "host_ms", "p80_ms", "reps", "peak_mem_mib", "gpu", "torch", "triton", "python", "commit", "date"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU schema path; the GPU run is the benchmark")
def test_bench_ops_quick_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLDFORGE_COMMIT", "abc1234")
    results, report = tmp_path / "ops.jsonl", tmp_path / "report.md"
    assert main(["bench", "ops", "--quick", "--results", str(results), "--report", str(report)]) == 0
    every = [json.loads(line) for line in results.read_text().splitlines()]
    # `--op all` also runs attention (+ SDPA, FlexAttention where available) and the pair ops; their own
    # tests check those rows (test_attention_bench_cpu.py, test_pair_bench_cpu.py)
    assert {r["op"] for r in every} == set(OPS) | {"attention", "triangle_mult", "outer_product_mean"}
    rows = [r for r in every if r["op"] in OPS]
    for op in OPS:
        got = {(r["impl"], r["mode"]) for r in rows if r["op"] == op}
        assert {(i, m) for i in ("reference", "compile") for m in MODES} <= got
    assert {r["impl"] for r in rows} == {"reference", "compile", "copy"}     # no Triton rows on the CPU
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["bench"] == "ops" and r["commit"] == "abc1234" and r["dtype"] == "bf16"
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["median_ms"] > 0
        assert r["dims"] == DIMS[r["op"]], r["op"]
    ln = [r for r in rows if r["op"] == "layer_norm"]
    assert all(r["gbps"] > 0 and r["pct_of_copy_bw"] > 0 for r in ln)
    text = report.read_text()
    assert all(f"### {op}" in text for op in OPS)
    assert text.startswith(format_report(rows))
    assert "### attention" in text and "### triangle_mult" in text and "### outer_product_mean" in text
