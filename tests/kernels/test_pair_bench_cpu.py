"""The pair-op benchmark driver (foldforge.bench.ops_pair) on the CPU: tiny shapes, reference and
torch.compile, plus our Triton path through the interpreter; rows in the schema of foldforge.bench.ops."""
import json

import pytest
import torch

from foldforge.bench.ops import MODES
from foldforge.bench.ops_pair import (
    run_outer_product_mean_benchmark,
    run_triangle_mult_benchmark,
)
from tests.kernels._triton_env import interpreter_scope

ROW_KEYS = {"bench", "op", "impl", "design", "chosen", "mode", "shape", "dims", "dtype", "median_ms", "p20_ms",
            "host_ms", "p80_ms", "reps", "peak_mem_mib", "gpu", "torch", "triton", "python", "commit", "date"}


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    yield from interpreter_scope()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU schema path; the GPU run is the benchmark")
@pytest.mark.parametrize("op", ["triangle_mult", "outer_product_mean"])
def test_quick_rows(op, tmp_path, monkeypatch):
    monkeypatch.setenv("FOLDFORGE_COMMIT", "abc1234")
    compile_ = torch.compile     # inductor's C++ build of fwd+bwd takes ~40 s on the CPU; the schema is the point
    monkeypatch.setattr(torch, "compile", lambda f, **kw: compile_(f, **{**kw, "backend": "aot_eager"}))
    run = run_triangle_mult_benchmark if op == "triangle_mult" else run_outer_product_mean_benchmark
    results = tmp_path / "pair.jsonl"
    logged = []
    rows = run(quick=True, dtype="fp32", results=results, include_ours=True, log=logged.append)
    assert rows == [json.loads(line) for line in results.read_text().splitlines()]
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in ("triton", "reference", "compile")
                                                      for m in MODES}
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["op"] == op and r["commit"] == "abc1234" and r["dtype"] == "fp32" and r["shape"] == "quick"
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["median_ms"] > 0
    assert len(logged) == len(rows)
