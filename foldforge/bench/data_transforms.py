"""Benchmark of :func:`foldforge.data.transforms.make_af2_batch` on one CPU core.

``python -m foldforge.bench.data_transforms`` times the MLPerf shapes (``af2_initial``: crop 256,
124 cluster centres, 1024 extra rows, 4 templates, 4 recycling copies) on a synthetic record of
L = 300 with a 5000-row MSA of realistic composition and 4 templates, and prints the median,
p10/p90 and the per-stage breakdown (ms per call).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from foldforge.config import DataConfig
from foldforge.data import residue_constants as rc
from foldforge.data.transforms import make_af2_batch

# Approximate amino-acid background frequencies (UniProt, %), AF2 residue order.
_BACKGROUND = np.array([8.25, 5.53, 4.06, 5.45, 1.37, 3.93, 6.75, 7.07, 2.27, 5.96,
                        9.66, 5.84, 2.42, 3.86, 4.70, 6.56, 5.34, 1.08, 2.92, 6.87])
_BACKGROUND = _BACKGROUND / _BACKGROUND.sum()


def synthetic_msa(query: np.ndarray, depth: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows obtained by mutating the query, with a real-MSA-like composition.

    Per-row identity ~ Beta(5, 5) (median ~0.5 over aligned columns, ~0.4 counting gaps, as in real
    BFD/UniRef hits), substitutions drawn from background frequencies, terminal coverage gaps and
    two internal gap runs per row (~15-20% gaps overall), deletions at ~2% of positions.
    """
    n_res = query.shape[0]
    identity = rng.beta(5.0, 5.0, depth)
    msa = np.tile(query.astype(np.int8), (depth, 1))
    mutate = rng.random((depth, n_res)) > identity[:, None]
    msa[mutate] = rng.choice(20, int(mutate.sum()), p=_BACKGROUND)
    j = np.arange(n_res)
    cover = rng.random((depth, 2)) * 0.15 * n_res
    msa[(j < cover[:, :1]) | (j >= n_res - cover[:, 1:])] = rc.GAP_ID
    for _ in range(2):
        start = rng.integers(0, n_res, depth)
        length = rng.geometric(0.2, depth)
        msa[(j >= start[:, None]) & (j < (start + length)[:, None])] = rc.GAP_ID
    msa[0] = query
    deletions = np.zeros((depth, n_res), np.uint16)
    has = rng.random((depth, n_res)) < 0.02
    deletions[has] = rng.geometric(0.3, int(has.sum())).astype(np.uint16)
    deletions[0] = 0
    return msa, deletions


def synthetic_record(num_res: int = 300, depth: int = 5000, num_templates: int = 4,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """A record in the docs/design.md schema (random coordinates; target arrays with their shapes)."""
    rng = np.random.default_rng(seed)
    aatype = rng.choice(20, num_res, p=_BACKGROUND).astype(np.int8)
    msa, deletions = synthetic_msa(aatype, depth, rng)
    pos = rng.normal(0, 10, (num_res, 37, 3)).astype(np.float32)
    mask = (rng.random((num_res, 37)) < 0.5).astype(np.uint8)
    mask[:, :3] = 1
    t = num_templates
    rec = {
        "aatype": aatype,
        "residue_index": np.arange(num_res, dtype=np.int32),
        "all_atom_positions": pos,
        "all_atom_mask": mask,
        "msa": msa,
        "deletion_matrix": deletions,
        "template_aatype": np.where(rng.random((t, num_res)) < 0.2, rc.GAP_ID, aatype[None]).astype(np.int8),
        "template_all_atom_positions": rng.normal(0, 10, (t, num_res, 37, 3)).astype(np.float32),
        "template_all_atom_mask": (rng.random((t, num_res, 37)) < 0.5).astype(np.uint8),
        "template_sum_probs": rng.random(t).astype(np.float32) * 100,
        # ground-truth targets: shapes/dtypes of foldforge.data.targets.make_targets
        "atom14_gt_positions": rng.normal(0, 10, (num_res, 14, 3)).astype(np.float32),
        "atom14_gt_exists": np.ones((num_res, 14), np.uint8),
        "atom14_atom_exists": np.ones((num_res, 14), np.uint8),
        "residx_atom14_to_atom37": rng.integers(0, 37, (num_res, 14)).astype(np.int32),
        "residx_atom37_to_atom14": rng.integers(0, 14, (num_res, 37)).astype(np.int32),
        "atom37_atom_exists": np.ones((num_res, 37), np.uint8),
        "atom14_atom_is_ambiguous": np.zeros((num_res, 14), np.uint8),
        "atom14_alt_gt_positions": rng.normal(0, 10, (num_res, 14, 3)).astype(np.float32),
        "atom14_alt_gt_exists": np.ones((num_res, 14), np.uint8),
        "rigidgroups_gt_frames": rng.normal(0, 1, (num_res, 8, 4, 4)).astype(np.float32),
        "rigidgroups_gt_exists": np.ones((num_res, 8), np.uint8),
        "rigidgroups_group_exists": np.ones((num_res, 8), np.uint8),
        "rigidgroups_group_is_ambiguous": np.zeros((num_res, 8), np.uint8),
        "rigidgroups_alt_gt_frames": rng.normal(0, 1, (num_res, 8, 4, 4)).astype(np.float32),
        "torsion_angles_sin_cos": rng.normal(0, 1, (num_res, 7, 2)).astype(np.float32),
        "alt_torsion_angles_sin_cos": rng.normal(0, 1, (num_res, 7, 2)).astype(np.float32),
        "torsion_angles_mask": np.ones((num_res, 7), np.uint8),
        "pseudo_beta": rng.normal(0, 10, (num_res, 3)).astype(np.float32),
        "pseudo_beta_mask": np.ones(num_res, np.uint8),
        "resolution": np.float32(2.0),
    }
    for v in rec.values():
        if isinstance(v, np.ndarray):
            v.setflags(write=False)
    return rec


def time_make_batch(record, cfg: DataConfig, n: int = 50, *, warmup: int = 3, seed: int = 0,
                    train: bool = True) -> dict:
    """Time ``make_af2_batch`` on one thread: median/p10/p90 ms per call after ``warmup`` calls, and
    the mean per-stage breakdown (ms per call; stages of the MSA loop are summed over the copies)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(warmup):
            make_af2_batch(record, cfg, np.random.default_rng([seed, 10**6 + i]), train=train)
        times, stages = [], {}
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            t0 = time.perf_counter()
            make_af2_batch(record, cfg, rng, train=train, timer=stages)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    ms = np.asarray(times) * 1e3
    breakdown = {k: round(v * 1e3 / n, 3) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}
    return {
        "n": n,
        "median_ms": round(float(np.median(ms)), 3),
        "p10_ms": round(float(np.percentile(ms, 10)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "min_ms": round(float(ms.min()), 3),
        "stages_ms": breakdown,
    }


def main(argv: list[str] | None = None) -> None:
    from foldforge.presets import get_preset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="af2_initial")
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--depth", type=int, default=5000)
    ap.add_argument("--templates", type=int, default=4)
    ap.add_argument("-n", type=int, default=50)
    args = ap.parse_args(argv)
    cfg = get_preset(args.preset).data
    rec = synthetic_record(args.length, args.depth, args.templates)
    res = time_make_batch(rec, cfg, n=args.n)
    res.update(preset=args.preset, length=args.length, depth=args.depth, templates=args.templates)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
