"""The attention benchmark driver on the CPU: tiny shapes, reference / SDPA / ours through the Triton
interpreter; rows in the schema of foldforge.bench.ops, the markdown report, and a dry run of the block-size
sweep (the measurement itself needs the GPU)."""
import json

import pytest
import torch

from foldforge.bench.ops import MODES
from foldforge.bench.ops_attention import PROFILE_MODES, format_attention_report, run_attention_benchmark
from foldforge.bench.shapes import QUICK_ATTENTION_SHAPES
from foldforge.kernels import _attention_tune, _tune
from tests.kernels._triton_env import interpreter_scope

ROW_KEYS = {"bench", "op", "impl", "design", "chosen", "mode", "shape", "dims", "dtype", "median_ms", "p20_ms",
            "host_ms", "p80_ms", "reps", "peak_mem_mib", "gpu", "torch", "triton", "python", "commit", "date"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="checks the CPU schema path; on the GPU this is the benchmark itself")


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    yield from interpreter_scope()


def test_quick_rows_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLDFORGE_COMMIT", "abc1234")
    results = tmp_path / "ops.jsonl"
    logs = []
    rows = run_attention_benchmark(quick=True, results=results, include_ours=True, warmup_ms=0, log=logs.append)
    assert rows == [json.loads(line) for line in results.read_text().splitlines()]
    for s in QUICK_ATTENTION_SHAPES:
        got = {(r["impl"], r["design"], r["mode"]) for r in rows if r["shape"] == s.name}
        for impl, design in (("triton", "deterministic"), ("triton", "atomic"), ("reference", None),
                             ("sdpa", None)):
            assert {(impl, design, m) for m in MODES} <= got
        prof = {r["mode"] for r in rows if r["shape"] == s.name and r["design"] == "profile"}
        assert prof <= set(PROFILE_MODES) and "kernel:fwd" in prof
        assert ("kernel:dbias" in prof) == s.bias
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["op"] == "attention" and r["commit"] == "abc1234" and r["dtype"] == "bf16"
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["median_ms"] > 0
        if r["impl"] == "triton" and r["design"] != "profile":
            assert r["chosen"] == (r["design"] == "deterministic")      # the default path with no tuned entry
    assert any("flex" in line for line in logs)                         # the GPU-only baselines say why not
    text = format_attention_report(rows)
    assert "### attention" in text and "ours deter ms" in text and "kernel:dbias" in text


def test_sweep_dry_run(tmp_path, monkeypatch):
    """The sweep's logic on the interpreter: every kernel's candidates checked and 'timed', a fragment
    written with an entry per bucket that config() accepts."""
    monkeypatch.setattr(_tune, "DEVICE", "cpu")
    monkeypatch.setattr(_attention_tune, "TILES", ((16, 16), (32, 16)))
    monkeypatch.setattr(_attention_tune, "LAUNCH", ((4, 2),))
    out = tmp_path / "attn.json"
    frag = _attention_tune.sweep(QUICK_ATTENTION_SHAPES, out, log=lambda m: None, device="cpu")
    assert json.loads(out.read_text()) == frag
    table = frag["evo_attention"]
    assert set(table) == {"d16-l16"}                    # both quick shapes fall in one bucket
    entry = table["d16-l16"]
    for name in ("fwd", "dq", "dkdv", "dbias"):
        assert entry[name]["BLOCK_M"] in (16, 32) and entry[name]["num_warps"] == 4
    assert entry["dbias_mode"] in ("deterministic", "atomic") and "dkdv+atomic" in entry["ms"]
    assert entry["at"] == [1, 2, 16, 2, 16]             # the shape with the bias (more work per bucket)
