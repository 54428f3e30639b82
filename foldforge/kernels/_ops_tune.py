"""Offline launch-parameter sweep for the pair and MLP kernels: triangle multiplicative update, outer product
mean, transition, gated output projection and the shared-dropout residual add.

Run on a GPU (``foldforge bench ops --tune OUT.json``, or :func:`sweep_ops`); returns a fragment
``{op: {bucket: entry}}`` to merge into ``tuned/<gpu-slug>.json`` (DESIGN.md convention 6: tuned sizes are
committed data, read by each op's ``config()`` through :func:`_launch.tuned`, never autotuned at import or
launch). Buckets are each op's own (``bucket()``; dropout: the column tile ``BLOCK_C``); each is swept at
its largest canonical shape (:mod:`foldforge.bench.shapes`, by element count), bf16 activations and fp32
master weights built as the benchmark builds them.

Method: coordinate search from the op's default launch parameters, one kernel at a time. A kernel's
candidates are its current best with one parameter changed (a tile size halved or doubled within caps that
keep its register tiles sensible; ``num_warps`` in :data:`WARPS`, ``num_stages`` in :data:`STAGES`,
``programs_per_sm`` in :data:`PROGRAMS` where the kernel has one) or two (a tile reshaped at the same area,
or a larger tile with more warps / a smaller one with fewer), at most :data:`MAX_CANDIDATES`, the other
kernels held at their current best; the search re-centres on the winner for up to :data:`ROUNDS` rounds.
Each candidate runs the phase its kernel belongs to -- forward kernels the forward call, backward kernels
the backward call on one saved forward -- and is checked against the default launch's result before it
is timed (:func:`_tune._best`: a wrong-but-fast candidate is dropped, one that does not compile, e.g. for
shared memory, is skipped); times are medians with the L2 flushed (:func:`_tune._time`). A phase whose
tuned launch measures slower than the default keeps the default. Entries hold the chosen per-kernel
parameters (outer product mean and dropout: one flat kernel config, as their ``config()`` reads it),
``"ms"`` (``{"default": {phase: ms}, "tuned": {phase: ms}}``) and ``"at"`` (the shape).

The outer product mean's backward launches its projection kernel with fixed tiles (no tuned entry), so
only its forward kernel is swept; the dropout kernel serves forward and backward with one config, timed as
forward + backward.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
from itertools import combinations
from typing import Callable

import torch

from foldforge.bench import shapes as _shapes
from foldforge.kernels import _launch, _tune

OPS = ("triangle_mult", "outer_product_mean", "transition", "gated_output", "dropout")
SHAPES = {"triangle_mult": _shapes.TRIANGLE_MULT_SHAPES, "outer_product_mean": _shapes.OPM_SHAPES,
          "transition": _shapes.TRANSITION_SHAPES, "gated_output": _shapes.GATED_OUTPUT_SHAPES,
          "dropout": _shapes.DROPOUT_SHAPES}
WARPS = (4, 8)
STAGES = (2, 3)
PROGRAMS = (1, 2, 4)
MAX_CANDIDATES = 12     # per kernel and round, the current best included
ROUNDS = 2
_BF16 = torch.bfloat16

Phase = tuple[Callable[[dict], object], tuple[str, ...]]   # run(cfg) -> outputs, the kernels it launches


# ---------------------------------------------------------------- candidates and the search
def neighbours(c: dict, tiles: dict[str, tuple[int, int]], valid: Callable[[dict], bool] | None = None,
               limit: int | None = None) -> list[dict]:
    """``c`` first, then ``c`` with one launch parameter changed, then with two; every tile in
    ``tiles[name] = (lo, hi)``, ``valid`` true; deduplicated, at most ``limit`` (:data:`MAX_CANDIDATES`)."""
    one, two = [], []
    for key, values in (("num_warps", WARPS), ("num_stages", STAGES), ("programs_per_sm", PROGRAMS)):
        if key in c:
            one += [{**c, key: v} for v in values if v != c[key]]
    for p in tiles:
        one += [{**c, p: c[p] * 2}, {**c, p: c[p] // 2}]
    for a, b in combinations(tiles, 2):          # the same tile area, the other aspect
        two += [{**c, a: c[a] * 2, b: c[b] // 2}, {**c, a: c[a] // 2, b: c[b] * 2}]
    if "num_warps" in c and WARPS:               # a larger tile with more warps, a smaller one with fewer
        for p in tiles:
            two += [{**c, p: c[p] * 2, "num_warps": max(WARPS)}, {**c, p: c[p] // 2, "num_warps": min(WARPS)}]

    def ok(n):
        return all(lo <= n[p] <= hi for p, (lo, hi) in tiles.items()) and (valid is None or valid(n))
    out = [c] + [n for n in one + two if ok(n)]
    out = [dict(t) for t in dict.fromkeys(tuple(sorted(n.items())) for n in out)]
    return out[:limit or MAX_CANDIDATES]


def _clamp(c: dict, tiles: dict[str, tuple[int, int]]) -> dict:
    """``c`` with its tiles inside their caps (a tile the kernel clips anyway starts at the clipped size)."""
    return {**c, **{p: min(max(c[p], lo), hi) for p, (lo, hi) in tiles.items()}}


def search(label: str, base: dict, phases: dict[str, Phase], tiles: dict[str, dict],
           valid: dict[str, Callable[[dict], bool]] | None = None, log=print) -> tuple[dict, dict]:
    """Coordinate search over the kernels of ``base`` (``{kernel: launch dict}``, the default); returns
    the chosen config and ``{"default": {phase: ms}, "tuned": {phase: ms}}``."""
    cfg = {k: _clamp(v, tiles[k]) if k in tiles else v for k, v in copy.deepcopy(base).items()}
    times: dict = {"default": {}, "tuned": {}}
    for phase, (run, kernels) in phases.items():
        ref = run(base)
        _tune._sync()
        times["default"][phase] = _tune._time(lambda run=run: run(base))
        for name in kernels:
            for _ in range(ROUNDS):
                cands = neighbours(cfg[name], tiles[name], (valid or {}).get(name))
                best, _ms = _tune._best(f"{label} {name}", cands,
                                        lambda c, run=run, name=name: run({**cfg, name: c}), ref, log)
                if best is None or best == cfg[name]:
                    break
                cfg[name] = best
        ms = _tune._time(lambda run=run: run(cfg))
        if ms > times["default"][phase]:         # no better than the default as a whole: keep the default
            log(f"  {label} {phase}: tuned {ms:.4f} ms vs default {times['default'][phase]:.4f} ms, default kept")
            cfg.update({k: copy.deepcopy(base[k]) for k in kernels})
            ms = times["default"][phase]
        times["tuned"][phase] = ms
    log(f"  {label}: " + ", ".join(f"{p} {times['default'][p]:.4f} -> {times['tuned'][p]:.4f} ms" for p in phases))
    return cfg, {k: {p: round(v, 4) for p, v in t.items()} for k, t in times.items()}


def _detach(ts) -> list:
    return [None if t is None else t.detach() for t in ts]


def _dev() -> torch.device:
    return torch.device(_tune.DEVICE)


# ---------------------------------------------------------------- per op
def tune_triangle_mult(s, log=print) -> tuple[str, dict]:
    """:class:`~foldforge.bench.shapes.TriMulShape` ``s``: the four kernels' launch parameters."""
    from foldforge.bench.ops_pair import _trimul_inputs
    from foldforge.kernels import _triangle_mult_triton as T
    z, mask, *params = _detach(_trimul_inputs(s, _BF16, _dev()))
    k, c, outgoing = s.c_z, s.c_hidden, s.direction == "outgoing"
    key, base = T.bucket(k, c), T.default_config(k, c)
    bk, bc = max(16, _launch.next_pow2(k)), max(16, _launch.next_pow2(c))

    def fwd(cfg):
        return T.forward(z, mask, params, outgoing, 1e-5, cfg)
    saved = fwd(base)
    dy = torch.randn(saved[0].shape, generator=torch.Generator().manual_seed(1)).to(_dev(), _BF16)

    def bwd(cfg):
        dz, grads = T.backward(dy, z, mask, params, *saved[1:], outgoing, cfg)
        return (dz, *grads)
    rows = (16, 128)
    tiles = {"proj_fwd": {"BLOCK_M": rows, "BLOCK_C": (16, bc)}, "out_fwd": {"BLOCK_M": rows, "BLOCK_N": (16, bk)},
             "out_bwd": {"BLOCK_M": rows, "BLOCK_N": (16, bk)}, "proj_bwd": {"BLOCK_M": rows, "BLOCK_C": (16, bc)}}
    cfg, ms = search(f"triangle_mult {key}", base, {"fwd": (fwd, ("proj_fwd", "out_fwd")),
                                                    "bwd": (bwd, ("out_bwd", "proj_bwd"))}, tiles, log=log)
    return key, {**cfg, "ms": ms, "at": [s.batch, s.length, s.length, k, c]}


