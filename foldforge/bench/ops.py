"""Per-op benchmark (``foldforge bench ops``): LayerNorm, LayerNorm+Linear, the transition, the gated output
projection and the shared-dropout residual add at the canonical shapes.

For each shape, times forward, backward and forward+backward of three implementations -- ours
(``impl="triton"``; for ln_linear each design), the eager reference, and ``torch.compile`` of the reference
(compiled once per shape, warm) -- and records the peak extra memory of each. LayerNorm also gets a plain
``y.copy_(x)`` of the same bytes: the bandwidth ceiling its forward is compared against.

Timing (GPU): CUDA events around each call, the 50 MB L2 flushed before each (a 256 MiB memset, as
``triton.testing.do_bench`` does) so inputs come from HBM, and the GPU held in a ~2 ms sleep while the host
queues the call, so the events time the GPU work, not Python (see :class:`_Timer`); warm-up first; median
and p20/p80 over the repeats, plus the median host time to issue one call (``host_ms``). "bwd" re-runs
``autograd.grad(..., retain_graph=True)`` on one saved forward. Peak extra memory:
``max_memory_allocated`` during one call minus what was allocated before it (inputs excluded; for "fwd"
this includes what the op saves for backward). On the CPU (``--quick``) only the reference and compile run,
on tiny shapes, with wall-clock timing: a schema check, not a measurement.
"""
from __future__ import annotations

import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from foldforge.bench.data import _cpu_name, _git_commit, append_jsonl, triton_version
from foldforge.bench.shapes import (DROPOUT_SHAPES, GATED_OUTPUT_SHAPES, LAYER_NORM_SHAPES, LN_LINEAR_SHAPES,
                                    QUICK_DROPOUT_SHAPES, QUICK_GATED_OUTPUT_SHAPES, QUICK_LAYER_NORM_SHAPES,
                                    QUICK_LN_LINEAR_SHAPES, QUICK_TRANSITION_SHAPES, TRANSITION_SHAPES, OpShape)
from foldforge.kernels.dropout import bias_dropout_residual, bias_dropout_residual_reference
from foldforge.kernels.gated_output import gated_output, gated_output_reference
from foldforge.kernels import _launch
from foldforge.kernels.layer_norm import layer_norm, layer_norm_reference
from foldforge.kernels.ln_linear import ln_linear, ln_linear_reference
from foldforge.kernels.transition import TransitionParams, transition, transition_reference

OPS = ("layer_norm", "ln_linear", "transition", "gated_output", "dropout")
_SHAPES = {"layer_norm": (LAYER_NORM_SHAPES, QUICK_LAYER_NORM_SHAPES),
           "ln_linear": (LN_LINEAR_SHAPES, QUICK_LN_LINEAR_SHAPES),
           "transition": (TRANSITION_SHAPES, QUICK_TRANSITION_SHAPES),
           "gated_output": (GATED_OUTPUT_SHAPES, QUICK_GATED_OUTPUT_SHAPES),
           "dropout": (DROPOUT_SHAPES, QUICK_DROPOUT_SHAPES)}
