"""Summary of a prepared cache for ``foldforge info``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from foldforge.data.cache import FeatureCache

LENGTH_BINS = (0, 64, 128, 256, 384, 512, 768, 1024, 10**9)


def cache_summary(cache_dir: str | Path, *, verify: bool = False, progress: bool = True) -> dict:
    cache = FeatureCache(cache_dir, verify="never")
    lengths = np.array([e["length"] for e in cache.entries], dtype=np.int64)
    counts, _ = np.histogram(lengths, bins=LENGTH_BINS)
    hist = {f"{lo}-{hi - 1}" if hi < 10**9 else f">={lo}": int(c)
            for lo, hi, c in zip(LENGTH_BINS[:-1], LENGTH_BINS[1:], counts)}
    on_disk = sum((Path(cache_dir) / e["path"]).stat().st_size for e in cache.entries
                  if (Path(cache_dir) / e["path"]).is_file())
    summary = {
        "cache": str(cache_dir),
        "records": len(cache),
        "failed": len(cache.failed),
        "skipped_non_protein": len(cache.skipped),
        "size_bytes": int(on_disk),
        "residues": int(lengths.sum()),
        "length_min": int(lengths.min()) if len(lengths) else 0,
        "length_max": int(lengths.max()) if len(lengths) else 0,
        "length_histogram": hist,
        "msa_depth_median": float(np.median([e["msa_depth"] for e in cache.entries])) if len(cache) else 0.0,
        "with_templates": sum(1 for e in cache.entries if e["num_templates"] > 0),
        "failures": [{"input": f["input"], "chain": f.get("chain"), "reason": f["reason"]} for f in cache.failed],
    }
    if verify:
        from tqdm import tqdm

        bad = cache.verify_all(progress=(lambda it: tqdm(it, desc="verify", unit="rec")) if progress else None)
        summary["verified"] = len(cache) - len(bad)
        summary["corrupt"] = [{"id": i, "reason": r} for i, r in bad]
    return summary


def format_summary(s: dict) -> str:
    lines = [
        f"cache      {s['cache']}",
        f"records    {s['records']} chains, {s['residues']} residues, {s['size_bytes'] / 2**20:.1f} MiB on disk",
        f"lengths    {s['length_min']}-{s['length_max']}; " + ", ".join(f"{k}: {v}" for k, v in
                                                                        s["length_histogram"].items() if v),
        f"MSA        median depth {s['msa_depth_median']:.0f}; {s['with_templates']} records with templates",
        f"failed     {s['failed']}" + (f"; non-protein chains skipped: {s['skipped_non_protein']}"
                                       if s["skipped_non_protein"] else ""),
    ]
    lines += [f"  {f['input']}" + (f" chain {f['chain']}" if f["chain"] else "") + f": {f['reason']}"
              for f in s["failures"]]
    if "verified" in s:
        lines.append(f"verify     {s['verified']} ok, {len(s['corrupt'])} corrupt")
        lines += [f"  {c['id']}: {c['reason']}" for c in s["corrupt"]]
    return "\n".join(lines)
