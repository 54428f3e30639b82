"""Benchmark of whole AF2 training steps (``foldforge bench step``, ``ablation``, ``max-crop``).

A step is what ``foldforge train`` does per optimizer update: the recycling forward (``r`` no-grad passes plus
one with grad, ``r`` sampled per step exactly as training samples it unless ``--recycles`` fixes it), the
loss, backward, global-norm gradient clipping, the Adam update (fused on CUDA) and the EMA update. Batches
come from a prepared cache or from :mod:`foldforge.bench.synthetic` (exact shapes, full masks), loaded by a
DataLoader with workers as in training.

Timing: CUDA events at five points of every step (start, batch on the GPU, loss computed, backward done,
optimizer + EMA done) give the split data / forward / backward / optimizer of GPU time (wall clock on the
CPU); the host may run ahead, so a phase's time is when the GPU finished it, which is what a user waits
for. Median and p20/p80 over the timed steps after warm-up; peak allocated and reserved memory over the timed
steps; achieved TFLOP/s from the analytic count of :mod:`foldforge.bench.flops` at the step's recycle count.
Which implementation each kernel op really used is recorded from :mod:`foldforge.kernels._dispatch`.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import json
import math
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from foldforge.bench.data import _cpu_name, _git_commit, append_jsonl, triton_version
from foldforge.bench.flops import train_step_flops
from foldforge.config import KernelConfig, RunConfig
from foldforge.data.batch import collate
from foldforge.kernels import _dispatch
from foldforge.kernels._dispatch import IMPLS
from foldforge.model.af2.losses import af2_loss
from foldforge.model.af2.model import AlphaFold2
from foldforge.presets import get_preset
from foldforge.train.loop import sample_num_recycles
from foldforge.train.optim import EMA, make_optimizer

KERNEL_OPS = tuple(f.name for f in dataclasses.fields(KernelConfig))
PHASES = ("data", "forward", "backward", "optimizer")


def parse_kernels(spec: str) -> KernelConfig:
    """``"reference"`` | ``"triton"`` | ``"auto"`` (every op) or ``"op=impl,..."`` (others reference), e.g.
    ``"attention=triton,layer_norm=triton"``. Raises ValueError naming the bad part."""
    spec = spec.strip()
    if spec in IMPLS:
        return KernelConfig(**{op: spec for op in KERNEL_OPS})
    kc = KernelConfig()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        op, sep, impl = part.partition("=")
        if not sep or op not in KERNEL_OPS or impl not in IMPLS:
            raise ValueError(f"--kernels: bad entry {part!r}; expected one of {IMPLS} or op=impl with op in "
                             f"{KERNEL_OPS} and impl in {IMPLS}")
        setattr(kc, op, impl)
    return kc


def kernels_label(kc: KernelConfig) -> str:
    impls = {getattr(kc, op) for op in KERNEL_OPS}
    if len(impls) == 1:
        return impls.pop()
    return ",".join(f"{op}={getattr(kc, op)}" for op in KERNEL_OPS if getattr(kc, op) != "reference")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


# ---------------------------------------------------------------- data
class _Samples(torch.utils.data.Dataset):
    """Sample ``i`` of a cache (cycling through its records) or of the synthetic source."""

    def __init__(self, source: Callable[[int], object], n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.source(i)


def _batch_source(cfg: RunConfig, data: str, seed: int) -> Callable[[int], object]:
    if data == "synthetic":
        from foldforge.bench.synthetic import synthetic_batch_source

        return synthetic_batch_source(cfg.data, seed=seed)
    from foldforge.data.dataset import AF2Dataset, SampleKey

    ds = AF2Dataset(data, cfg.data, seed=seed)
    return lambda i: ds[SampleKey(i % len(ds), 0, i)]


def _loader(source, n: int, workers: int, batch_size: int = 1):
    return iter(torch.utils.data.DataLoader(_Samples(source, n * batch_size), batch_size=batch_size, collate_fn=collate,
                                            num_workers=workers, pin_memory=torch.cuda.is_available(),
                                            prefetch_factor=2 if workers else None,
                                            persistent_workers=False))


# ---------------------------------------------------------------- model set-up
def _compile_blocks(model: AlphaFold2) -> int:
    """torch.compile each block of the Evoformer, extra-MSA and template pair stacks (the memory-bound
    glue between the kernels fuses; kernels stay opaque custom ops). Returns the number of blocks."""
    n = 0
    for stack in (model.evoformer, model.extra_msa_stack,
                  getattr(model.template_embedder, "pair_stack", None)):
        if stack is None:
            continue
        for block in stack.blocks:
            block.compile(dynamic=False)   # in place: parameter names (EMA, checkpoints) unchanged
            n += 1
    return n


class _Clock:
    """Five timestamps per step: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def split(self, marks: list) -> list[float]:
        if self.cuda:
            marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        return [b - a for a, b in zip(marks, marks[1:])]