MODES = ("fwd", "bwd", "fwd+bwd")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------- timing and memory
class _Timer:
    """GPU time of one call, with its inputs cold in L2 and the host out of the way.

    Before each timed call: a 256 MiB memset (flushes the 50 MB L2, as ``triton.testing.do_bench`` does)
    and a ~2 ms ``torch.cuda._sleep`` on the stream, so the host has queued every kernel of the call before
    the start event is reached. Without it the first H100 run (2026-11-21) timed host overhead, not the GPU:
    LayerNorm [147456, 128] 0.267 ms per call through our op vs 0.032 ms for its kernel alone, and
    0.22 ms for torch.compile's (AOTAutograd's Python wrapper). The host time to issue each call is recorded
    separately (``host_ms``): it is what an eager step without CUDA graphs pays when it exceeds the GPU time.
    """

    SLEEP_CYCLES = 4_000_000     # ~2 ms at the H100's 1.98 GHz boost clock

    def __init__(self, device: torch.device, warmup_ms: float, reps: int = 40):
        self.device, self.warmup_ms, self.reps = device, warmup_ms, reps
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda else None

    def __call__(self, fn: Callable[[], object]) -> dict[str, float]:
        if not self.cuda:
            fn()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return {**_quantiles(times), "host_ms": float(np.median(times))}
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n_warm = 0
        while n_warm < 3 or (time.perf_counter() - t0) * 1e3 < self.warmup_ms:
            fn()
            torch.cuda.synchronize()
            n_warm += 1
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        host = []
        for s, e in zip(starts, ends):
            self.flush.zero_()
            torch.cuda._sleep(self.SLEEP_CYCLES)
            s.record()
            h0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - h0) * 1e3)
            e.record()
            torch.cuda.synchronize()   # one call in flight at a time: the sleep covers this call alone
        return {**_quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)]),
                "host_ms": float(np.median(host))}

    def peak_mib(self, fn: Callable[[], object]) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del out
        return round(peak / 2**20, 3)


def _quantiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"median_ms": float(np.median(a)), "p20_ms": float(np.percentile(a, 20)),
            "p80_ms": float(np.percentile(a, 80)), "reps": len(ms)}


def allow_recompiles() -> None:
    """torch.compile once per shape: the default limit (8 graphs per code object) would stop recompiling."""
    dyn = torch._dynamo.config
    name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
    setattr(dyn, name, max(getattr(dyn, name), 64))


