"""Dry run of the launch-parameter sweep of the pair and MLP kernels (foldforge.kernels._ops_tune) on the
Triton interpreter: tiny shapes, small candidate sets, a stand-in clock. Every op gets an entry per bucket,
tuned at the bucket's largest shape; each entry is what the op's config() returns once the table is
installed, and the op run from it matches the op run from its defaults (outputs and gradients); a
wrong-but-fast candidate is dropped; ``bench ops --tune`` merges the sweep into the table it writes."""
import json

import pytest
import torch

from foldforge.bench.ops import _inputs
from foldforge.bench.ops_pair import _opm_inputs, _trimul_inputs
from foldforge.bench.shapes import DropoutShape, OPMShape, OpShape, TransitionShape, TriMulShape
from foldforge.kernels import _dropout_triton, _gated_output_triton, _launch, _ops_tune
from foldforge.kernels import _outer_product_mean_triton, _transition_triton, _triangle_mult_triton, _tune
from foldforge.kernels.dropout import bias_dropout_residual_triton
from foldforge.kernels.gated_output import gated_output_triton
from foldforge.kernels.outer_product_mean import OPMParams, outer_product_mean_triton
from foldforge.kernels.transition import TransitionParams, transition_triton
from foldforge.kernels.triangle_mult import TriMulParams, triangle_multiplication_triton
from tests.kernels._triton_env import interpreter_scope

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a dry run of the sweep logic on the CPU; on the GPU the sweep itself runs")

CPU = torch.device("cpu")
SLUG = "interpreter"
BF16 = torch.bfloat16
# two shapes per bucket (the larger one is tuned); a second bucket for transition, gated output, dropout
SHAPES = {
    "triangle_mult": (TriMulShape("t6", "test", 6, 16, 16), TriMulShape("t8_in", "test", 8, 16, 16, "incoming")),
    "outer_product_mean": (OPMShape("o6", "test", 3, 6, 16, 8, 16), OPMShape("o8", "test", 4, 8, 16, 8, 16)),
    "transition": (TransitionShape("relu32", "test", 32, 32, 2, "relu"),
                   TransitionShape("relu48", "test", 48, 32, 2, "relu"),
                   TransitionShape("swiglu32", "test", 32, 16, 2, "swiglu")),
    "gated_output": (OpShape("g32", "test", 32, 32, 16), OpShape("g48", "test", 48, 32, 16),
                     OpShape("g32_wide", "test", 32, 16, 24)),
    "dropout": (DropoutShape("d_row", "test", (4, 8, 16), 0.25, -3),
                DropoutShape("d_row_small", "test", (2, 8, 16), 0.25, -3),
                DropoutShape("d_col", "test", (2, 6, 8, 32), 0.2, -2)),
}
EXPECTED = {   # bucket -> the tuned shape ("at")
    "triangle_mult": {"16x16": [1, 8, 8, 16, 16]},
    "outer_product_mean": {"8": [1, 4, 8, 16, 8, 16]},
    "transition": {"relu:32x64": [48, 32, 64], "swiglu:16x32": [32, 16, 32]},
    "gated_output": {"32x16": [48, 32, 16], "16x32": [32, 16, 24]},
    "dropout": {"16": [4, 8, 16], "32": [2, 6, 8, 32]},
}


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    yield from interpreter_scope()


class _Clock:
    """Stands in for :func:`_tune._time`: runs the call once and reports every later measurement as faster,
    so the search moves to the last valid candidate of each list (non-default choices get exercised)."""

    def __init__(self):
        self.n = 0

    def __call__(self, fn, rep=30):
        fn()
        self.n += 1
        return 1.0 / self.n


def _small_search(mp, max_candidates=3):
    """Tile moves only (num_warps/num_stages change nothing under the interpreter), one round, few
    candidates."""
    mp.setattr(_tune, "DEVICE", "cpu")
    mp.setattr(_tune, "_time", _Clock())
    for name, value in (("WARPS", ()), ("STAGES", ()), ("PROGRAMS", ()), ("ROUNDS", 1),
                        ("MAX_CANDIDATES", max_candidates)):
        mp.setattr(_ops_tune, name, value)


@pytest.fixture(scope="module")
def swept(_interpreter):
    logs = []
    with pytest.MonkeyPatch.context() as mp:
        _small_search(mp)
        frag = _ops_tune.sweep_ops(log=logs.append, shapes=SHAPES)
    assert not any("FAILED" in line for line in logs), [line for line in logs if "FAILED" in line]
    return frag, logs


@pytest.fixture
def installed():
    """Install a tuned table for the interpreter's 'GPU'; always restored."""
    def install(table):
        _launch.set_tuned_override(SLUG, table)
    try:
        yield install
    finally:
        _launch.set_tuned_override(SLUG, None)


def _shape(op, at):
    return next(s for s in SHAPES[op] if _at(op, s) == at)


