"""The ``foldforge`` command line: thin entry points over the package."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_SAMPLE_CACHE = "cache/sample"


def _prepare_parser(sub) -> None:
    p = sub.add_parser(
        "prepare", help="turn structures (+ MSAs, template hits) into the ahead-of-time feature cache",
        description="Parse mmCIF/PDB files, MSAs and template hits once and write one checksummed, "
                    "memory-mappable record per protein chain plus a manifest. With no data arguments the "
                    "bundled sample is prepared. Bad inputs are reported per chain and skipped; re-running "
                    "skips records that are already up to date.")
    p.add_argument("--mmcif-dir", help="directory of .cif/.cif.gz/.pdb/.pdb.gz files (searched recursively); "
                                       "default: the bundled sample")
    p.add_argument("--msa-dir", help="AF2-layout alignments: <msa-dir>/<pdb>_<chain>/{*.a3m,*.sto,*.hhr}; "
                                     "without it every chain is prepared in single-sequence mode")
    p.add_argument("--template-mmcif-dir", help="template structures; enables template features from the "
                                                "hits (pdb70_hits.hhr, hmm_output.sto, *.m8) in each chain's MSA dir")
    p.add_argument("--max-template-hits", type=int, default=20, help="template hits kept per chain (default 20)")
    p.add_argument("--max-template-date", help="absolute template release cutoff YYYY-MM-DD")
    p.add_argument("--template-gap-days", type=int, default=60,
                   help="templates must be released this many days before the query (default 60)")
    p.add_argument("--max-msa-depth", type=int, default=16384, help="MSA rows kept per chain (default 16384)")
    p.add_argument("--allow-missing-msa", action="store_true",
                   help="with --msa-dir, prepare chains without alignments in single-sequence mode")
    p.add_argument("--clusters", help="cluster file: one cluster per line, members '<pdb>_<chain>'")
    p.add_argument("--out", help=f"cache directory (default: {DEFAULT_SAMPLE_CACHE} for the sample)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all CPU cores)")
    p.add_argument("--force", action="store_true", help="rebuild every record even if up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _cmd_prepare(args) -> int:
    from foldforge.data.prepare import SAMPLE_DIR, PrepareOptions, run_prepare

    if args.mmcif_dir is None:  # the bundled sample: structures, alignments and template hits
        args.mmcif_dir = str(SAMPLE_DIR / "mmcif")
        args.msa_dir = args.msa_dir or str(SAMPLE_DIR / "alignments")
        args.template_mmcif_dir = args.template_mmcif_dir or str(SAMPLE_DIR / "mmcif")
        args.allow_missing_msa = True  # the two PSICOV domains are single-sequence
    out = args.out or DEFAULT_SAMPLE_CACHE
    opts = PrepareOptions(
        mmcif_dir=args.mmcif_dir, out=out, msa_dir=args.msa_dir, template_mmcif_dir=args.template_mmcif_dir,
        max_template_hits=args.max_template_hits, max_template_date=args.max_template_date,
        template_gap_days=args.template_gap_days, max_msa_depth=args.max_msa_depth,
        allow_missing_msa=args.allow_missing_msa, clusters=args.clusters, workers=args.workers, force=args.force)
    try:
        res = run_prepare(opts, progress=not args.quiet)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {len(res.entries)} chain records in {out} ({res.reused} already up to date), "
          f"{len(res.failed)} failed, {len(res.skipped)} non-protein chains skipped")
    for f in res.failed:
        where = f"{f['input']}" + (f" chain {f['chain']}" if f.get("chain") else "")
        print(f"  failed: {where}: {f['reason']}")
    return 0 if res.entries else 1


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="summarize a prepared cache, or a preset's model (parameter counts)",
                       description="Summarize a feature cache (--data; --verify re-hashes every record) or, with "
                                   "--preset, the model a preset builds: parameter count per module.")
    p.add_argument("--data", default=DEFAULT_SAMPLE_CACHE, help=f"cache directory (default {DEFAULT_SAMPLE_CACHE})")
    p.add_argument("--preset", help="print the parameter count of this preset's model instead")
    p.add_argument("--depth", type=int, default=1, help="with --preset: module depth of the breakdown (default 1)")
    p.add_argument("--verify", action="store_true", help="re-check the checksum of every record")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _cmd_info(args) -> int:
    if args.preset:
        import torch

        from foldforge.model.af2.model import AlphaFold2, count_parameters
        from foldforge.presets import get_preset

        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            counts = count_parameters(AlphaFold2(get_preset(args.preset).model), depth=args.depth)
        if args.json:
            print(json.dumps({"preset": args.preset, "parameters": counts}))
        else:
            print(f"preset {args.preset}: {counts['total']:,} parameters")
            for name, n in counts.items():
                if name != "total":
                    print(f"  {name:<28} {n:>12,}")
        return 0
    from foldforge.data.cache import CacheError
    from foldforge.data.info import cache_summary, format_summary

    try:
        summary = cache_summary(args.data, verify=args.verify, progress=not args.json)
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 1 if summary.get("corrupt") else 0


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: data (record -> batch), step (whole training steps)")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)
    d = bsub.add_parser("data", help="time cached record -> AF2 batch on one CPU core",
                        description="Median time per sample of loading a cached record and building the "
                                    "model-ready AF2 batch, single CPU thread; appends a row to the results.")
    d.add_argument("--data", default=DEFAULT_SAMPLE_CACHE, help="cache directory")
    d.add_argument("--preset", default="af2_initial", help="data shapes (default af2_initial = MLPerf)")
    d.add_argument("--samples", type=int, default=50, help="timed samples per record (default 50)")
    d.add_argument("--msa-chain", action="append", default=[], metavar="DIR",
                   help="also time a record built from an AF2-layout MSA directory alone (repeatable)")
    d.add_argument("--results", default="benchmarks/results/data_pipeline.jsonl",
                   help="JSONL file the measurement is appended to")


    st = bsub.add_parser("step", help="time whole AF2 training steps on real cached features",
                         description="Recycling forward, loss, backward, clipping and Adam on batches from a "
                                     "prepared cache at the preset's shapes; median step time and peak memory.")
    st.add_argument("--preset", default="tiny_af2", help="model and data preset (default tiny_af2)")
    st.add_argument("--data", default=DEFAULT_SAMPLE_CACHE, help="cache directory")
    st.add_argument("--crop", type=int, help="override the preset's crop size")
    st.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    st.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    st.add_argument("--recycles", type=int, help="recycling iterations (default: the preset's maximum)")
    st.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    st.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype (default bf16)")
    st.add_argument("--results", default="benchmarks/results/train_step.jsonl", help="JSONL results file")


def _cmd_bench(args) -> int:
    if args.bench_cmd == "step":
        from foldforge.bench.step import run_step_benchmark

        run_step_benchmark(args.data, args.preset, steps=args.steps, warmup=args.warmup,
                           checkpointing=args.checkpointing, dtype=args.dtype, crop=args.crop,
                           num_recycles=args.recycles, results=Path(args.results))
        return 0
    from foldforge.bench.data import run_data_benchmark

    run_data_benchmark(args.data, args.preset, samples=args.samples, results=Path(args.results),
                       msa_chains=tuple(Path(d) for d in args.msa_chain))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="foldforge", description="Fast training of AlphaFold-family models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _prepare_parser(sub)
    _info_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    return {"prepare": _cmd_prepare, "info": _cmd_info, "bench": _cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