def tune_outer_product_mean(s, log=print) -> tuple[str, dict]:
    """:class:`~foldforge.bench.shapes.OPMShape` ``s``: the forward outer-product kernel (flat entry)."""
    from foldforge.bench.ops_pair import _opm_inputs
    from foldforge.kernels import _outer_product_mean_triton as O
    m, mask, *params = _detach(_opm_inputs(s, _BF16, _dev()))
    key, base = O.bucket(s.c_hidden), {"opm": O.default_config(s.c_hidden)}
    cp = int(key)
    area = 2 * 128 * 128        # the [BI*C, BJ*C] fp32 accumulator: at most twice the default's at C = 32

    def fwd(cfg):
        return O.forward(m, mask, params, 1e-3, 1e-5, cfg["opm"])
    tiles = {"opm": {"BI": (max(1, 16 // cp), max(1, 256 // cp)), "BJ": (max(1, 16 // cp), max(1, 256 // cp)),
                     "BLOCK_S": (16, 64), "BLOCK_N": (16, min(128, max(16, _launch.next_pow2(s.c_z)))),
                     "GROUP": (2, 32)}}
    # the output projection's dot needs BI*BJ >= 16 rows
    valid = {"opm": lambda c: 16 <= c["BI"] * c["BJ"] and c["BI"] * c["BJ"] * cp * cp <= area}
    cfg, ms = search(f"outer_product_mean {key}", base, {"fwd": (fwd, ("opm",))}, tiles, valid, log)
    return key, {**cfg["opm"], "ms": ms, "at": [s.batch, s.n_seq, s.length, s.c_m, s.c_hidden, s.c_z]}


def tune_transition(s, log=print) -> tuple[str, dict]:
    """:class:`~foldforge.bench.shapes.TransitionShape` ``s``: forward, dx and weight-gradient kernels."""
    from foldforge.bench.ops import _inputs
    from foldforge.kernels import _transition_triton as TR
    x, lw, lb, w1, b1, w2, b2 = _detach(_inputs("transition", s, _BF16, _dev()))
    c, h, swiglu = s.c, s.n * s.c, s.activation == "swiglu"
    key, base = TR.bucket(c, h, swiglu), TR.default_config(c, h, swiglu)

    def fwd(cfg):
        return TR.forward(x, lw, lb, w1, b1, w2, b2, 1e-5, swiglu, x.dtype, cfg=cfg)
    y, mean, rstd = fwd(base)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(_dev(), y.dtype)

    def bwd(cfg):
        return TR.backward(dy, x, lw, lb, w1, b1, w2, mean, rstd, swiglu, need_dlw=True, need_dlb=True,
                           need_db1=b1 is not None, need_db2=b2 is not None, cfg=cfg)
    bc, bh = max(16, _launch.next_pow2(c)), max(16, _launch.next_pow2(h))
    rows = (16, max(16, min(128, 16384 // bc)))      # the [BLOCK_M, C] fp32 tiles held in registers
    hid = (16, min(bh, 128))
    tiles = {"fwd": {"BLOCK_M": rows, "BLOCK_H": hid}, "bwd_dx": {"BLOCK_M": rows, "BLOCK_H": hid},
             "bwd_dw": {"BLOCK_M": (16, 128), "BLOCK_H": (16, min(bh, max(16, 16384 // bc)))}}
    cfg, ms = search(f"transition {key}", base, {"fwd": (fwd, ("fwd",)), "bwd": (bwd, ("bwd_dx", "bwd_dw"))},
                     tiles, log=log)
    return key, {**cfg, "ms": ms, "at": [s.rows, c, h]}


def tune_gated_output(s, log=print) -> tuple[str, dict]:
    """:class:`~foldforge.bench.shapes.OpShape` ``s`` (c_in = K, c_out = N): the three kernels."""
    from foldforge.bench.ops import _inputs
    from foldforge.kernels import _gated_output_triton as G
    o, g, w, b = _detach(_inputs("gated_output", s, _BF16, _dev()))
    k, n = s.c_in, s.c_out
    key, base = G.bucket(k, n), G.default_config(k, n)

    def fwd(cfg):
        return G.forward(o, g, w, b, g.dtype, cfg=cfg)
    y = fwd(base)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(_dev(), y.dtype)

    def bwd(cfg):
        return G.backward(dy, o, g, w, need_db=True, cfg=cfg)
    bn, bk = max(16, _launch.next_pow2(n)), max(16, _launch.next_pow2(k))
    tiles = {"fwd": {"BLOCK_M": (16, 128), "BLOCK_N": (16, min(256, bn)), "BLOCK_K": (16, min(128, bk))},
             "bwd_dx": {"BLOCK_M": (16, 128), "BLOCK_N": (16, min(128, bn)), "BLOCK_K": (16, min(256, bk))},
             "bwd_dw": {"BLOCK_M": (16, 128), "BLOCK_N": (16, min(256, bn)), "BLOCK_K": (16, min(128, bk))}}
    cfg, ms = search(f"gated_output {key}", base, {"fwd": (fwd, ("fwd",)), "bwd": (bwd, ("bwd_dx", "bwd_dw"))},
                     tiles, log=log)
    return key, {**cfg, "ms": ms, "at": [s.rows, k, n]}


@contextlib.contextmanager
def _installed(op: str, key: str, entry: dict):
    """This GPU's table with ``entry`` at ``op``/``key`` for the duration (for ops that read their launch
    parameters only from the table), then the table in use before."""
    slug = _launch.gpu_slug(_dev())
    before = _launch._table(slug)
    table = dict(before)
    table[op] = {**table.get(op, {}), key: entry}
    _launch.set_tuned_override(slug, table)
    try:
        yield
    finally:
        _launch.set_tuned_override(slug, before)


def tune_dropout(s, log=print) -> tuple[str, dict]:
    """:class:`~foldforge.bench.shapes.DropoutShape` ``s``: the one kernel (flat entry), forward + backward."""
    from foldforge.bench.ops import _inputs
    from foldforge.kernels import _dropout_triton as D
    from foldforge.kernels.dropout import _shared_code
    x, u = _detach(_inputs("dropout", s, _BF16, _dev()))
    shared = _shared_code(u.dim(), s.shared_dim)
    seed = torch.tensor([20261122], dtype=torch.int64, device=_dev())
    dy = torch.randn(u.shape, generator=torch.Generator().manual_seed(1)).to(_dev(), u.dtype)
    key = D.bucket(u.shape[-1])
    bc = int(key)
    with _installed("dropout", key, {}):          # an empty entry: the kernel's own defaults
        default = D._config(_dev(), u.shape[-1])
    base = {"dropout": {p: default[p] for p in ("BLOCK_R", "num_warps", "programs_per_sm")}}

    def run(cfg):
        with _installed("dropout", key, cfg["dropout"]):
            return D.forward(x, u, seed, s.p, shared), D.backward(dy, seed, s.p, shared)
    tiles = {"dropout": {"BLOCK_R": (max(1, 256 // bc), max(1, 16384 // bc))}}
    cfg, ms = search(f"dropout {key}", base, {"fwd+bwd": (run, ("dropout",))}, tiles, log=log)
    return key, {**cfg["dropout"], "ms": ms, "at": list(s.dims)}


# ---------------------------------------------------------------- sweep
def bucket_of(op: str, s) -> str:
    """The table key ``op``'s ``config()`` looks up for canonical shape ``s``."""
    if op == "triangle_mult":
        from foldforge.kernels._triangle_mult_triton import bucket
        return bucket(s.c_z, s.c_hidden)
    if op == "outer_product_mean":
        from foldforge.kernels._outer_product_mean_triton import bucket
        return bucket(s.c_hidden)
    if op == "transition":
        from foldforge.kernels._transition_triton import bucket
        return bucket(s.c, s.n * s.c, s.activation == "swiglu")
    if op == "gated_output":
        from foldforge.kernels._gated_output_triton import bucket
        return bucket(s.c_in, s.c_out)
    from foldforge.kernels._dropout_triton import bucket
    return bucket(s.dims[-1])


def elements(op: str, s) -> int:
    """Elements of the op's main activation at shape ``s`` (the largest shape of a bucket is tuned)."""
    if op == "triangle_mult":
        return s.batch * s.length ** 2 * s.c_z
    if op == "outer_product_mean":
        return s.batch * s.n_seq * s.length * s.c_m
    if op == "transition":
        return s.rows * s.c
    if op == "gated_output":
        return s.rows * s.c_in
    n = 1
    for d in s.dims:
        n *= d
    return n


def _tuner(op: str) -> Callable:
    return {"triangle_mult": tune_triangle_mult, "outer_product_mean": tune_outer_product_mean,
            "transition": tune_transition, "gated_output": tune_gated_output, "dropout": tune_dropout}[op]


def sweep_ops(ops=OPS, log: Callable[[str], None] = print, shapes: dict | None = None) -> dict:
    """Tune every bucket of each op in ``ops`` at its largest shape (``shapes[op]``, default :data:`SHAPES`);
    returns ``{op: {bucket: entry}, "gpu", "torch", "date", "how"}``. A bucket whose default launch fails
    is logged and left out."""
    shapes = {**SHAPES, **(shapes or {})}
    frag: dict = {"gpu": torch.cuda.get_device_name() if _tune.DEVICE == "cuda" else "interpreter",
                  "torch": torch.__version__, "date": dt.date.today().isoformat(),
                  "how": "foldforge.kernels._ops_tune.sweep_ops; bf16 activations, fp32 weights; per bucket the "
                         "largest canonical shape; coordinate search per kernel from the default launch; "
                         "'ms' = median per phase (default / tuned) with L2 flushed"}
    for op in ops:
        largest: dict = {}
        for s in shapes[op]:
            key = bucket_of(op, s)
            if key not in largest or elements(op, s) > elements(op, largest[key]):
                largest[key] = s
        table = {}
        for key, s in largest.items():
            log(f"{op} bucket {key}: tuning at {s.name}")
            try:
                got, entry = _tuner(op)(s, log)
            except Exception as e:   # noqa: BLE001 -- the default launch itself failed: report, go on
                log(f"{op} bucket {key}: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:120]}), left out")
                continue
            table[got] = entry
        frag[op] = table
    return frag
