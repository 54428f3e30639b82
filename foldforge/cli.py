"""The ``foldforge`` command line: thin entry points over the package."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_SAMPLE_CACHE = "cache/sample"
BENCH_OPS = ("attention", "layer_norm", "ln_linear", "transition", "gated_output", "dropout", "triangle_mult",
             "outer_product_mean")


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


def _kernels_arg(spec: str) -> str:
    """argparse type of --kernels: the spec unchanged if it parses, else a usage error naming the bad entry."""
    from foldforge.bench.step import parse_kernels

    try:
        parse_kernels(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--kernels: ")) from None
    return spec


def _kernel_ops_arg(spec: str) -> tuple[str, ...]:
    from foldforge.bench.step import KERNEL_OPS

    ops = tuple(o.strip() for o in spec.split(",") if o.strip())
    bad = [o for o in ops if o not in KERNEL_OPS]
    if bad or not ops:
        raise argparse.ArgumentTypeError(f"unknown kernel op(s) {bad or spec!r}; choose from {KERNEL_OPS}")
    return ops


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: data (record -> batch), step / ablation / max-crop (whole "
                                     "training steps), ops (kernels)")
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


    def step_args(q, *, steps: int = 5) -> None:
        q.add_argument("--preset", default="tiny_af2", help="model and data preset (default tiny_af2)")
        q.add_argument("--data", default="synthetic",
                       help="'synthetic' (default: exact shapes, full masks, built from the bundled real chains) "
                            "or a prepared cache directory")
        q.add_argument("--crop", type=int, help="override the preset's crop size")
        q.add_argument("--steps", type=int, default=steps, help=f"timed steps (default {steps})")
        q.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
        q.add_argument("--recycles", type=int,
                       help="recycling iterations per step (default: sampled per step as in training)")
        q.add_argument("--results", default="benchmarks/results/train_step.jsonl", help="JSONL results file")

    st = bsub.add_parser("step", help="time whole AF2 training steps (forward with recycling, backward, "
                                      "optimizer, EMA)",
                         description="Real training steps after warm-up: median/p20/p80 step time, split into "
                                     "data / forward / backward / optimizer (CUDA events), peak allocated and "
                                     "reserved memory, samples/s and achieved TFLOP/s (analytic matmul FLOP "
                                     "count, foldforge/bench/flops.py). Appends one JSONL row.")
    step_args(st)
    st.add_argument("--kernels", default="reference", type=_kernels_arg,
                    help="reference | triton | auto, or op=impl,... with op in attention, layer_norm, "
                         "triangle_mult, outer_product_mean, transition, gated_output, dropout (default reference)")
    st.add_argument("--compile", action="store_true", help="torch.compile every Evoformer/extra-MSA/template block")
    ck = st.add_mutually_exclusive_group()
    ck.add_argument("--checkpointing", dest="checkpointing", action="store_true", default=None,
                    help="activation checkpointing per block (default: the preset's setting)")
    ck.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    st.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype (default bf16)")
    st.add_argument("--batch-size", type=int, default=1,
                    help="samples stacked per step, as train.batch_size (default 1); samples/s counts them")
    ab = bsub.add_parser("ablation", help="the step benchmark with each optimization switched on in turn",
                         description="Baseline (reference kernels, bf16) -> + each Triton op alone -> all "
                                     "kernels -> fp32 for comparison -> + torch.compile -> without activation "
                                     "checkpointing; one row each, then a markdown table (and PNG with --report).")
    step_args(ab)
    ab.add_argument("--report", help="write a markdown report (and a PNG chart beside it) to this path, from every "
                                     "row of the results file with this preset, crop, GPU and commit (so a ladder "
                                     "split over several invocations reports as one)")
    ab.add_argument("--kernel-ops", type=_kernel_ops_arg, help="comma-separated kernel ops of the ladder (default: every op of "
                                         "KernelConfig); the others stay on the reference")
    ab.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="run only the configurations whose label contains TEXT (repeatable)")
    ab.add_argument("--exclude", action="append", default=[], metavar="TEXT",
                    help="skip the configurations whose label contains TEXT (repeatable)")
    ab.add_argument("--max-crop-limit", type=int, default=2048, help="largest crop the max-crop search tries")
    ab.add_argument("--profile", action="store_true", help="profile one extra step of each configuration "
                                                          "(top kernels go into the rows and the report)")
    ab.add_argument("--max-crop", action="store_true", help="also search the largest trainable crop for the "
                                                           "baseline and the fastest configuration")
    mc = bsub.add_parser("max-crop", help="largest crop (multiple of 32) that trains one step without OOM",
                         description="Doubling then bisection over the crop size; one training step (0 recycles) "
                                     "per probe on synthetic data; OOM is caught and counted as 'does not fit'.")
    mc.add_argument("--preset", default="tiny_af2", help="model and data preset (default tiny_af2)")
    mc.add_argument("--kernels", default="reference", type=_kernels_arg, help="as for bench step (default reference)")
    mc.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    mck = mc.add_mutually_exclusive_group()
    mck.add_argument("--checkpointing", dest="checkpointing", action="store_true", default=None,
                     help="activation checkpointing per block (default: the preset's setting)")
    mck.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    mc.add_argument("--start", type=int, default=256, help="first crop tried (default 256)")
    mc.add_argument("--limit", type=int, default=4096, help="largest crop tried (default 4096)")
    mc.add_argument("--results", default="benchmarks/results/train_step.jsonl", help="JSONL results file")
    op = bsub.add_parser("ops", help="time each kernel (ours vs eager, torch.compile and peers) at the canonical "
                                     "shapes",
                         description="Forward, backward and forward+backward of the Triton kernels against the eager "
                                     "reference and torch.compile of it (attention also against SDPA, "
                                     "FlexAttention and cuEquivariance; triangle multiplication against "
                                     "cuEquivariance, when installed); peak extra memory; LayerNorm bandwidth vs a "
                                     "plain copy. One JSONL row per measurement.")
    op.add_argument("--op", choices=BENCH_OPS + ("all",), default="all", help="op (default all)")
    op.add_argument("--shapes", choices=("af2", "af3", "all"), default="all", help="canonical shape set")
    op.add_argument("--quick", action="store_true", help="tiny shapes (CPU: reference and compile only)")
    op.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="activation dtype")
    op.add_argument("--results", default="benchmarks/results/ops.jsonl", help="JSONL results file")
    op.add_argument("--report", help="also write a markdown report of this run to this path")
    op.add_argument("--tune", metavar="JSON", help="first sweep the kernels' block sizes on this GPU, write the "
                                                   "table here and use it for the measurements")


def _cmd_bench(args) -> int:
    if args.bench_cmd == "ops":
        from foldforge.bench import ops, ops_attention, ops_pair

        if args.tune:
            ops.tune_ops(Path(args.tune))
        rows = []
        kw = dict(quick=args.quick, dtype=args.dtype, results=Path(args.results))
        for name in (BENCH_OPS if args.op == "all" else (args.op,)):
            if name in ops.OPS:
                rows += ops.run_ops_benchmark(name, args.shapes, **kw)
            elif name == "attention":
                rows += ops_attention.run_attention_benchmark(args.shapes, **kw)
            elif name == "triangle_mult":
                rows += ops_pair.run_triangle_mult_benchmark(args.shapes, **kw)
            else:
                rows += ops_pair.run_outer_product_mean_benchmark(args.shapes, **kw)
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text("\n".join(filter(None, (
                ops.format_report([r for r in rows if r["op"] in ops.OPS]),
                ops_attention.format_attention_report(rows), ops_pair.format_pair_report(rows)))))
        return 0
    if args.bench_cmd == "step":
        from foldforge.bench.step import run_step_benchmark

        row = run_step_benchmark(args.preset, data=args.data, crop=args.crop, kernels=args.kernels,
                                 compile=args.compile, checkpointing=args.checkpointing, dtype=args.dtype,
                                 steps=args.steps, warmup=args.warmup, num_recycles=args.recycles,
                                 batch_size=args.batch_size, results=Path(args.results))
        return 0 if row["step_s"] is not None or row["oom"] else 1
    if args.bench_cmd == "ablation":
        from foldforge.bench.step import run_ablation, run_max_crop
        from foldforge.bench.step_report import write_ablation_report

        from foldforge.bench.step import KERNEL_OPS, ablation_configs, rows_for_report

        kernel_ops = args.kernel_ops or KERNEL_OPS
        configs = [c for c in ablation_configs(kernel_ops)
                   if (not args.only or any(o in c["label"] for o in args.only))
                   and not any(x in c["label"] for x in args.exclude)]
        rows = run_ablation(args.preset, data=args.data, crop=args.crop, steps=args.steps, warmup=args.warmup,
                            num_recycles=args.recycles, results=Path(args.results), profile=args.profile,
                            configs=configs)
        if args.max_crop:
            ok = [r for r in rows if r["step_s"] is not None]
            run_max_crop(args.preset, kernels="reference", limit=args.max_crop_limit, results=Path(args.results))
            if ok:
                best = min(ok, key=lambda r: r["step_s"]["median"])
                run_max_crop(args.preset, kernels=best["kernels_spec"], compile=best["compile"],
                             checkpointing=best["checkpointing"], limit=args.max_crop_limit,
                             results=Path(args.results))
        if args.report:
            crop = rows[0]["crop"] if rows else args.crop
            all_rows, crops = rows_for_report(Path(args.results), args.preset, crop, kernel_ops)
            write_ablation_report(Path(args.report), all_rows, crops)
            print(f"report: {args.report} ({len(all_rows)} configurations, {len(crops)} max-crop searches)")
        return 0
    if args.bench_cmd == "max-crop":
        from foldforge.bench.step import run_max_crop

        run_max_crop(args.preset, kernels=args.kernels, compile=args.compile, checkpointing=args.checkpointing,
                     start=args.start, limit=args.limit, results=Path(args.results))
        return 0
    from foldforge.bench.data import run_data_benchmark

    run_data_benchmark(args.data, args.preset, samples=args.samples, results=Path(args.results),
                       msa_chains=tuple(Path(d) for d in args.msa_chain))
    return 0


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model (default: tiny_af2 on the bundled sample, a few minutes on CPU)",
        description="Train from a prepared cache: AF2-weighted chain sampling, recycling, Adam with the preset's "
                    "schedule, EMA, NaN guard, evaluation of the EMA weights on held-out chains, atomic "
                    "checkpoints; JSONL metrics in RUN_DIR/metrics.jsonl. Runs as one process or under torchrun "
                    "(DDP). With no arguments: preset tiny_af2 on cache/sample (prepared first if missing).")
    p.add_argument("--preset", help="config preset (default tiny_af2; on --resume: the run's own)")
    p.add_argument("--data", help=f"cache directory (default {DEFAULT_SAMPLE_CACHE}; on --resume: the run's own)")
    p.add_argument("--out", help="run directory (default runs/<preset>-<timestamp>; required with --resume)")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--target-lddt", type=float, help="stop when the validation lDDT-Ca of the EMA weights "
                                                     "reaches this; reports the time and steps to get there")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. train.lr=5e-4 model.evoformer.num_blocks=4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_train(args) -> int:
    from foldforge.train.loop import TrainingStopped, run

    try:
        s = run(preset=args.preset, data=args.data, out=args.out, resume=args.resume, overrides=args.set,
                max_steps=args.max_steps, target_lddt=args.target_lddt, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError, TrainingStopped) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not s:   # ranks other than 0
        return 0
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"done: {s['steps']} steps in {s['wall_s']:.1f} s; train lDDT-Ca {fmt(s['train_lddt_ca_start'])} -> "
          f"{fmt(s['train_lddt_ca_end'])}, validation {fmt(s['val_lddt_ca_start'])} -> {fmt(s['val_lddt_ca_end'])}"
          f"; run directory {s['run_dir']}")
    if s["target_lddt"] is not None:
        t = s["time_to_target"]
        print(f"target lDDT-Ca {s['target_lddt']}: " + (f"reached at step {t['step']} after {t['wall_s']:.1f} s"
                                                       if t else "not reached"))
    return 0


# ---- evaluation and inference (foldforge/eval/) ----

_WEIGHTS_HELP = "which weights of the checkpoint: ema (default; AF2 evaluates the EMA model) or model (raw)"
_CKPT_HELP = ("training checkpoint (.pt written by foldforge train), or a run directory / its checkpoints/ "
              "folder (the latest step_XXXXXXX.pt is used)")


def _eval_parsers(sub) -> None:
    e = sub.add_parser(
        "evaluate", help="score a checkpoint on whole chains of a prepared cache (lDDT-Cα, lDDT, RMSD)",
        description="Predict every chain of a prepared cache whole (no crop) with a checkpoint and score it "
                    "against the true structure: lDDT-Cα (MLPerf/OpenFold), full-atom lDDT, Cα-RMSD after "
                    "superposition, distogram accuracy and mean pLDDT. Prints the per-chain table and the "
                    "means; with --out also writes them as CSV and JSON.")
    e.add_argument("--checkpoint", required=True, help=_CKPT_HELP)
    e.add_argument("--data", default=DEFAULT_SAMPLE_CACHE, help=f"prepared cache (default {DEFAULT_SAMPLE_CACHE})")
    e.add_argument("--out", help="write the table to OUT.csv and OUT.json (give table.csv, table.json or a stem)")
    e.add_argument("--num-recycles", type=int, help="recycling iterations (default: the run's max_recycling_iters)")
    e.add_argument("--weights", choices=("ema", "model"), default="ema", help=_WEIGHTS_HELP)
    e.add_argument("--ids", nargs="+", metavar="ID", help="only these records (e.g. 1abc_A 2xyz_B)")
    e.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    e.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="forward precision (default fp32)")
    e.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")

    p = sub.add_parser(
        "predict", help="predict structures for FASTA sequences (mmCIF/PDB with pLDDT as B-factors)",
        description="For every FASTA record: features from the sequence alone, or from the --msa files whose "
                    "query row is that sequence (merged and de-duplicated as AF2 does); the model; then "
                    "OUT/<name>.cif and/or .pdb with the per-residue pLDDT (0-100) in the B-factor column, "
                    "and OUT/<name>.json with the mean and per-residue pLDDT.")
    p.add_argument("--checkpoint", required=True, help=_CKPT_HELP)
    p.add_argument("--fasta", required=True, help="protein FASTA file (one or more records)")
    p.add_argument("--msa", nargs="+", default=[], metavar="A3M", action="extend",
                   help="alignments (.a3m or .sto); each goes to the record whose sequence is its first row")
    p.add_argument("--num-recycles", type=int, help="recycling iterations (default: the run's max_recycling_iters)")
    p.add_argument("--out", default="predictions", help="output directory (default ./predictions)")
    p.add_argument("--format", choices=("cif", "pdb", "both"), default="cif", help="structure format (default cif)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help=_WEIGHTS_HELP)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="forward precision (default fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the MSA sampling and masking (default 0)")

    s = sub.add_parser(
        "score", help="lDDT-Cα, lDDT and Cα-RMSD of a model structure file against a reference",
        description="Compare two structure files (mmCIF or PDB, optionally gzipped; first model). Chains are "
                    "matched by chain id, residues by author residue number + insertion code; residues with "
                    "a Cα in both files are scored. Prints one line of JSON: "
                    '{"lddt_ca": ..., "lddt": ..., "rmsd_ca": ...} (RMSD in Å after superposition).')
    s.add_argument("--model", required=True, help="predicted (or any) structure to score")
    s.add_argument("--reference", required=True, help="reference (true) structure")

    r = sub.add_parser(
        "report", help="plot a training run's metrics (PNG files in RUN_DIR/plots/)",
        description="Read RUN_DIR/metrics.jsonl and write RUN_DIR/plots/losses.png (loss terms, log scale), "
                    "lddt_ca.png (train and eval lDDT-Cα over steps) and per_chain_lddt.png (latest eval).")
    r.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (holds metrics.jsonl)")


def _cmd_evaluate(args) -> int:
    from foldforge.data.cache import CacheError
    from foldforge.eval.checkpoint_io import CheckpointError
    from foldforge.eval.evaluate import format_table, json_safe, run_evaluate

    try:
        result = run_evaluate(args.checkpoint, args.data, out=args.out, num_recycles=args.num_recycles,
                              weights=args.weights, ids=args.ids, device=args.device, precision=args.precision,
                              progress=not args.json)
    except (CheckpointError, CacheError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json_safe(result)))
        return 0
    print(f"checkpoint {result['checkpoint']} (step {result.get('step')}, {result['weights']} weights), "
          f"{result['num_recycles']} recycles, {result['num_chains']} chains")
    print(format_table(result))
    for path in result.get("written", []):
        print(f"wrote {path}")
    return 0


def _cmd_predict(args) -> int:
    from foldforge.eval.checkpoint_io import CheckpointError
    from foldforge.eval.predict import PredictError, run_predict

    try:
        summaries = run_predict(args.checkpoint, args.fasta, msa_paths=args.msa, out_dir=args.out,
                                num_recycles=args.num_recycles, fmt=args.format, weights=args.weights,
                                device=args.device, precision=args.precision, seed=args.seed)
    except (PredictError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in summaries:
        print(f"{s['name']}: {s['length']} residues, MSA depth {s['msa_depth']}, mean pLDDT {s['mean_plddt']:.1f} "
              f"-> {', '.join(s['files'])}")
    return 0


def _cmd_score(args) -> int:
    from foldforge.eval.evaluate import json_safe
    from foldforge.eval.score import ScoreError, run_score

    try:
        result = run_score(args.model, args.reference)
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(json_safe(result)))
    return 0


def _cmd_report(args) -> int:
    from foldforge.eval.report import ReportError, write_report

    try:
        paths = write_report(args.run_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


_EVAL_COMMANDS = {"evaluate": _cmd_evaluate, "predict": _cmd_predict, "score": _cmd_score, "report": _cmd_report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="foldforge", description="Fast training of AlphaFold-family models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _prepare_parser(sub)
    _info_parser(sub)
    _bench_parser(sub)
    _train_parser(sub)
    _eval_parsers(sub)
    args = parser.parse_args(argv)
    commands = {"prepare": _cmd_prepare, "info": _cmd_info, "bench": _cmd_bench, "train": _cmd_train,
                **_EVAL_COMMANDS}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
