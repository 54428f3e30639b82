"""Benchmark of whole AF2 training steps (``foldforge bench step``).

A step is what training does per optimizer update: the recycling forward (``num_recycles`` no-grad passes
plus one with grad), the loss, backward, global-norm gradient clipping and an Adam update. Batches come
from a prepared cache at the preset's data shapes. Timing uses CUDA events around each step after warm-up
(wall clock on CPU); peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps. One JSONL row
per run is appended to the results file with GPU name, versions and commit.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from foldforge.bench.data import _cpu_name, _git_commit
from foldforge.data.batch import collate
from foldforge.data.dataset import AF2Dataset, SampleKey
from foldforge.model.af2.losses import af2_loss
from foldforge.model.af2.model import AlphaFold2
from foldforge.presets import get_preset


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def _run_steps(one_step, device: torch.device, warmup: int, steps: int, times: list, losses: list) -> None:
    """Warm-up steps, then timed ones (CUDA events on GPU, wall clock on CPU); peak memory is reset
    after warm-up so it covers the timed steps only."""
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            terms = one_step(i)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            terms = one_step(i)
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
            losses.append(terms)


def run_step_benchmark(cache_dir: str | Path, preset: str, *, steps: int = 5, warmup: int = 2,
                       checkpointing: bool = False, dtype: str = "bf16", crop: int | None = None,
                       num_recycles: int | None = None, results: Path | None = None, seed: int = 0) -> dict:
    cfg = get_preset(preset)
    if crop is not None:
        cfg.data.crop_size = crop
    cfg.model.checkpoint_blocks = checkpointing
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = AlphaFold2(cfg.model).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-6)
    ds = AF2Dataset(cache_dir, cfg.data, seed=seed)
    recycles = cfg.data.max_recycling_iters if num_recycles is None else num_recycles
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def one_step(i: int) -> dict:
        batch = collate([ds[SampleKey(i % len(ds), 0, i)]]).to(device).as_dict()
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(batch, num_recycles=recycles)
        loss, terms = af2_loss(out, batch, cfg.loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        return {k: float(v) for k, v in terms.items()}

    times, losses = [], []
    try:
        _run_steps(one_step, device, warmup, steps, times, losses)
    except torch.cuda.OutOfMemoryError as e:  # a result too: this configuration does not fit
        print(f"out of memory: {str(e).splitlines()[0]}")
        times, losses = [], []
    oom = not times
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    row = {
        "bench": "train_step", "preset": preset, "crop": cfg.data.crop_size, "num_recycles": recycles,
        "kernels": dataclasses.asdict(cfg.model.kernels), "dtype": dtype, "checkpointing": checkpointing,
        "steps": steps, "warmup": warmup, "oom": oom,
        "step_s_median": None if oom else float(np.median(times)),
        "step_s_min": None if oom else float(np.min(times)),
        "step_s_max": None if oom else float(np.max(times)),
        "peak_allocated_gib": None if peak is None else round(peak / 2**30, 3),
        "peak_reserved_gib": None if reserved is None else round(reserved / 2**30, 3),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": _device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "commit": _git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data": str(cache_dir), "loss_last": losses[-1] if losses else None,
        "command": f"foldforge bench step --preset {preset} --data {cache_dir} --steps {steps}"
                   + (" --checkpointing" if checkpointing else "") + f" --dtype {dtype}"
                   + (f" --crop {crop}" if crop else ""),
    }
    print(json.dumps({k: row[k] for k in ("preset", "crop", "num_recycles", "dtype", "checkpointing", "oom",
                                          "step_s_median", "peak_allocated_gib", "device")}))
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row
