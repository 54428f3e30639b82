"""Pair-op benchmarks: triangle multiplicative update (AF2 Suppl. Alg. 11/12) and outer product mean
(Alg. 10) at the canonical shapes of :mod:`foldforge.bench.shapes`.

Implementations per shape: ours (``impl="triton"``), the eager reference, ``torch.compile`` of the reference
(compiled once per shape, warm) and, for the triangle update, NVIDIA cuEquivariance's fused
``cuequivariance_torch.triangle_multiplicative_update`` when it imports (a logged skip otherwise). Each is
timed fwd, bwd and fwd+bwd with :class:`foldforge.bench.ops._Timer` (L2 flushed, host held off the
timeline) and its peak extra memory recorded; rows follow the schema of :mod:`foldforge.bench.ops`
(``bench="ops"``, op, impl, design, chosen, mode, shape, dims, dtype, median/p20/p80 ms, host ms, reps,
peak MiB, gpu, versions, commit, date). Activations in ``dtype``, parameters fp32 (master weights).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch

from foldforge.bench.data import append_jsonl
from foldforge.bench.ops import MODES, _Timer, allow_recompiles, op_meta
from foldforge.bench.shapes import (
    OPM_SHAPES,
    QUICK_OPM_SHAPES,
    QUICK_TRIANGLE_MULT_SHAPES,
    TRIANGLE_MULT_SHAPES,
    OPMShape,
    TriMulShape,
)
from foldforge.kernels.outer_product_mean import (
    OPMParams,
    outer_product_mean,
    outer_product_mean_reference,
)
from foldforge.kernels.triangle_mult import (
    TriMulParams,
    triangle_multiplication,
    triangle_multiplication_reference,
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _rnd(g, device, *shape, scale=1.0, shift=0.0, dt=torch.float32):
    return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dt).requires_grad_()


def _trimul_inputs(s: TriMulShape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, c = s.c_z, s.c_hidden
    z = _rnd(g, device, s.batch, s.length, s.length, k, dt=dtype)
    mask = (torch.rand(s.batch, s.length, s.length, generator=g) > 0.05).to(device)
    shapes = ((k,), (k,), (c, k), (c,), (c, k), (c,), (c, k), (c,), (c, k), (c,), (k, k), (k,), (c,), (c,), (k, c),
              (k,))
    params = [_rnd(g, device, *sh, scale=sh[-1] ** -0.5 if len(sh) == 2 else 0.1, shift=float(i in (0, 12)))
              for i, sh in enumerate(shapes)]
    return (z, mask, *params)


def _opm_inputs(s: OPMShape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = _rnd(g, device, s.batch, s.n_seq, s.length, s.c_m, dt=dtype)
    mask = (torch.rand(s.batch, s.n_seq, s.length, generator=g) > 0.05).to(device)
    c, cm, cz = s.c_hidden, s.c_m, s.c_z
    shapes = ((cm,), (cm,), (c, cm), (c,), (c, cm), (c,), (cz, c * c), (cz,))
    params = [_rnd(g, device, *sh, scale=sh[-1] ** -0.5 if len(sh) == 2 else 0.1, shift=float(i == 0))
              for i, sh in enumerate(shapes)]
    return (m, mask, *params)


def _cueq_trimul():
    """cuEquivariance's fused update, or None (logged by the caller) when it does not import."""
    try:
        from cuequivariance_torch import triangle_multiplicative_update
    except Exception:   # noqa: BLE001 -- any import failure (missing wheel, CUDA/Triton mismatch) means skip
        return None
    has_bias = "p_in_bias" in inspect.signature(triangle_multiplicative_update).parameters

    def f(z, mask, direction, *p):
        """Our parameters in cuEq's layout: p_in = [W_ap; W_bp], g_in = [W_ag; W_bg] (a rows first),
        norm_out = layer_norm_out, p_out = linear_z, g_out = linear_g; its mask also masks a and b.

        cuEq expects every weight in the activation dtype (its backward multiplies activations and
        weights without promotion: fp32 weights with bf16 activations fail there), so the fp32 master
        weights are cast here, as a mixed-precision caller of cuEq does; gradients flow through the casts
        to the fp32 leaves, as with our reference's ``linear``."""
        p = TriMulParams(*[t.to(z.dtype) for t in p])
        kw = dict(norm_in_weight=p.layer_norm_in_weight, norm_in_bias=p.layer_norm_in_bias,
                  p_in_weight=torch.cat([p.linear_a_p_weight, p.linear_b_p_weight]),
                  g_in_weight=torch.cat([p.linear_a_g_weight, p.linear_b_g_weight]),
                  norm_out_weight=p.layer_norm_out_weight, norm_out_bias=p.layer_norm_out_bias,
                  p_out_weight=p.linear_z_weight, g_out_weight=p.linear_g_weight)
        if has_bias:
            kw.update(p_in_bias=torch.cat([p.linear_a_p_bias, p.linear_b_p_bias]),
                      g_in_bias=torch.cat([p.linear_a_g_bias, p.linear_b_g_bias]),
                      p_out_bias=p.linear_z_bias, g_out_bias=p.linear_g_bias)
        return triangle_multiplicative_update(z, direction=direction, mask=mask.to(z.dtype), **kw)
    return f


