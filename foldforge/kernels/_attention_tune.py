"""Offline block-size sweep for the attention kernels (:mod:`foldforge.kernels._attention_triton`).

Run on a GPU (``foldforge.bench.ops_attention.tune_attention`` or :func:`sweep`); writes a JSON fragment
``{"evo_attention": {bucket: entry}}`` to merge into ``tuned/<gpu-slug>.json`` (DESIGN.md convention 6:
tuned sizes are committed data, never autotuned at import or launch). Buckets are
:func:`_attention_triton.bucket` (padded head dim x next power of two of L); each is swept at its largest
canonical shape. Every kernel (forward, dq, dk/dv, deterministic dbias, dk/dv with atomics) is swept on its
own, each candidate checked against the default launch's result first (a wrong-but-fast candidate is
dropped), then timed with the L2 flushed (:func:`foldforge.kernels._tune._time`). ``dbias_mode`` is the
faster of ``dkdv + dbias`` and ``dkdv+atomic`` at the chosen tiles.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from foldforge.kernels import _tune
from foldforge.kernels._launch import next_pow2 as _next_pow2

TILES = ((32, 32), (64, 32), (32, 64), (64, 64), (128, 32), (128, 64), (64, 128), (128, 128))
LAUNCH = ((4, 2), (4, 3), (8, 2), (8, 3))          # (num_warps, num_stages)


def candidates(lq: int, lk: int) -> list[dict]:
    cap_m, cap_n = max(16, _next_pow2(lq)), max(16, _next_pow2(lk))
    out = []
    for bm, bn in TILES:
        if bm > 2 * cap_m or bn > 2 * cap_n:
            continue
        for nw, ns in LAUNCH:
            out.append({"BLOCK_M": min(bm, cap_m), "BLOCK_N": min(bn, cap_n), "num_warps": nw, "num_stages": ns})
    return [dict(t) for t in dict.fromkeys(tuple(sorted(c.items())) for c in out)]


def _inputs(shape, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    dims = (shape.batch, shape.rows, shape.length, shape.heads, shape.head_dim)
    q, k, v, do = ((torch.randn(*dims, generator=g)).to(device, torch.bfloat16) for _ in range(4))
    bias = (torch.randn(shape.batch, 1, shape.heads, shape.length, shape.length, generator=g) * 2).to(device) \
        if shape.bias else None
    return q, k, v, bias, do


def tune_shape(shape, log=print, device: str = "cuda") -> dict:
    """The best launch parameters of every kernel at one shape, and the faster bias-gradient path."""
    from foldforge.kernels import _attention_triton as T
    q, k, v, bias, do = _inputs(shape, device)
    P = T.Problem(q, k, v, bias, None, shape.head_dim ** -0.5)
    base = T.default_config(shape.head_dim)
    caps = (max(16, _next_pow2(P.LQ)), max(16, _next_pow2(P.LK)))
    for name in ("fwd", "dq", "dkdv", "dbias"):
        base[name] = {**base[name], "BLOCK_M": min(base[name]["BLOCK_M"], caps[0]),
                      "BLOCK_N": min(base[name]["BLOCK_N"], caps[1])}
    cands = candidates(P.LQ, P.LK)
    o_ref, lse, o_lo = T.run_fwd(P, base["fwd"])     # with the output residual, as a training step runs it
    entry: dict = {}
    best, ms = _tune._best(f"attn fwd {shape.name}", cands, lambda c: T.run_fwd(P, c)[0], o_ref, log)
    entry["fwd"], times = best or base["fwd"], {"fwd": ms}
    dq_ref, delta = T.run_dq(P, do, o_ref, o_lo, lse, base["dq"])
    best, ms = _tune._best(f"attn dq {shape.name}", cands, lambda c: T.run_dq(P, do, o_ref, o_lo, lse, c),
                           (dq_ref, delta), log)
    entry["dq"], times["dq"] = best or base["dq"], ms
    direct = bias is None or P.reduced_rows() == 1
    db = None if bias is None else torch.empty((P.BB, P.SB, P.H, P.LQ, P.LK), dtype=bias.dtype, device=device)
    mode = 1 if bias is not None and direct else 0
    kv_ref = T.run_dkdv(P, do, lse, delta, base["dkdv"], mode, db)
    best, ms = _tune._best(f"attn dkdv {shape.name}", cands,
                           lambda c: T.run_dkdv(P, do, lse, delta, c, mode, db), kv_ref, log)
    entry["dkdv"], times["dkdv"] = best or base["dkdv"], ms
    entry["dbias"] = dict(base["dbias"])
    entry["dbias_mode"] = T.DEFAULT_DBIAS_MODE
    if not direct:
        db_ref = T.run_dbias(P, do, lse, delta, torch.empty_like(db), base["dbias"]).clone()
        best, ms = _tune._best(f"attn dbias {shape.name}", cands,
                               lambda c: T.run_dbias(P, do, lse, delta, torch.empty_like(db), c), db_ref, log)
        entry["dbias"], times["dbias"] = best or base["dbias"], ms
        db32 = torch.zeros(db.shape, dtype=torch.float32, device=device)

        def atomic(c):
            db32.zero_()
            return T.run_dkdv(P, do, lse, delta, c, 2, db32)
        best, ms = _tune._best(f"attn dkdv+atomic {shape.name}", cands, atomic, kv_ref, log)
        if best is not None:
            times["dkdv+atomic"] = ms
            entry["dkdv_atomic"] = best
            det = times["dkdv"] + times["dbias"]
            # deterministic unless atomics are clearly faster (> 10%): reproducible gradients are worth a few %
            entry["dbias_mode"] = "atomic" if ms < 0.9 * det else "deterministic"
            log(f"  {shape.name}: dbias deterministic {det:.4f} ms (dkdv + dbias) vs atomic {ms:.4f} ms "
                f"-> {entry['dbias_mode']}")
    entry["ms"] = {k_: round(v_, 4) for k_, v_ in times.items()}
    entry["at"] = [shape.batch, shape.rows, shape.length, shape.heads, shape.head_dim]
    return entry


def largest_per_bucket(shapes: Iterable) -> dict:
    """``{bucket: shape}``: per tuned-table bucket the shape with the most work (rows x L^2)."""
    from foldforge.kernels import _attention_triton as T
    largest: dict[str, object] = {}
    for s in shapes:
        key = T.bucket(s.length, s.length, s.head_dim, s.batch * s.rows)
        work = s.batch * s.rows * s.length ** 2
        if key not in largest or work > largest[key].batch * largest[key].rows * largest[key].length ** 2:
            largest[key] = s
    return largest


def sweep(shapes: Iterable, out: Path | None = None, log: Callable[[str], None] = print,
          device: str = "cuda") -> dict:
    """Tune each bucket at its largest shape (by rows x L^2); returns and (with ``out``) writes
    ``{"evo_attention": {...}, "gpu", "torch", "date", "how"}``."""
    from foldforge.kernels import _attention_triton as T
    largest = largest_per_bucket(shapes)
    table = {}
    for key, s in largest.items():
        log(f"attention bucket {key}: tuning at {s.name}")
        table[key] = tune_shape(s, log, device)
    frag = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "interpreter", "torch": torch.__version__,
            "date": dt.date.today().isoformat(),
            "how": "foldforge.kernels._attention_tune.sweep; bf16 q/k/v, fp32 bias, no mask; per bucket the "
                   "largest canonical shape; 'ms' = median per kernel with L2 flushed",
            "evo_attention": table}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(frag, indent=1) + "\n")
    T.clear_config_cache()
    return frag