def _at(op, s):
    return {"triangle_mult": lambda: [s.batch, s.length, s.length, s.c_z, s.c_hidden],
            "outer_product_mean": lambda: [s.batch, s.n_seq, s.length, s.c_m, s.c_hidden, s.c_z],
            "transition": lambda: [s.rows, s.c, s.n * s.c], "gated_output": lambda: [s.rows, s.c_in, s.c_out],
            "dropout": lambda: list(s.dims)}[op]()


def _config(op, s):
    """What the op's launcher reads from the tuned table at shape ``s``."""
    if op == "triangle_mult":
        return _triangle_mult_triton.config(CPU, s.c_z, s.c_hidden)
    if op == "outer_product_mean":
        return _outer_product_mean_triton.config(CPU, s.c_hidden)
    if op == "transition":
        return _transition_triton.config(CPU, s.c, s.n * s.c, s.activation == "swiglu")
    if op == "gated_output":
        return _gated_output_triton.config(CPU, s.c_in, s.c_out)
    return _dropout_triton._config(CPU, s.dims[-1])


def _default(op, s):
    if op == "triangle_mult":
        return _triangle_mult_triton.default_config(s.c_z, s.c_hidden)
    if op == "outer_product_mean":
        return _outer_product_mean_triton.default_config(s.c_hidden)
    if op == "transition":
        return _transition_triton.default_config(s.c, s.n * s.c, s.activation == "swiglu")
    if op == "gated_output":
        return _gated_output_triton.default_config(s.c_in, s.c_out)
    return {"BLOCK_R": 2048 // int(_dropout_triton.bucket(s.dims[-1])), "num_warps": 4, "programs_per_sm": 4}


def _run(op, s):
    """The op (autograd path, launch parameters from config()) on fixed inputs: output and every gradient."""
    if op == "triangle_mult":
        z, mask, *p = _trimul_inputs(s, BF16, CPU)
        y = triangle_multiplication_triton(z, mask, TriMulParams(*p), direction=s.direction)
        leaves = [z, *p]
    elif op == "outer_product_mean":
        m, mask, *p = _opm_inputs(s, BF16, CPU)
        y = outer_product_mean_triton(m, mask, OPMParams(*p))
        leaves = [m, *p]
    elif op == "transition":
        x, *p = _inputs(op, s, BF16, CPU)
        y = transition_triton(x, TransitionParams(*p), activation=s.activation)
        leaves = [t for t in (x, *p) if t is not None]
    elif op == "gated_output":
        leaves = list(_inputs(op, s, BF16, CPU))
        y = gated_output_triton(*leaves)
    else:
        leaves = list(_inputs(op, s, BF16, CPU))
        y = bias_dropout_residual_triton(*leaves, p=s.p, shared_dim=s.shared_dim,
                                         generator=torch.Generator().manual_seed(0))
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def _assert_close(got, want, name):
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.float(), b.float()
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert torch.isfinite(a).all() and err <= 1e-2 * scale + 1e-6, f"{name} [{i}]: {err} vs max {scale}"


def _kernel_configs(op, entry):
    """Per-kernel launch dicts of an entry (flat entries: the entry without its records)."""
    if op in ("outer_product_mean", "dropout"):
        return {op: {k: v for k, v in entry.items() if k not in ("ms", "at")}}
    return {k: v for k, v in entry.items() if k not in ("ms", "at")}


def test_fragment_meta(swept):
    frag, logs = swept
    assert frag["gpu"] == "interpreter" and "coordinate search" in frag["how"]
    assert {"torch", "date"} <= set(frag) and set(_ops_tune.OPS) <= set(frag)
    assert json.loads(json.dumps(frag)) == frag                   # plain JSON, as committed
    assert any("tuning at t8_in" in line for line in logs)


@pytest.mark.parametrize("op", _ops_tune.OPS)
def test_entry_per_bucket(swept, op):
    frag, _ = swept
    assert {k: e["at"] for k, e in frag[op].items()} == EXPECTED[op]
    for key, entry in frag[op].items():
        phases = {"triangle_mult": {"fwd", "bwd"}, "outer_product_mean": {"fwd"}, "transition": {"fwd", "bwd"},
                  "gated_output": {"fwd", "bwd"}, "dropout": {"fwd+bwd"}}[op]
        assert set(entry["ms"]) == {"default", "tuned"} and set(entry["ms"]["tuned"]) == phases
        s = _shape(op, entry["at"])
        default = _default(op, s)
        chosen = _kernel_configs(op, entry)
        default = default if op not in ("outer_product_mean", "dropout") else {op: default}
        assert set(chosen) == set(default)
        assert chosen != default, f"{op} {key}: the stand-in clock should have moved the search"
        for name, c in chosen.items():
            assert set(c) == set(default[name])   # the same launch parameters, no extra keys


@pytest.mark.parametrize("op", _ops_tune.OPS)
def test_tuned_table_accepted_and_matches_default(swept, installed, op):
    """Installed, the entries are what config() returns, and the op from them computes what it computes
    from its defaults (only tiling changes: outputs and gradients agree to accumulation-order rounding)."""
    frag, _ = swept
    for key, entry in frag[op].items():
        for s in (s for s in SHAPES[op] if _ops_tune.bucket_of(op, s) == key):
            want = _run(op, s)                           # no table for the interpreter: the defaults
            installed({op: frag[op]})
            cfg = _config(op, s)
            expect = {**entry, "BLOCK_C": int(key)} if op == "dropout" else entry
            assert cfg == expect, f"{op} {key}: config() did not return the tuned entry"
            _assert_close(_run(op, s), want, f"{op} {s.name}")
            installed(None)


def test_wrong_candidate_dropped(monkeypatch):
    """A candidate whose result differs from the default launch's is dropped even when it is the fastest;
    the fastest correct one is chosen."""
    _small_search(monkeypatch, max_candidates=12)
    real = _gated_output_triton.forward

    def forward(o, g, w, b, dtype, cfg=None):
        y = real(o, g, w, b, dtype, cfg)
        return y + 1 if cfg is not None and cfg["fwd"]["BLOCK_M"] != 64 else y   # wrong at other row tiles
    monkeypatch.setattr(_gated_output_triton, "forward", forward)
    logs = []
    s = OpShape("g32", "test", 32, 32, 16)
    key, entry = _ops_tune.tune_gated_output(s, log=logs.append)
    default = _gated_output_triton.default_config(32, 16)["fwd"]
    assert key == "32x16" and entry["fwd"]["BLOCK_M"] == 64 and entry["fwd"] != default
    wrong = [line for line in logs if " fwd " in line and "WRONG RESULT" in line]
    assert len(wrong) >= 2 and all("'BLOCK_M': 64" not in line for line in wrong)


def test_failing_candidate_skipped(monkeypatch):
    """A candidate that fails to launch (shared memory on the GPU) is skipped, the search goes on."""
    _small_search(monkeypatch, max_candidates=12)
    real = _transition_triton.forward

    def forward(*args, cfg=None):
        if cfg is not None and cfg["fwd"]["BLOCK_H"] != 64:
            raise RuntimeError("out of resource: shared memory")
        return real(*args, cfg=cfg)
    monkeypatch.setattr(_transition_triton, "forward", forward)
    logs = []
    key, entry = _ops_tune.tune_transition(TransitionShape("relu32", "test", 32, 32, 2, "relu"), log=logs.append)
    assert key == "relu:32x64" and entry["fwd"]["BLOCK_H"] == 64
    assert any("skipped (RuntimeError: out of resource" in line for line in logs)


def test_neighbours():
    c = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "programs_per_sm": 2}
    tiles = {"BLOCK_M": (16, 64), "BLOCK_N": (16, 64)}
    cands = _ops_tune.neighbours(c, tiles)
    assert cands[0] == c and len(cands) <= _ops_tune.MAX_CANDIDATES
    assert len({tuple(sorted(x.items())) for x in cands}) == len(cands)
    assert all(16 <= x["BLOCK_M"] <= 64 and 16 <= x["BLOCK_N"] <= 64 for x in cands)
    assert {"num_warps": 8} in [{k: v for k, v in x.items() if v != c[k]} for x in cands]
    assert any(x["BLOCK_M"] == 32 and x["BLOCK_N"] == 64 for x in cands)       # a two-parameter move
    assert all(x["BLOCK_M"] * x["BLOCK_N"] <= 2048 for x in
               _ops_tune.neighbours(c, tiles, valid=lambda x: x["BLOCK_M"] * x["BLOCK_N"] <= 2048))