def _trimul_fn(impl: str, direction: str) -> Callable | None:
    def ref(z, mask, *p):
        return triangle_multiplication_reference(z, mask, TriMulParams(*p), direction=direction)
    if impl == "reference":
        return ref
    if impl == "compile":
        return torch.compile(ref, fullgraph=True, dynamic=False)
    if impl == "cueq":
        f = _cueq_trimul()
        return None if f is None else (lambda z, mask, *p: f(z, mask, direction, *p))
    return lambda z, mask, *p: triangle_multiplication(z, mask, TriMulParams(*p), direction=direction,
                                                       impl="triton")


def _opm_fn(impl: str) -> Callable:
    def ref(m, mask, *p):
        return outer_product_mean_reference(m, mask, OPMParams(*p))
    if impl == "reference":
        return ref
    if impl == "compile":
        return torch.compile(ref, fullgraph=True, dynamic=False)
    return lambda m, mask, *p: outer_product_mean(m, mask, OPMParams(*p), impl="triton")


def _measure(f: Callable, ins: tuple, timer: _Timer) -> list[dict]:
    """fwd, bwd (one saved forward, ``retain_graph``) and fwd+bwd of ``f(*ins)``; grads of every tensor
    input that requires grad (activation and all weights)."""
    leaves = [t for t in ins if isinstance(t, torch.Tensor) and t.requires_grad]
    y = f(*ins)
    dy = torch.randn_like(y)
    fns = {"fwd": lambda: f(*ins),
           "bwd": lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True),
           "fwd+bwd": lambda: torch.autograd.grad(f(*ins), leaves, dy)}
    return [{"mode": mode, **timer(fns[mode]), "peak_mem_mib": timer.peak_mib(fns[mode])} for mode in MODES]


def _run(op, shapes, make_inputs, make_fn, impls, dims, dtype, results, warmup_ms, reps, log) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allow_recompiles()
    timer = _Timer(device, warmup_ms, reps)
    meta = op_meta(op, dtype, device)
    rows = []
    for s in shapes:
        ins = make_inputs(s, _DTYPES[dtype], device)
        for impl in impls:
            # one implementation failing (out of memory, a baseline's own bug, a compile error) is logged
            # and that implementation skipped for this shape: it does not end the run
            try:
                f = make_fn(impl, s)
                if f is None:
                    log(f"{op:18s} {s.name:16s} {impl:9s} skipped: not importable")
                    continue
                measured = _measure(f, ins, timer)
            except torch.cuda.OutOfMemoryError:
                log(f"{op:18s} {s.name:16s} {impl:9s} skipped: out of memory")
                measured = None
            except Exception as e:   # noqa: BLE001 -- any failure of one implementation skips only it
                msg = " ".join(str(e).split())[:300]
                log(f"{op:18s} {s.name:16s} {impl:9s} skipped: {type(e).__name__}: {msg}")
                measured = None
            if measured is None:
                for t in ins:
                    if isinstance(t, torch.Tensor):
                        t.grad = None
                if device.type == "cuda":
                    try:
                        torch.cuda.synchronize(device)
                        torch.cuda.empty_cache()
                    except Exception as e:   # noqa: BLE001 -- a sticky CUDA error: later impls log theirs
                        log(f"{op:18s} {s.name:16s} {impl:9s} cleanup failed: {type(e).__name__}")
                continue
            for r in measured:
                rows.append({**meta, "impl": impl, "design": None, "chosen": None, "shape": s.name,
                             "dims": dims(s), **r})
                log(f"{op:18s} {s.name:16s} {impl:9s} {r['mode']:7s} {r['median_ms']:9.4f} ms  "
                    f"peak {r['peak_mem_mib']} MiB")
        del ins
    if results is not None:
        append_jsonl(results, rows)
    return rows


