"""Offline block-size sweep for the LayerNorm and LayerNorm+Linear kernels; its result is committed as
``tuned/<gpu-slug>.json`` (DESIGN.md convention 6: tuned sizes are data, never autotuned at import or launch).

Run on the GPU through ``foldforge bench ops --tune OUT.json``. Each candidate is checked against
the default launch parameters' result before it is timed (a wrong-but-fast candidate is dropped), then timed
with CUDA events, L2 flushed before each call, median over repeats. Buckets: LayerNorm by ``next_pow2(C)``,
ln_linear by ``"<pow2 C_in>x<pow2 C_out>"``, each tuned at its largest canonical shape; the ln_linear design
("fused" / "hybrid") is the one with the lower forward+backward time.
"""
from __future__ import annotations

import datetime as dt
from typing import Callable

import torch

from foldforge.kernels import _launch

_FLUSH: dict[str, torch.Tensor] = {}
DEVICE = "cuda"   # "cpu" only for a dry run of the sweep logic under TRITON_INTERPRET=1 (tests)


def _time(fn: Callable[[], object], rep: int = 30) -> float:
    """Median ms of ``fn`` over ``rep`` calls, L2 flushed before each."""
    if DEVICE == "cpu":
        fn()
        return 1.0
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(256 * 2**20, dtype=torch.int8, device=DEVICE)
    flush = _FLUSH["buf"]
    for _ in range(3):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rep)]
    for s, e in ev:
        flush.zero_()
        # hold the GPU ~2 ms so the host has queued the whole call before the start event: the first sweep
        # (2026-11-21) had only the memset as head start and timed the hybrid design's host overhead
        # (0.27 ms "forward" at [147456, 128] -> 512 whose GPU time is 0.11 ms)
        torch.cuda._sleep(4_000_000)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in ev)[rep // 2]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _close(a, b) -> bool:
    for x, y in zip(a if isinstance(a, (tuple, list)) else (a,), b if isinstance(b, (tuple, list)) else (b,)):
        if x is None:
            continue
        x, y = x.float(), y.float()
        if not torch.isfinite(x).all() or (x - y).abs().max() > 2e-2 * y.abs().max() + 1e-6:
            return False
    return True


def _best(name: str, cands: list[dict], run: Callable[[dict], object], ref, log) -> tuple[dict, float]:
    best, best_ms = None, float("inf")
    for c in cands:
        try:
            out = run(c)
            _sync()
        except Exception as e:   # noqa: BLE001 -- a candidate that does not compile (shared memory) is skipped
            log(f"  {name} {c}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            continue
        if not _close(out, ref):
            log(f"  {name} {c}: WRONG RESULT, dropped")
            continue
        ms = _time(lambda: run(c))
        log(f"  {name} {c}: {ms:.4f} ms")
        if ms < best_ms:
            best, best_ms = c, ms
    return best, best_ms


def tune_layer_norm(rows: int, c: int, table: dict, log=print) -> None:
    from foldforge.kernels import _layer_norm_triton as L
    bn = max(16, _launch.next_pow2(c))
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(rows, c, device=DEVICE, generator=g).bfloat16()
    w, b = torch.randn(c, device=DEVICE, generator=g), torch.randn(c, device=DEVICE, generator=g)
    dy = torch.randn(rows, c, device=DEVICE, generator=g).bfloat16()
    d = max(1, 4096 // bn)
    cands = [{"BLOCK_M": bm, "num_warps": nw, "BLOCK_N": bn} for bm in sorted({max(1, d // 2), d, 2 * d})
             for nw in (4, 8)]
    ref = L.forward(x, w, b, 1e-5, config={**L._default_fwd(bn), "BLOCK_N": bn})
    best, ms = _best(f"layer_norm_fwd {rows}x{c}", cands, lambda k: L.forward(x, w, b, 1e-5, config=k), ref, log)
    table.setdefault("layer_norm_fwd", {})[str(bn)] = {k: v for k, v in best.items() if k != "BLOCK_N"} | \
        {"ms": round(ms, 4), "at": [rows, c]}
    _, mean, rstd = ref
    d = max(1, 2048 // bn)
    cands = [{"BLOCK_M": bm, "num_warps": nw, "programs_per_sm": p, "BLOCK_N": bn}
             for bm in (d, 2 * d) for nw in (4, 8) for p in (2, 4, 8)]
    ref = L.backward(dy, x, w, mean, rstd, need_dw=True, need_db=True, config={**L._default_bwd(bn), "BLOCK_N": bn})
    best, ms = _best(f"layer_norm_bwd {rows}x{c}", cands,
                     lambda k: L.backward(dy, x, w, mean, rstd, need_dw=True, need_db=True, config=k), ref, log)
    table.setdefault("layer_norm_bwd", {})[str(bn)] = {k: v for k, v in best.items() if k != "BLOCK_N"} | \
        {"ms": round(ms, 4), "at": [rows, c]}


def tune_ln_linear(rows: int, k: int, n: int, table: dict, log=print) -> None:
    from foldforge.kernels import _ln_linear_triton as T
    g = torch.Generator(device=DEVICE).manual_seed(1)
    bf = torch.bfloat16
    x = (torch.randn(rows, k, device=DEVICE, generator=g) * 2 + 0.5).to(bf)
    lw, lb = torch.randn(k, device=DEVICE, generator=g), torch.randn(k, device=DEVICE, generator=g)
    w, b = torch.randn(n, k, device=DEVICE, generator=g) * k ** -0.5, torch.randn(n, device=DEVICE, generator=g)
    dy2 = torch.randn(rows, n, device=DEVICE, generator=g).to(bf)
    base = T.default_config(k, n)
    key = T.bucket(k, n)
    bn_full = max(16, _launch.next_pow2(n))
    hyb = {**base, "design": "hybrid"}
    y_ref, mean, rstd = T.forward(x, lw, lb, w, b, 1e-5, bf, hyb)
    hyb_fwd = _time(lambda: T.forward(x, lw, lb, w, b, 1e-5, bf, hyb))
    bwd_ref = T._hybrid_backward(dy2, x, lw, lb, w, mean, rstd, True, True, True)
    hyb_bwd = _time(lambda: T._hybrid_backward(dy2, x, lw, lb, w, mean, rstd, True, True, True))
    log(f"  ln_linear {rows}x{k}->{n} hybrid: fwd {hyb_fwd:.4f} ms, bwd {hyb_bwd:.4f} ms")
    entry = {**base, "design": "hybrid", "ms": {"hybrid": [round(hyb_fwd, 4), round(hyb_bwd, 4)]}, "at": [rows, k, n]}
    if _launch.next_pow2(k) <= T.FUSED_MAX_K:
        def clip(bn):
            return min(bn, bn_full)
        fw = [dict(BLOCK_M=bm, BLOCK_N=clip(bn), num_warps=nw, num_stages=st)
              for bm, bn, nw, st in ((64, 128, 4, 2), (128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3),
                                     (64, 256, 8, 2))]
        dx = [dict(BLOCK_M=bm, BLOCK_N=clip(bn), num_warps=nw, num_stages=st, programs_per_sm=p)
              for bm, bn, nw, st in ((64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3))
              for p in (1, 2, 4)]
        dw = [dict(BLOCK_M=bm, BLOCK_N=clip(bn), num_warps=nw, num_stages=st, programs_per_sm=p)
              for bm, bn, nw, st in ((64, 128, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (32, 128, 8, 3))
              for p in (1, 2, 4)]
        dedupe = lambda cs: [dict(t) for t in dict.fromkeys(tuple(sorted(c.items())) for c in cs)]   # noqa: E731
        f_best, f_ms = _best(f"ln_linear_fwd {key}", dedupe(fw),
                             lambda c: T.forward(x, lw, lb, w, b, 1e-5, bf, {**base, "design": "fused", "fwd": c}),
                             (y_ref, mean, rstd), log)
        x_best, x_ms = _best(f"ln_linear_bwd_dx {key}", dedupe(dx),
                             lambda c: T.fused_bwd_dx(dy2, x, lw, lb, w, mean, rstd, True, True, c), bwd_ref[:3], log)
        w_best, w_ms = _best(f"ln_linear_bwd_dw {key}", dedupe(dw),
                             lambda c: T.fused_bwd_dw(dy2, x, lw, lb, mean, rstd, True, c), bwd_ref[3:], log)
        entry["fuse_dw"] = False
        if f_best and x_best and w_best:
            entry.update({"fwd": f_best, "bwd_dx": x_best, "bwd_dw": w_best})
            if n <= 64:   # few output columns: try dW/db inside the dx kernel (one read of x)
                one = [c for c in dedupe(dx) if c["BLOCK_N"] >= n]
                o_best, o_ms = _best(f"ln_linear_bwd_dx+dw {key}", one,
                                     lambda c: T.fused_bwd_dx(dy2, x, lw, lb, w, mean, rstd, True, True, c,
                                                              dw_db=True), bwd_ref, log)
                if o_best and o_ms < x_ms + w_ms:
                    entry.update({"bwd_dx": o_best, "fuse_dw": True})
                    x_ms, w_ms = o_ms, 0.0
            entry["ms"]["fused"] = [round(f_ms, 4), round(x_ms + w_ms, 4)]
            if f_ms + x_ms + w_ms < hyb_fwd + hyb_bwd:
                entry["design"] = "fused"
            log(f"  ln_linear {key}: fused fwd {f_ms:.4f} + bwd {x_ms + w_ms:.4f} ms vs hybrid "
                f"{hyb_fwd:.4f} + {hyb_bwd:.4f} ms -> {entry['design']}")
    table.setdefault("ln_linear", {})[key] = entry


def tune_all(ln_shapes: list[tuple[int, int]], lnl_shapes: list[tuple[int, int, int]], log=print) -> dict:
    """Sweep every bucket at its largest shape (``(rows, C)`` for LayerNorm, ``(rows, C_in, C_out)`` for
    ln_linear; shapes under 4096 rows are launch-bound and keep the defaults). Returns the table, which is
    also installed for this process."""
    table = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "interpreter", "torch": torch.__version__,
             "date": dt.date.today().isoformat(),
             "how": "foldforge bench ops --tune; bf16 activations, fp32 weights; per bucket the largest "
                    "canonical shape; 'ms' = median with L2 flushed ([fwd, bwd] for ln_linear)"}
    slug = _launch.gpu_slug(torch.device(DEVICE))
    widest: dict[int, tuple[int, int]] = {}
    for rows, c in ln_shapes:
        bn = _launch.next_pow2(c)
        if rows >= 4096 and rows > widest.get(bn, (0, 0))[0]:
            widest[bn] = (rows, c)
    for rows, c in widest.values():
        tune_layer_norm(rows, c, table, log)
    _launch.set_tuned_override(slug, table)     # the hybrid ln_linear design runs the tuned LayerNorm
    from foldforge.kernels._ln_linear_triton import bucket
    done = set()
    for rows, k, n in sorted(lnl_shapes, key=lambda s: -s[0]):
        if rows >= 4096 and bucket(k, n) not in done:
            done.add(bucket(k, n))
            tune_ln_linear(rows, k, n, table, log)
    _launch.set_tuned_override(slug, table)
    return table