def test_tune_ops_merges_the_sweep(tmp_path, monkeypatch):
    """``bench ops --tune``: the LayerNorm/ln_linear table and the sweep's ops in one written table; the
    process runs on the committed table with those ops replaced (attention keeps its committed entries)."""
    from foldforge.bench import ops
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_launch, "gpu_slug", lambda device: "test-gpu")
    monkeypatch.setattr(_tune, "tune_all", lambda *a, **k: {"gpu": "G", "how": "ln sweep",
                                                            "layer_norm_fwd": {"128": {"BLOCK_M": 32}}})
    frag = {"gpu": "G", "torch": "t", "date": "d", "how": "ops sweep",
            **{op: {"b": {"x": i}} for i, op in enumerate(_ops_tune.OPS)}}
    monkeypatch.setattr(_ops_tune, "sweep_ops", lambda log=print: frag)
    committed = {"evo_attention": {"d32-l512": {"fwd": {"BLOCK_M": 128}}}, "layer_norm_fwd": {"64": {"BLOCK_M": 8}}}
    _launch.set_tuned_override("test-gpu", committed)
    try:
        table = ops.tune_ops(tmp_path / "t.json", log=lambda m: None)
        assert json.loads((tmp_path / "t.json").read_text()) == table
        assert table["layer_norm_fwd"] == {"128": {"BLOCK_M": 32}} and table["how"] == "ln sweep; ops sweep"
        assert all(table[op] == frag[op] for op in _ops_tune.OPS)
        installed = _launch._table("test-gpu")
        assert installed == {**committed, **table} and "evo_attention" not in table
        assert installed["layer_norm_fwd"] == table["layer_norm_fwd"]     # the swept op replaces the committed
    finally:
        _launch.set_tuned_override("test-gpu", None)
