"""Benchmark: cached record -> model-ready AF2 batch, on one CPU core (``foldforge bench data``).

Times, per sample, the three things a loader worker does: map + verify the record (first touch), build
the batch (crop, template subsample, per-recycle MSA sampling / masking / clustering, padding) and wrap it
as torch tensors. Each record is sampled ``samples`` times with distinct keys after warm-up. One row per
run is appended to a JSONL results file with the machine, versions and commit.
"""
from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from foldforge.data.batch import AF2Batch
from foldforge.data.cache import FeatureCache
from foldforge.data.dataset import AF2Dataset, SampleKey, record_inputs
from foldforge.data.transforms import make_af2_batch
from foldforge.presets import get_preset


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90))}


def time_records(cache: FeatureCache, preset: str, samples: int, warmup: int = 3) -> dict:
    cfg = get_preset(preset).data
    ds = AF2Dataset(cache, cfg, seed=0)
    load_t, build_t, wrap_t, per_record = [], [], [], []
    for i in range(len(cache)):
        t0 = time.perf_counter()
        record = cache.load(i)  # first touch: mmap + SHA-256 of the whole record
        first_load = time.perf_counter() - t0
        inputs = record_inputs(record)
        rec_build = []
        for s in range(warmup + samples):
            rng = ds.rng(SampleKey(i, 0, s))
            t1 = time.perf_counter()
            feats = make_af2_batch(inputs, cfg, rng, train=True)
            t2 = time.perf_counter()
            AF2Batch.from_numpy(feats)
            t3 = time.perf_counter()
            if s >= warmup:
                rec_build.append(t2 - t1)
                build_t.append(t2 - t1)
                wrap_t.append(t3 - t2)
        load_t.append(first_load)
        e = cache.entries[i]
        per_record.append({"id": e["id"], "length": e["length"], "msa_depth": e["msa_depth"],
                           "num_templates": e["num_templates"], "record_mib": round(e["nbytes"] / 2**20, 3),
                           "first_load_ms": round(first_load * 1e3, 3),
                           "build_median_ms": round(float(np.median(rec_build)) * 1e3, 3)})
    total = [b + w for b, w in zip(build_t, wrap_t)]
    return {"preset": preset, "shapes": {"crop": cfg.crop_size, "n_clust": cfg.max_msa_clusters,
                                         "n_extra": cfg.max_extra_msa, "n_templ": cfg.max_templates,
                                         "recycle_copies": cfg.num_recycle_copies},
            "per_sample": _pct(total), "build": _pct(build_t), "to_torch": _pct(wrap_t),
            "first_load_verify": _pct(load_t), "records": per_record}


def run_data_benchmark(cache_dir: str | Path, preset: str, *, samples: int = 50,
                       results: Path | None = None) -> dict:
    torch.set_num_threads(1)
    cache = FeatureCache(cache_dir, verify="never")
    row = {
        "bench": "data_pipeline", "what": "cached record -> model-ready AF2 batch, one CPU thread",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_name(), "cores_used": 1, "python": platform.python_version(), "numpy": np.__version__,
        "torch": torch.__version__, "commit": _git_commit(), "cache": str(cache_dir),
        "samples_per_record": samples,
        "command": f"foldforge bench data --data {cache_dir} --preset {preset} --samples {samples}",
        **time_records(cache, preset, samples),
    }
    ps = row["per_sample"]
    print(f"{row['what']}: {len(cache)} records, preset {preset} "
          f"(crop {row['shapes']['crop']}, N_clust {row['shapes']['n_clust']}, N_extra {row['shapes']['n_extra']}, "
          f"{row['shapes']['n_templ']} templates, {row['shapes']['recycle_copies']} recycling copies)")
    print(f"  per sample: median {ps['median_ms']:.2f} ms (p10 {ps['p10_ms']:.2f}, p90 {ps['p90_ms']:.2f}); "
          f"build {row['build']['median_ms']:.2f} ms, to torch {row['to_torch']['median_ms']:.3f} ms; "
          f"first load + verify {row['first_load_verify']['median_ms']:.2f} ms")
    for r in row["records"]:
        print(f"  {r['id']:>10}  L={r['length']:<5} depth={r['msa_depth']:<6} templates={r['num_templates']:<3} "
              f"{r['record_mib']:.2f} MiB  first load {r['first_load_ms']:.2f} ms  build {r['build_median_ms']:.2f} ms")
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  appended to {results}")
    return row
