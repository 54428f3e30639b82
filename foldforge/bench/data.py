"""Benchmark: cached record -> model-ready AF2 batch, on one CPU core (``foldforge bench data``).

Times, per sample, the three things a loader worker does: map + verify the record (first touch), build
the batch (crop, template subsample, per-recycle MSA sampling / masking / clustering, padding) and wrap it
as torch tensors. Each record is sampled ``samples`` times with distinct keys after warm-up. One row per
run is appended to a JSONL results file with the machine, versions and commit.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from foldforge.data import residue_constants as rc
from foldforge.data.batch import AF2Batch
from foldforge.data.cache import FeatureCache
from foldforge.data.dataset import record_inputs
from foldforge.data.features import build_record, sequence_only
from foldforge.data.msa import load_chain_msas
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
    if os.environ.get("FOLDFORGE_COMMIT"):  # set where the tree travels without its .git (device runs)
        return os.environ["FOLDFORGE_COMMIT"]
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


def msa_chain_record(chain_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A record from an AF2-layout MSA directory alone (query = MSA row 0, no coordinates)."""
    msa = load_chain_msas(chain_dir)
    name = "/".join(chain_dir.parts[-2:])
    structure, chain = sequence_only(rc.aatype_to_sequence(msa.aatype[0]), name)
    arrays, meta = build_record(structure, chain, msa)
    entry = {"id": f"{name} (MSA only)", "length": meta["length"], "msa_depth": meta["msa_depth"],
             "num_templates": 0, "nbytes": sum(a.nbytes for a in arrays.values())}
    arrays["resolution"] = np.float32(np.nan)
    return entry, arrays


def _sources(cache: FeatureCache | None, msa_chains: tuple[Path, ...]):
    """(manifest-like entry, transform inputs, first-load seconds or None) per benchmarked record."""
    for i in range(len(cache) if cache is not None else 0):
        t0 = time.perf_counter()
        record = cache.load(i)  # first touch: mmap + SHA-256 of the whole record
        yield cache.entries[i], record_inputs(record), time.perf_counter() - t0
    for d in msa_chains:
        yield (*msa_chain_record(Path(d)), None)


def time_records(cache: FeatureCache | None, preset: str, samples: int, warmup: int = 3,
                 msa_chains: tuple[Path, ...] = ()) -> dict:
    cfg = get_preset(preset).data
    load_t, build_t, wrap_t, per_record, stages = [], [], [], [], {}
    for i, (e, inputs, first_load) in enumerate(_sources(cache, msa_chains)):
        rec_build = []
        for s in range(warmup + samples):
            rng = np.random.default_rng([0, 0, i, s])  # as AF2Dataset.rng(SampleKey(i, 0, s)) with seed 0
            timed = s >= warmup
            t1 = time.perf_counter()
            feats = make_af2_batch(inputs, cfg, rng, train=True, timer=stages if timed else None)
            t2 = time.perf_counter()
            AF2Batch.from_numpy(feats)
            t3 = time.perf_counter()
            if timed:
                rec_build.append(t2 - t1)
                build_t.append(t2 - t1)
                wrap_t.append(t3 - t2)
        if first_load is not None:
            load_t.append(first_load)
        per_record.append({"id": e["id"], "length": e["length"], "msa_depth": e["msa_depth"],
                           "num_templates": e["num_templates"], "record_mib": round(e["nbytes"] / 2**20, 3),
                           "first_load_ms": None if first_load is None else round(first_load * 1e3, 3),
                           "build_median_ms": round(float(np.median(rec_build)) * 1e3, 3)})
    total = [b + w for b, w in zip(build_t, wrap_t)]
    n = max(1, len(build_t))
    return {"preset": preset, "shapes": {"crop": cfg.crop_size, "n_clust": cfg.max_msa_clusters,
                                         "n_extra": cfg.max_extra_msa, "n_templ": cfg.max_templates,
                                         "recycle_copies": cfg.num_recycle_copies},
            "per_sample": _pct(total), "build": _pct(build_t), "to_torch": _pct(wrap_t),
            "first_load_verify": _pct(load_t) if load_t else None,
            "stages_mean_ms": {k: round(v * 1e3 / n, 3) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])},
            "records": per_record}


def run_data_benchmark(cache_dir: str | Path | None, preset: str, *, samples: int = 50,
                       results: Path | None = None, msa_chains: tuple[Path, ...] = ()) -> dict:
    torch.set_num_threads(1)
    cache = FeatureCache(cache_dir, verify="never") if cache_dir else None
    extra = "".join(f" --msa-chain {d}" for d in msa_chains)
    row = {
        "bench": "data_pipeline", "what": "cached record -> model-ready AF2 batch, one CPU thread",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_name(), "cores_used": 1, "python": platform.python_version(), "numpy": np.__version__,
        "torch": torch.__version__, "commit": _git_commit(), "cache": str(cache_dir),
        "samples_per_record": samples,
        "command": f"foldforge bench data --data {cache_dir} --preset {preset} --samples {samples}{extra}",
        **time_records(cache, preset, samples, msa_chains=msa_chains),
    }
    ps = row["per_sample"]
    print(f"{row['what']}: {len(row['records'])} records, preset {preset} "
          f"(crop {row['shapes']['crop']}, N_clust {row['shapes']['n_clust']}, N_extra {row['shapes']['n_extra']}, "
          f"{row['shapes']['n_templ']} templates, {row['shapes']['recycle_copies']} recycling copies)")
    print(f"  per sample: median {ps['median_ms']:.2f} ms (p10 {ps['p10_ms']:.2f}, p90 {ps['p90_ms']:.2f}); "
          f"build {row['build']['median_ms']:.2f} ms, to torch {row['to_torch']['median_ms']:.3f} ms; "
          + (f"first load + verify {row['first_load_verify']['median_ms']:.2f} ms" if cache else ""))
    print("  where the time goes (mean ms per sample, MSA stages summed over the recycling copies): "
          + ", ".join(f"{k} {v:.2f}" for k, v in row["stages_mean_ms"].items()))
    for r in row["records"]:
        print(f"  {r['id']:>10}  L={r['length']:<5} depth={r['msa_depth']:<6} templates={r['num_templates']:<3} "
              f"{r['record_mib']:.2f} MiB  first load {r['first_load_ms']} ms  build {r['build_median_ms']:.2f} ms")
    if results is not None:
        append_jsonl(results, [row])
        print(f"  appended to {results}")
    return row


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append benchmark rows (one JSON object per line) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