def _stats(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs)
    return {"median": float(np.median(a)), "p20": float(np.percentile(a, 20)),
            "p80": float(np.percentile(a, 80)), "min": float(a.min()), "max": float(a.max())}


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the benchmark
def run_step_benchmark(preset: str, *, data: str = "synthetic", crop: int | None = None,
                       kernels: str | KernelConfig = "reference", compile: bool = False,
                       checkpointing: bool | None = None, dtype: str = "bf16", steps: int = 5, warmup: int = 2,
                       num_recycles: int | None = None, workers: int | None = None, seed: int = 0,
                       batch_size: int = 1,
                       label: str | None = None, results: Path | None = None, profile: bool = False,
                       log: Callable[[str], None] = print) -> dict:
    """Run ``warmup + steps`` training steps and return (and append to ``results``) one row.

    ``batch_size`` samples are stacked per step (as ``train.batch_size``; samples/s counts them).
    ``checkpointing=None`` keeps the preset's setting. ``profile`` runs one more step under
    ``torch.profiler`` after the timed ones and stores the top GPU (CPU) kernels by total time in the row. An out-of-memory error is a result too
    (``"oom": true``); a kernel that cannot run these inputs (``impl="triton"`` where its ``supports()``
    says no) gives ``"error"``.
    """
    cfg = get_preset(preset)
    if crop is not None:
        cfg.data.crop_size = crop
    kc = parse_kernels(kernels) if isinstance(kernels, str) else kernels
    cfg.model.kernels = kc
    if checkpointing is not None:
        cfg.model.checkpoint_blocks = checkpointing
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = (2 if device.type == "cuda" else 0) if workers is None else workers
    d = cfg.data
    row: dict = {
        "bench": "train_step", "label": label or kernels_label(kc), "kernels_spec": kernels_label(kc),
        "preset": preset, "crop": d.crop_size,
        "n_clust": d.max_msa_clusters, "n_extra": d.max_extra_msa, "n_templ": d.max_templates,
        "kernels": dataclasses.asdict(kc), "compile": compile, "dtype": dtype,
        "checkpointing": cfg.model.checkpoint_blocks, "steps": steps, "warmup": warmup,
        "num_recycles": "sampled" if num_recycles is None else num_recycles, "data": data,
        "batch_size": batch_size,
    }
    _free_memory()
    _dispatch.reset_resolutions()
    torch.manual_seed(seed)
    model = opt = ema = None
    times: list[list[float]] = []
    recycles_used: list[int] = []
    losses: list[dict] = []
    try:
        model = AlphaFold2(cfg.model).to(device).train()
        model.set_checkpoint_blocks(cfg.model.checkpoint_blocks)
        params = [p for p in model.parameters() if p.requires_grad]
        opt, _ = make_optimizer(params, cfg.train, device)
        ema = EMA(model, cfg.train.ema_decay)
        row["parameters"] = sum(p.numel() for p in params)
        # with compile: one more untimed step first (eager, records the kernels used), then compile, so the
        # compilation itself and its recompiles (grad / no-grad graphs) fall in the warm-up steps
        warm = warmup + (1 if compile else 0)
        batches = _loader(_batch_source(cfg, data, seed), warm + steps + int(profile), workers, batch_size)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
        clock = _Clock(device)
        max_norm = cfg.train.clip_grad_norm if cfg.train.clip_grad_norm > 0 else math.inf

        def one_step(r: int, mark: Callable[[], None] = lambda: None) -> dict:
            return _one_step(model, opt, ema, params, batches, device=device, autocast=autocast, r=r, cfg=cfg,
                             max_norm=max_norm, mark=mark)

        for i in range(warm + steps):
            if compile and i == 1:
                row["compiled_blocks"] = _compile_blocks(model)
            if i == warm and device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            r = (sample_num_recycles(seed, i, d.max_recycling_iters) if num_recycles is None else num_recycles)
            marks = [clock.mark()]
            terms = one_step(r, lambda: marks.append(clock.mark()))
            split = clock.split(marks)
            if i >= warm:
                times.append(split)
                recycles_used.append(r)
                losses.append({k: float(v) for k, v in terms.items()})
        row["oom"], row["error"] = False, None
        if profile:
            row["profile_top"] = _profile_one_step(
                lambda: one_step(d.max_recycling_iters if num_recycles is None else num_recycles), device)
    except torch.cuda.OutOfMemoryError as e:   # a result: this configuration does not fit
        row["oom"], row["error"] = True, str(e).splitlines()[0][:300]
    except NotImplementedError as e:          # impl="triton" for an op that cannot run these inputs
        row["oom"], row["error"] = False, str(e)[:300]
    finally:
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
        model = opt = ema = None   # free the model before the next configuration is built
        _free_memory()
    ok = len(times) == steps and steps > 0
    row["kernels_used"] = _dispatch.resolutions()
    if ok:
        total = [sum(t) for t in times]
        row["step_s"] = _stats(total)
        row["split_s"] = {ph: float(np.median([t[k] for t in times])) for k, ph in enumerate(PHASES)}
        row["recycles_used"] = recycles_used
        flops = [train_step_flops(cfg.model, n_res=d.crop_size, n_clust=d.max_msa_clusters, n_extra=d.max_extra_msa,
                                  n_templ=d.max_templates, num_recycles=r) for r in recycles_used]
        row["tflop_per_step"] = batch_size * float(np.mean(flops)) / 1e12
        row["tflops_achieved"] = batch_size * float(np.sum(flops) / np.sum(total)) / 1e12
        row["samples_per_s"] = float(batch_size * len(total) / np.sum(total))
        row["loss_last"] = losses[-1]
    else:
        row["step_s"] = None
    row.update({
        "peak_allocated_gib": None if peak is None else round(peak / 2**30, 3),
        "peak_reserved_gib": None if reserved is None else round(reserved / 2**30, 3),
        "device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
        "python": platform.python_version(), "commit": _git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    row["command"] = (f"foldforge bench step --preset {preset} --data {data} --crop {d.crop_size} "
                      f"--kernels {kernels_label(kc)} --steps {steps} --warmup {warmup} --dtype {dtype}"
                      + (" --compile" if compile else "")
                      + (" --checkpointing" if cfg.model.checkpoint_blocks else " --no-checkpointing")
                      + ("" if num_recycles is None else f" --recycles {num_recycles}")
                      + ("" if batch_size == 1 else f" --batch-size {batch_size}"))
    log(summary_line(row))
    if results is not None:
        append_jsonl(results, [row])
    return row


def _one_step(model, opt, ema, params, batches, *, device, autocast, r: int, cfg: RunConfig, max_norm: float,
              mark: Callable[[], None]) -> dict:
    """One training step on the next batch; ``mark()`` after each phase (data, forward + loss, backward,
    optimizer + EMA). Returns the loss terms (tensors)."""
    batch = next(batches).to(device, non_blocking=True).as_dict()
    mark()
    opt.zero_grad(set_to_none=True)
    with autocast:
        out = model(batch, num_recycles=r)
    loss, terms = af2_loss(out, batch, cfg.loss)
    mark()
    loss.backward()
    mark()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    ema.update(model)
    mark()
    return terms


def _profile_one_step(fn: Callable[[], None], device: torch.device, top: int = 25) -> list[dict]:
    """Top kernels of one step by total device time (self CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if device.type != "cuda" or e.device_time_total > 0]
    key = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    events.sort(key=key, reverse=True)
    total = sum(key(e) for e in events) or 1.0
    return [{"name": e.key[:120], "ms": key(e) / 1e3, "share": key(e) / total, "calls": e.count}
            for e in events[:top]]


def summary_line(row: dict) -> str:
    if row.get("step_s") is None:
        why = "out of memory" if row.get("oom") else f"error: {row.get('error')}"
        return f"[{row['label']}] crop {row['crop']}: {why} (peak {row.get('peak_allocated_gib')} GiB)"
    s, sp = row["step_s"], row["split_s"]
    return (f"[{row['label']}] crop {row['crop']}: {s['median']:.3f} s/step (p20 {s['p20']:.3f}, p80 {s['p80']:.3f}); "
            + ", ".join(f"{k} {v:.3f}" for k, v in sp.items())
            + f"; peak {row['peak_allocated_gib']} GiB; {row['tflops_achieved']:.3g} TFLOP/s")


# ---------------------------------------------------------------- ablation and max crop
def ablation_configs(ops: tuple[str, ...] = KERNEL_OPS) -> list[dict]:
    """The ablation ladder: baseline, each op's Triton kernel alone, all of ``ops`` together, fp32 vs bf16,
    compile, and finally no activation checkpointing (where memory allows); every other rung checkpoints each
    block, as AF2 training does. A toggled op runs with ``impl="auto"``: Triton wherever its ``supports()``
    accepts the call, the reference elsewhere (e.g. attention with a head-broadcast bias); the rows record
    which implementations really ran. ``ops`` restricts the ladder (e.g. leaving out a kernel that fails on
    this GPU); the other ops stay on the reference."""
    every = ",".join(f"{op}=auto" for op in ops)
    tag = "all kernels" if set(ops) == set(KERNEL_OPS) else f"kernels ({', '.join(ops)})"
    ck = {"checkpointing": True}
    rows = [{"label": "baseline (reference, bf16)", "kernels": "reference", **ck}]
    rows += [{"label": f"+ {op} triton", "kernels": f"{op}=auto", **ck} for op in ops]
    rows += [{"label": f"{tag} triton", "kernels": every, **ck},
             {"label": f"{tag} triton, fp32", "kernels": every, "dtype": "fp32", **ck},
             {"label": f"{tag} + compile", "kernels": every, "compile": True, **ck},
             {"label": f"{tag} + compile, no checkpointing", "kernels": every, "compile": True,
              "checkpointing": False}]
    return rows


def run_ablation(preset: str, *, data: str = "synthetic", crop: int | None = None, steps: int = 5,
                 warmup: int = 2, num_recycles: int | None = None, results: Path | None = None,
                 configs: list[dict] | None = None, profile: bool = False,
                 log: Callable[[str], None] = print) -> list[dict]:
    out = []
    for c in configs or ablation_configs():
        out.append(run_step_benchmark(preset, data=data, crop=crop, steps=steps, warmup=warmup,
                                      num_recycles=num_recycles, results=results, profile=profile, log=log, **c))
    return out


def run_max_crop(preset: str, *, kernels: str = "reference", compile: bool = False,
                 checkpointing: bool | None = None, dtype: str = "bf16", start: int = 256, limit: int = 4096,
                 step: int = 32, results: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Largest crop (a multiple of ``step``) at which one training step (0 recycles: the gradient pass is
    the memory peak) runs without running out of memory: doubling from ``start``, then bisection."""
    tried: dict[int, bool] = {}
    start = max(step, min(start, limit) // step * step)

    def fits(n: int) -> bool:
        if n not in tried:
            r = run_step_benchmark(preset, data="synthetic", crop=n, kernels=kernels, compile=compile,
                                   checkpointing=checkpointing, dtype=dtype, steps=1, warmup=0, num_recycles=0,
                                   label=f"max-crop probe {n}", log=log)
            if r.get("error") and not r.get("oom"):
                raise RuntimeError(f"max-crop probe at crop {n} failed: {r['error']}")
            tried[n] = r["step_s"] is not None
        return tried[n]

    lo, hi = 0, None
    n = start
    while n <= limit:
        if fits(n):
            lo, n = n, n * 2
        else:
            hi = n
            break
    if lo == 0:                                   # even the start does not fit: search below it
        hi, lo = start, 0
    hi = hi if hi is not None else limit + step
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    cfg = get_preset(preset)
    row = {"bench": "max_crop", "preset": preset, "kernels": kernels, "compile": compile, "dtype": dtype,
           "checkpointing": cfg.model.checkpoint_blocks if checkpointing is None else checkpointing,
           "max_crop": lo, "first_oom": hi if hi <= limit else None, "limit": limit, "step": step,
           "probes": {str(k): v for k, v in sorted(tried.items())},
           "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
           "torch": torch.__version__, "commit": _git_commit(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    log(f"max crop [{kernels}{' + compile' if compile else ''}]: {lo} (first OOM: {row['first_oom']})")
    if results is not None:
        append_jsonl(results, [row])
    return row


def rows_for_report(results: Path, preset: str, crop: int, ops: tuple[str, ...] = KERNEL_OPS
                    ) -> tuple[list[dict], list[dict]]:
    """The latest row of each ablation configuration and each max-crop search in ``results`` that match this
    preset, crop (step rows), GPU and commit, in ladder order."""
    device = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    commit = _git_commit()
    steps: dict[str, dict] = {}
    crops: dict[tuple, dict] = {}
    for line in results.read_text().splitlines() if results.exists() else []:
        r = json.loads(line)
        if r.get("preset") != preset or r.get("device") != device or r.get("commit") != commit:
            continue
        if r.get("bench") == "train_step" and r.get("crop") == crop and not r["label"].startswith("max-crop"):
            steps[r["label"]] = r
        elif r.get("bench") == "max_crop":
            crops[(r["kernels"], r["compile"], r["checkpointing"])] = r
    order = {c["label"]: i for i, c in enumerate(ablation_configs(ops))}
    return sorted(steps.values(), key=lambda r: order.get(r["label"], len(order))), list(crops.values())