def _impls(include_ours: bool | None, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    ours = torch.cuda.is_available() if include_ours is None else include_ours
    return (("triton",) if ours else ()) + ("reference", "compile") + (extra if torch.cuda.is_available() else ())


def run_triangle_mult_benchmark(shape_set: str = "all", *, quick: bool = False, dtype: str = "bf16",
                                results: Path | None = None, warmup_ms: float = 25.0, reps: int = 40,
                                include_ours: bool | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Triangle multiplicative update at ``shape_set`` ("af2" | "af3" | "all"; ``quick``: a tiny CPU shape):
    ours, eager, torch.compile and (on a GPU, if importable) cuEquivariance; rows appended to ``results``.
    ``include_ours`` (default: on a GPU) adds our rows; on the CPU they run through the Triton interpreter."""
    shapes = QUICK_TRIANGLE_MULT_SHAPES if quick else tuple(
        s for s in TRIANGLE_MULT_SHAPES if shape_set == "all" or s.family == shape_set)
    return _run("triangle_mult", shapes, _trimul_inputs, lambda impl, s: _trimul_fn(impl, s.direction),
                _impls(include_ours, ("cueq",)), lambda s: [s.batch, s.length, s.length, s.c_z, s.c_hidden],
                dtype, results, warmup_ms, reps, log)


def run_outer_product_mean_benchmark(shape_set: str = "all", *, quick: bool = False, dtype: str = "bf16",
                                     results: Path | None = None, warmup_ms: float = 25.0, reps: int = 40,
                                     include_ours: bool | None = None,
                                     log: Callable[[str], None] = print) -> list[dict]:
    """Outer product mean at the AF2 Evoformer and extra-MSA shapes (``quick``: a tiny CPU shape): ours,
    eager and torch.compile; rows appended to ``results``."""
    shapes = QUICK_OPM_SHAPES if quick else tuple(
        s for s in OPM_SHAPES if shape_set == "all" or s.family == shape_set)
    return _run("outer_product_mean", shapes, _opm_inputs, lambda impl, s: _opm_fn(impl), _impls(include_ours),
                lambda s: [s.batch, s.n_seq, s.length, s.c_m, s.c_hidden, s.c_z], dtype, results, warmup_ms,
                reps, log)


def format_pair_report(rows: list[dict]) -> str:
    """Markdown per op: per shape and mode, ms of each implementation, ours over each other implementation
    (t_other / t_ours; > 1 means ours is faster) and peak MiB."""
    out = []
    for op in ("triangle_mult", "outer_product_mean"):
        rs = [r for r in rows if r["op"] == op]
        if not rs:
            continue
        impls = [i for i in ("triton", "reference", "compile", "cueq") if any(r["impl"] == i for r in rs)]
        others = [i for i in impls if i != "triton"] if "triton" in impls else []
        head = (["shape", "mode"] + [f"{i} ms" for i in impls] + [f"ours vs {i}" for i in others]
                + [f"{i} MiB" for i in impls])
        out += [f"### {op}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for shape in dict.fromkeys(r["shape"] for r in rs):
            for mode in MODES:
                got = {r["impl"]: r for r in rs if r["shape"] == shape and r["mode"] == mode}
                cells = [shape, mode] + [f"{got[i]['median_ms']:.3f}" if i in got else "-" for i in impls]
                cells += [f"{got[i]['median_ms'] / got['triton']['median_ms']:.2f}x"
                          if i in got and "triton" in got else "-" for i in others]
                cells += [str(got[i]["peak_mem_mib"]) if i in got else "-" for i in impls]
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