def op_meta(op: str, dtype: str, device: torch.device) -> dict:
    """The fields every ``bench ops`` row carries: op, dtype, GPU (or CPU) name, versions, commit, date."""
    return {"bench": "ops", "op": op, "dtype": dtype,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "torch": torch.__version__, "triton": triton_version(), "python": platform.python_version(),
            "commit": _git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------- inputs and implementations
def _dims(op: str, s) -> list[int]:
    if op == "transition":
        return [s.rows, s.c, s.n * s.c]
    if op == "dropout":
        return list(s.dims)
    return [s.rows, s.c_in] + ([s.c_out] if op != "layer_norm" else [])


def _inputs(op: str, s, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple:
    """Activations in ``dtype``, parameters in fp32 (master weights, as in mixed-precision training)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0, dt=torch.float32):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dt).requires_grad_()

    if op == "transition":
        h = s.n * s.c
        glu = s.activation == "swiglu"
        return (rnd(s.rows, s.c, scale=2.0, shift=0.5, dt=dtype), rnd(s.c, shift=1.0), rnd(s.c),
                rnd((2 if glu else 1) * h, s.c, scale=s.c ** -0.5), None if glu else rnd(h),
                rnd(s.c, h, scale=h ** -0.5), None if glu else rnd(s.c))
    if op == "gated_output":
        return (rnd(s.rows, s.c_in, dt=dtype), rnd(s.rows, s.c_in, scale=2.0, dt=dtype),
                rnd(s.c_out, s.c_in, scale=s.c_in ** -0.5), rnd(s.c_out))
    if op == "dropout":
        return rnd(*s.dims, dt=dtype), rnd(*s.dims, dt=dtype)

    x = rnd(s.rows, s.c_in, scale=2.0, shift=0.5, dt=dtype)
    lw, lb = rnd(s.c_in, shift=1.0), rnd(s.c_in)
    if op == "layer_norm":
        return x, lw, lb
    return x, lw, lb, rnd(s.c_out, s.c_in, scale=s.c_in ** -0.5), rnd(s.c_out)


def _functions(op: str, impl: str, s=None) -> Callable:
    if op == "transition":
        act = s.activation
        ref = lambda x, *p: transition_reference(x, TransitionParams(*p), activation=act)   # noqa: E731
        ours = lambda x, *p: transition(x, TransitionParams(*p), activation=act, impl="triton")   # noqa: E731
    elif op == "gated_output":
        ref = gated_output_reference
        ours = lambda o, g, w, b: gated_output(o, g, w, b, impl="triton")   # noqa: E731
    elif op == "dropout":
        kw = dict(p=s.p, shared_dim=s.shared_dim, training=True)
        ref = lambda x, u: bias_dropout_residual_reference(x, u, **kw)   # noqa: E731
        ours = lambda x, u: bias_dropout_residual(x, u, **kw, impl="triton")   # noqa: E731
    elif op == "layer_norm":
        ref = layer_norm_reference
        ours = lambda x, w, b: layer_norm(x, w, b, impl="triton")   # noqa: E731
    else:
        ref = lambda x, lw, lb, w, b: ln_linear_reference(x, lw, lb, w, b)   # noqa: E731
        ours = lambda x, lw, lb, w, b: ln_linear(x, lw, lb, w, b, impl="triton")   # noqa: E731
    if impl == "reference":
        return ref
    if impl == "compile":
        return torch.compile(ref, fullgraph=True, dynamic=False)
    return ours


def _force_design(device: torch.device, s: OpShape, design: str) -> dict:
    """Pin the ln_linear design for this shape (the rest of the tuned entry is kept); returns the table
    in use before, for :func:`_launch.set_tuned_override` to restore."""
    from foldforge.kernels import _ln_linear_triton as T
    slug = _launch.gpu_slug(device)
    _launch.tuned(device, "ln_linear", "")           # loads the committed table for this GPU
    before = _launch._TABLES.get(slug, {})
    table = json.loads(json.dumps(before))
    key = T.bucket(s.c_in, s.c_out)
    entry = table.setdefault("ln_linear", {}).get(key) or T.default_config(s.c_in, s.c_out)
    entry["design"] = design
    table["ln_linear"][key] = entry
    _launch.set_tuned_override(slug, table)
    return before


def _measure(op: str, impl: str, s: OpShape, dtype: torch.dtype, timer: _Timer) -> list[dict]:
    """fwd, bwd and fwd+bwd of one implementation at one shape: one dict per mode."""
    ins = _inputs(op, s, dtype, timer.device)
    f = _functions(op, impl, s)
    y = f(*ins)
    dy = torch.randn_like(y)
    out = []
    leaves = [t for t in ins if t is not None]
    grad = lambda yy, **kw: torch.autograd.grad(yy, leaves, dy, **kw)   # noqa: E731
    fns = {
        "fwd": lambda: f(*ins),
        "bwd": lambda: grad(y, retain_graph=True),
        "fwd+bwd": lambda: grad(f(*ins)),
    }
    for mode in MODES:
        t = timer(fns[mode])
        out.append({"mode": mode, **t, "peak_mem_mib": timer.peak_mib(fns[mode])})
    return out


def _copy_row(s: OpShape, dtype: torch.dtype, timer: _Timer) -> dict:
    x = torch.randn(s.rows, s.c_in, device=timer.device).to(dtype)
    y = torch.empty_like(x)
    return {"mode": "fwd", **timer(lambda: y.copy_(x)), "peak_mem_mib": 0.0}


# ---------------------------------------------------------------- driver
def run_ops_benchmark(op: str, shape_set: str = "all", *, quick: bool = False, dtype: str = "bf16",
                      results: Path | None = None, warmup_ms: float = 25.0, reps: int = 40,
                      designs: bool = True, include_ours: bool | None = None,
                      log: Callable[[str], None] = print) -> list[dict]:
    """Measure ``op`` (one of :data:`OPS`) at ``shape_set`` ("af2" | "af3" | "all") and append
    one JSONL row per (impl, mode, shape) to ``results``. Returns the rows. ``include_ours`` (default: on
    a GPU) adds the Triton rows; on the CPU that means the interpreter (a dry run of this driver)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    full, small = _SHAPES[op]
    shapes = small if quick else tuple(s for s in full if shape_set == "all" or s.family == shape_set)
    torch_dtype = _DTYPES[dtype]
    allow_recompiles()
    timer = _Timer(device, warmup_ms, reps)
    meta = op_meta(op, dtype, device)
    rows = []
    for s in shapes:
        dims = _dims(op, s)
        variants: list[tuple[str, str | None]] = [("reference", None), ("compile", None)]
        chosen = None
        if on_gpu if include_ours is None else include_ours:
            if op != "ln_linear":
                variants.insert(0, ("triton", None))
            else:   # each design of ours; "chosen" marks the one the committed table dispatches to
                from foldforge.kernels import _ln_linear_triton as T
                chosen = T.config(device, s.c_in, s.c_out)["design"]
                fused_ok = _launch.next_pow2(s.c_in) <= T.FUSED_MAX_K
                for d in (["hybrid", "fused"] if designs and fused_ok else [chosen]):
                    variants.insert(0, ("triton", d))
        for impl, design in variants:
            if design is not None:
                before = _force_design(device, s, design)
            for m in _measure(op, impl, s, torch_dtype, timer):
                rows.append({**meta, "impl": impl, "design": design,
                             "chosen": None if design is None else design == chosen,
                             "shape": s.name, "dims": dims, **m})
            if design is not None:
                _launch.set_tuned_override(_launch.gpu_slug(device), before)
        if op == "layer_norm":
            rows.append({**meta, "impl": "copy", "design": None, "chosen": None, "shape": s.name, "dims": dims,
                         **_copy_row(s, torch_dtype, timer)})
            _add_bandwidth(rows, s, torch_dtype)
        for r in rows[-(3 * len(variants) + (op == "layer_norm")):]:
            log(f"{op:10s} {s.name:16s} {r['impl']:9s} {r.get('design') or '':6s} {r['mode']:7s} "
                f"{r['median_ms']:9.4f} ms  peak {r['peak_mem_mib']} MiB")
    if results is not None:
        append_jsonl(results, rows)
    return rows


def _add_bandwidth(rows: list[dict], s: OpShape, dtype: torch.dtype) -> None:
    """LayerNorm rows of this shape get achieved GB/s (fwd: read x + write y; bwd: read x, dy + write dx)
    and that as a percentage of the copy's GB/s (read + write of the same tensor)."""
    el = torch.empty(0, dtype=dtype).element_size() * s.rows * s.c_in
    here = [r for r in rows if r["shape"] == s.name]
    copy = next(r for r in here if r["impl"] == "copy")
    copy_gbps = 2 * el / copy["median_ms"] / 1e6
    for r in here:
        moved = {"fwd": 2 * el, "bwd": 3 * el, "fwd+bwd": 5 * el}[r["mode"]]
        r["bytes"] = moved
        r["gbps"] = float(f"{moved / r['median_ms'] / 1e6:.4g}")
        r["pct_of_copy_bw"] = float(f"{100 * r['gbps'] / copy_gbps:.4g}")


# ---------------------------------------------------------------- report
def _ours(rows: list[dict]) -> list[dict]:
    """Our rows as dispatched: LayerNorm's Triton rows, ln_linear's chosen design."""
    return [r for r in rows if r["impl"] == "triton" and r.get("chosen") in (None, True)]


def _pick(rows, shape, impl, mode, design=None):
    for r in rows:
        if r["shape"] == shape and r["impl"] == impl and r["mode"] == mode and \
                (design is None or r.get("design") == design):
            return r
    return None


def format_report(rows: list[dict]) -> str:
    """Markdown tables (one per op) from the rows of one run: times, speed-ups of ours over eager and
    over torch.compile (t_other / t_ours; > 1 means ours is faster), peak extra memory, and for
    LayerNorm the bandwidth as a share of a plain copy."""
    out = []
    for op in OPS:
        rs = [r for r in rows if r["op"] == op]
        if not rs:
            continue
        ours = _ours(rs)
        shapes = list(dict.fromkeys(r["shape"] for r in rs))
        out.append(f"### {op}\n")
        head = ("| shape | dims | mode | ours ms | eager ms | compile ms | x eager | x compile "
                "| peak MiB ours / eager / compile | host ms ours / eager / compile |")
        sep = "|---|---|---|---:|---:|---:|---:|---:|---|---|"
        if op == "layer_norm":
            head += " ours GB/s | % of copy |"
            sep += "---:|---:|"
        else:
            head += " design |"
            sep += "---|"
        out += [head, sep]
        for shape in shapes:
            for mode in MODES:
                o = next((r for r in ours if r["shape"] == shape and r["mode"] == mode), None)
                e, c = _pick(rs, shape, "reference", mode), _pick(rs, shape, "compile", mode)
                if e is None:
                    continue

                def ms(r):
                    return "–" if r is None else f"{r['median_ms']:.4f}"

                def ratio(a, b):
                    return "–" if a is None or b is None else f"{b['median_ms'] / a['median_ms']:.2f}"

                def mem(r):
                    return "–" if r is None or r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.1f}"
                def host(r):
                    return "–" if r is None else f"{r['host_ms']:.3f}"
                line = (f"| {shape} | {'x'.join(map(str, e['dims']))} | {mode} | {ms(o)} | {ms(e)} | {ms(c)} "
                        f"| {ratio(o, e)} | {ratio(o, c)} | {mem(o)} / {mem(e)} / {mem(c)} "
                        f"| {host(o)} / {host(e)} / {host(c)} |")
                if op == "layer_norm":
                    line += (f" {o['gbps'] if o else '–'} | {o['pct_of_copy_bw'] if o else '–'} |")
                else:
                    line += f" {(o['design'] or '–') if o else '–'} |"
                out.append(line)
        if op == "layer_norm":
            copies = [r for r in rs if r["impl"] == "copy"]
            if copies:
                out.append("\nCopy of the same bytes (`y.copy_(x)`): " + ", ".join(
                    f"{r['shape']} {r['median_ms']:.4f} ms = {r['gbps']} GB/s" for r in copies) + ".")
        else:
            both = [s for s in shapes
                    if _pick(rs, s, "triton", "fwd", "fused") and _pick(rs, s, "triton", "fwd", "hybrid")]
            if both:
                out += ["", "Both designs of ours (ms; peak MiB):", "",
                        "| shape | mode | fused | hybrid | fused peak | hybrid peak |", "|---|---|---:|---:|---:|---:|"]
                for s in both:
                    for mode in MODES:
                        f, h = _pick(rs, s, "triton", mode, "fused"), _pick(rs, s, "triton", mode, "hybrid")
                        out.append(f"| {s} | {mode} | {f['median_ms']:.4f} | {h['median_ms']:.4f} "
                                   f"| {f['peak_mem_mib']} | {h['peak_mem_mib']} |")
        out.append("")
    return "\n".join(out)


def tune_ops(out: Path, log: Callable[[str], None] = print) -> dict:
    """Sweep the kernels' launch parameters at the canonical shapes on this GPU -- LayerNorm and ln_linear
    (:func:`foldforge.kernels._tune.tune_all`), then the triangle multiplicative update, outer product mean,
    transition, gated output and dropout (:func:`foldforge.kernels._ops_tune.sweep_ops`) -- and write the
    swept ops to ``out`` (merge it into the committed table with ``scripts/merge_tuned.py SLUG OUT``). For the
    rest of the process the committed table with the swept ops replaced is installed, so ops not swept here
    (attention: :func:`foldforge.bench.ops_attention.tune_attention`) keep their committed entries."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench ops --tune needs a CUDA GPU")
    from foldforge.kernels._ops_tune import OPS as SWEPT_OPS, sweep_ops
    from foldforge.kernels._tune import tune_all
    slug = _launch.gpu_slug(torch.device("cuda"))
    committed = dict(_launch._table(slug))
    table = tune_all([(s.rows, s.c_in) for s in LAYER_NORM_SHAPES],
                     [(s.rows, s.c_in, s.c_out) for s in LN_LINEAR_SHAPES], log=log)
    frag = sweep_ops(log=log)
    table.update({op: frag[op] for op in SWEPT_OPS})
    table["how"] = f"{table['how']}; {frag['how']}"
    _launch.set_tuned_override(slug, {**committed, **table})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    return table
