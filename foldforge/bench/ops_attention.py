"""Attention with pair bias at the canonical shapes (``foldforge bench ops --op attention``).

One run compares, per shape, forward / backward / forward+backward (gradients of q, k, v and the bias) and
peak extra memory of:

* ``triton`` -- ours, once per bias-gradient path (``design`` = "deterministic" | "atomic"; ``chosen`` marks
  the path the committed table dispatches to);
* ``reference`` -- the eager reference (materialises ``[S, H, L, L]`` logits);
* ``sdpa`` -- ``F.scaled_dot_product_attention`` pinned to the memory-efficient backend (the only one that
  returns a bias gradient), with the bias as a float ``attn_mask`` that requires grad, broadcast over the
  rows by ``expand``; the layout transposes to ``[B*S, H, L, D]`` and back are part of its time;
* ``flex`` -- ``torch.compile`` of ``flex_attention`` (whole wrapper, transposes included) with a
  ``score_mod`` adding the bias as a captured tensor that requires grad;
* ``cueq`` -- cuEquivariance ``triangle_attention`` (``[B, N, H, L, D]`` layout, transposes counted), where
  ``cuequivariance_torch`` imports; otherwise a logged reason.

Our rows also get a per-kernel profile (mode ``kernel:fwd`` (storing the output residual, as in training),
``kernel:dq`` (with delta from the output), ``kernel:dkdv``, ``kernel:dbias`` (deterministic reduction),
``kernel:dkdv+atomic``) so the time of forward, dK/dV, dQ and the bias-gradient reduction can be read off
one run.

Timing and memory use :class:`foldforge.bench.ops._Timer` (L2 flushed, host queued ahead, median over
repeats); rows have the schema of :mod:`foldforge.bench.ops`. On the CPU (``quick``) only the reference, SDPA
and ours (through the Triton interpreter) run, on tiny shapes: a schema check, not a measurement.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from foldforge.bench.data import append_jsonl
from foldforge.bench.ops import MODES, _DTYPES, _Timer, allow_recompiles, op_meta
from foldforge.bench.shapes import ATTENTION_SHAPES, QUICK_ATTENTION_SHAPES, AttentionShape
from foldforge.kernels.attention import evo_attention_reference, evo_attention_triton

OP = "attention"
PROFILE_MODES = ("kernel:fwd", "kernel:dq", "kernel:dkdv", "kernel:dbias", "kernel:dkdv+atomic")


# ---------------------------------------------------------------- inputs and implementations
def _inputs(s: AttentionShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple:
    """q, k, v ``[B, S, L, H, D]`` and the bias ``[B, 1, H, L, L]`` (or None) in ``dtype``, requiring grad."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dims = (s.batch, s.rows, s.length, s.heads, s.head_dim)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rnd(*dims), rnd(*dims), rnd(*dims)
    bias = rnd(s.batch, 1, s.heads, s.length, s.length, scale=2.0) if s.bias else None
    return q, k, v, bias


def _sdpa(on_gpu: bool) -> Callable:
    import torch.nn.functional as F

    def f(q, k, v, bias):
        b, s, l, h, d = q.shape
        qt, kt, vt = (t.reshape(b * s, l, h, d).transpose(1, 2) for t in (q, k, v))   # [B*S, H, L, D]
        mask = None
        if bias is not None:   # [B, 1, H, L, L] -> [B, S, H, L, L] (stride 0 over S) -> [B*S, H, L, L]
            mask = bias.expand(b, s, h, l, l).reshape(b * s, h, l, l) if b > 1 else bias[0].expand(s, h, l, l)
        if on_gpu:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
        else:
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
        return o.transpose(1, 2).reshape(b, s, l, h, d)
    return f


def _flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    def f(q, k, v, bias):
        b, s, l, h, d = q.shape
        qt, kt, vt = (t.reshape(b * s, l, h, d).transpose(1, 2) for t in (q, k, v))
        if bias is None:
            o = flex_attention(qt, kt, vt)
        else:
            def score_mod(score, bi, hi, qi, ki):
                return score + bias[bi // s, 0, hi, qi, ki]
            o = flex_attention(qt, kt, vt, score_mod=score_mod)
        return o.transpose(1, 2).reshape(b, s, l, h, d)
    return torch.compile(f, fullgraph=True, dynamic=False)


def _cueq() -> tuple[Callable | None, str | None]:
    try:
        from cuequivariance_torch import triangle_attention
    except Exception as e:   # noqa: BLE001 -- any import failure is a reason to skip, logged
        return None, f"cuequivariance_torch does not import: {type(e).__name__}: {str(e).splitlines()[0][:120]}"

    def f(q, k, v, bias):
        qt, kt, vt = (t.transpose(2, 3) for t in (q, k, v))   # [B, N, H, L, D]
        if bias is None:   # the op requires a bias
            b, n, h, l, _ = qt.shape
            bias = torch.zeros(b, 1, h, l, l, device=q.device, dtype=torch.float32)
        return triangle_attention(qt, kt, vt, bias).transpose(2, 3)
    return f, None


def _implementations(on_gpu: bool, include_ours: bool, log) -> list[tuple[str, str | None, Callable]]:
    impls: list[tuple[str, str | None, Callable]] = []
    if include_ours:
        for mode in ("deterministic", "atomic"):
            impls.append(("triton", mode, lambda q, k, v, b, mode=mode: evo_attention_triton(q, k, v, b,
                                                                                              dbias_mode=mode)))
    impls.append(("reference", None, lambda q, k, v, b: evo_attention_reference(q, k, v, b)))
    impls.append(("sdpa", None, _sdpa(on_gpu)))
    if on_gpu:
        impls.append(("flex", None, _flex()))
        cueq, why = _cueq()
        if cueq is None:
            log(f"attention: cuEquivariance skipped ({why})")
        else:
            impls.append(("cueq", None, cueq))
    else:
        log("attention: flex and cuEquivariance run on the GPU only (CPU run is a schema check)")
    return impls


# ---------------------------------------------------------------- measurement
def _measure(f: Callable, ins: tuple, timer: _Timer) -> list[dict]:
    leaves = tuple(t for t in ins if t is not None)
    y = f(*ins)
    dy = torch.randn_like(y)
    fns = {
        "fwd": lambda: f(*ins),
        "bwd": lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(f(*ins), leaves, dy),
    }
    return [{"mode": m, **timer(fns[m]), "peak_mem_mib": timer.peak_mib(fns[m])} for m in MODES]


def _profile(ins: tuple, timer: _Timer) -> list[dict]:
    """Each Triton kernel of ours alone, at the committed launch parameters."""
    from foldforge.kernels import _attention_triton as T
    q, k, v, bias = (None if t is None else t.detach() for t in ins)
    P = T.Problem(q, k, v, bias, None, q.shape[-1] ** -0.5)
    cfg = T.config(q.device, P.LQ, P.LK, P.D)
    o, lse, o_lo = T.run_fwd(P, cfg["fwd"])
    do = torch.randn_like(P.q)
    _, delta = T.run_dq(P, do, o, o_lo, lse, cfg["dq"])
    db_shape = (P.BB, P.SB, P.H, P.LQ, P.LK)
    runs = {"kernel:fwd": lambda: T.run_fwd(P, cfg["fwd"]),
            "kernel:dq": lambda: T.run_dq(P, do, o, o_lo, lse, cfg["dq"]),
            "kernel:dkdv": lambda: T.run_dkdv(P, do, lse, delta, cfg["dkdv"], 0, None)}
    if bias is not None:
        direct = P.reduced_rows() == 1
        db = torch.empty(db_shape, dtype=bias.dtype, device=q.device)
        if direct:   # each bias element has one row: dS stored by the dK/dV kernel, no reduction
            runs["kernel:dkdv"] = lambda: T.run_dkdv(P, do, lse, delta, cfg["dkdv"], 1, db)
        else:
            db32 = torch.zeros(db_shape, dtype=torch.float32, device=q.device)
            runs["kernel:dbias"] = lambda: T.run_dbias(P, do, lse, delta, db, cfg["dbias"])
            runs["kernel:dkdv+atomic"] = lambda: (db32.zero_(), T.run_dkdv(P, do, lse, delta, cfg["dkdv"], 2, db32))
    return [{"mode": m, **timer(fn), "peak_mem_mib": timer.peak_mib(fn)} for m, fn in runs.items()]


def run_attention_benchmark(shape_set: str = "all", *, quick: bool = False, dtype: str = "bf16",
                            results: Path | None = None, warmup_ms: float = 25.0, reps: int = 40,
                            include_ours: bool | None = None, profile: bool = True,
                            log: Callable[[str], None] = print) -> list[dict]:
    """Measure every implementation at the attention shapes (``shape_set`` "af2" | "af3" | "all"; ``quick``:
    tiny CPU shapes) and append one JSONL row per (impl, design, mode, shape) to ``results``. ``include_ours``
    (default: on a GPU) adds our rows; on the CPU they run through the Triton interpreter."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    ours = on_gpu if include_ours is None else include_ours
    if quick:
        shapes = QUICK_ATTENTION_SHAPES
    else:
        shapes = tuple(s for s in ATTENTION_SHAPES if shape_set == "all" or s.family == shape_set)
    torch_dtype = _DTYPES[dtype]
    allow_recompiles()
    timer = _Timer(device, warmup_ms, reps)
    meta = op_meta(OP, dtype, device)
    impls = _implementations(on_gpu, ours, log)
    rows: list[dict] = []
    for s in shapes:
        dims = [s.batch, s.rows, s.length, s.heads, s.head_dim]
        chosen = None
        if ours:
            from foldforge.kernels import _attention_triton as T
            chosen = T.config(device, s.length, s.length, s.head_dim)["dbias_mode"]
        base = {**meta, "shape": s.name, "dims": dims, "bias": s.bias}
        n0 = len(rows)
        for impl, design, f in impls:
            ins = _inputs(s, torch_dtype, device)
            try:
                measured = _measure(f, ins, timer)
            except Exception as e:   # noqa: BLE001 -- a baseline that refuses a shape is a logged row-less skip
                if impl == "triton":
                    raise
                log(f"attention {s.name} {impl}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                continue
            finally:
                if on_gpu:
                    torch.cuda.empty_cache()
            for m in measured:
                rows.append({**base, "impl": impl, "design": design,
                             "chosen": None if design is None else design == chosen, **m})
        if ours and profile:
            for m in _profile(_inputs(s, torch_dtype, device), timer):
                rows.append({**base, "impl": "triton", "design": "profile", "chosen": None, **m})
        for r in rows[n0:]:
            log(f"{OP:9s} {s.name:20s} {r['impl']:9s} {r.get('design') or '':13s} {r['mode']:18s} "
                f"{r['median_ms']:9.4f} ms  peak {r['peak_mem_mib']} MiB")
    if results is not None:
        append_jsonl(results, rows)
    return rows


# ---------------------------------------------------------------- report
def format_attention_report(rows: list[dict]) -> str:
    """Markdown: per shape and mode, ms of each implementation, ours (chosen path) over each baseline
    (t_other / t_ours; > 1 means ours is faster), peak MiB; then the per-kernel profile."""
    rs = [r for r in rows if r["op"] == OP]
    if not rs:
        return ""
    cols = [("triton", "deterministic"), ("triton", "atomic"), ("reference", None), ("sdpa", None),
            ("flex", None), ("cueq", None)]
    cols = [c for c in cols if any(r["impl"] == c[0] and r.get("design") == c[1] for r in rs)]
    names = [c[0] if c[1] is None else f"ours {c[1][:5]}" for c in cols]

    def pick(shape, mode, impl, design):
        return next((r for r in rs if r["shape"] == shape and r["mode"] == mode and r["impl"] == impl
                     and r.get("design") == design), None)

    out = ["### attention\n", "| shape | dims | mode | " + " | ".join(f"{n} ms" for n in names)
           + " | ours / flex | ours / sdpa | peak MiB (" + " / ".join(names) + ") |",
           "|---|---|---|" + "---:|" * len(names) + "---:|---:|---|"]
    for shape in dict.fromkeys(r["shape"] for r in rs):
        for mode in MODES:
            got = [pick(shape, mode, i, d) for i, d in cols]
            if not any(got):
                continue
            ours = next((r for r in rs if r["shape"] == shape and r["mode"] == mode and r["impl"] == "triton"
                         and r.get("chosen")), None)

            def ratio(other):
                o = pick(shape, mode, other, None)
                return "–" if ours is None or o is None else f"{o['median_ms'] / ours['median_ms']:.2f}"
            dims = next(r["dims"] for r in got if r)
            out.append(f"| {shape} | {'x'.join(map(str, dims))} | {mode} | "
                       + " | ".join("–" if r is None else f"{r['median_ms']:.4f}" for r in got)
                       + f" | {ratio('flex')} | {ratio('sdpa')} | "
                       + " / ".join("–" if r is None or r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
                                    for r in got) + " |")
    prof = [r for r in rs if r.get("design") == "profile"]
    if prof:
        out += ["", "Our kernels alone (ms):", "", "| shape | " + " | ".join(PROFILE_MODES) + " |",
                "|---|" + "---:|" * len(PROFILE_MODES)]
        for shape in dict.fromkeys(r["shape"] for r in prof):
            vals = [next((f"{r['median_ms']:.4f}" for r in prof if r["shape"] == shape and r["mode"] == m), "–")
                    for m in PROFILE_MODES]
            out.append(f"| {shape} | " + " | ".join(vals) + " |")
    out.append("")
    return "\n".join(out)


def tune_attention(out: Path, log: Callable[[str], None] = print) -> dict:
    """Sweep our launch parameters at the attention shapes on this GPU; writes ``{"evo_attention": {...}}``
    to ``out`` (to merge into ``foldforge/kernels/tuned/<gpu-slug>.json``)."""
    from foldforge.kernels._attention_tune import sweep
    if not torch.cuda.is_available():
        raise RuntimeError("tuning needs a CUDA GPU")
    return sweep(ATTENTION_SHAPES, out, log=log)
