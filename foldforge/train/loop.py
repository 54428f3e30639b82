"""The AF2 training loop (AF2 Suppl. 1.11), readable top to bottom.

``run()`` is what ``foldforge train`` calls: it sets up the process group (``distributed.py``), the run
directory and its resolved ``config.json`` (``checkpoint.py``), then :func:`train`:

1. seeds; the model (fp32 master weights), Adam + schedule, EMA (``optim.py``);
2. the data: a deterministic validation split of the cache's chains, the AF2-weighted, rank-sharded
   sampler over the rest, a DataLoader;
3. ``--resume``: the newest checkpoint that loads restores weights, EMA, optimizer, scheduler, RNG
   states and the sampler position (``checkpoint.py``), so the run continues exactly;
4. per step: torch RNG reseeded from (seed, step, micro-batch, rank), the recycle count drawn from (seed, step) (the
   same on every rank, no communication), ``grad_accum`` micro-batches of forward (bf16 autocast on
   CUDA) + loss + backward, global-norm clipping, the NaN/Inf guard, Adam, EMA;
5. JSONL metrics, evaluation of the EMA weights on the validation chains every ``eval_every`` steps
   (``foldforge.eval.evaluate.evaluate_model``), ``--target-lddt`` stop, checkpoints every
   ``checkpoint_every`` steps and at the end, a summary and the report.

Reseeding torch per micro-batch (instead of one stream for the whole run) makes dropout a function of
(seed, step, micro-batch, rank): a resumed run draws the same masks as an uninterrupted one and every rank draws its
own, without gathering per-rank RNG states into rank 0's checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import json
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from foldforge.config import RunConfig
from foldforge.data.cache import MANIFEST, FeatureCache
from foldforge.data.dataset import AF2Dataset, make_loader, sampling_weights
from foldforge.model.af2.losses import af2_loss
from foldforge.model.af2.model import AlphaFold2
from foldforge.train import checkpoint as ckpt
from foldforge.train import distributed as D
from foldforge.train.metrics import MetricsLogger, Progress, read_metrics
from foldforge.train.optim import EMA, freeze_zero_weight_heads, make_optimizer
from foldforge.train.checkpoint import check_resume_config, resolve_config

DEFAULT_PRESET, DEFAULT_DATA = "tiny_af2", "cache/sample"


class TrainingStopped(RuntimeError):
    """The run stopped early for a reason the user must see (non-finite losses in a row)."""


def run(*, preset: str | None = None, data: str | None = None, out: str | None = None, resume: bool = False,
        overrides: list[str] = (), max_steps: int | None = None, target_lddt: float | None = None,
        progress: bool = True) -> dict:
    """``foldforge train``: resolve the run, train, shut the process group down cleanly."""
    env = D.init_distributed()
    ok = False
    try:
        cfg, run_dir, data = resolve_config(env, preset=preset, data=data, out=out, resume=resume,
                                            overrides=overrides, max_steps=max_steps, target_lddt=target_lddt,
                                            default_preset=DEFAULT_PRESET, default_data=DEFAULT_DATA)
        ensure_cache(env, data)
        summary = train(cfg, env, run_dir, data, resume=resume, progress=progress)
        ok = True
        return summary
    finally:
        D.shutdown(env, ok=ok)


def ensure_cache(env: D.DistEnv, data: str) -> None:
    """The default cache is prepared from the bundled sample the first time (rank 0; the others wait)."""
    if not (Path(data) / MANIFEST).is_file() and Path(data) == Path(DEFAULT_DATA):
        if env.is_main:
            from foldforge.data.prepare import SAMPLE_DIR, PrepareOptions, run_prepare

            print(f"no feature cache in {data}: preparing the bundled sample there first")
            run_prepare(PrepareOptions(mmcif_dir=str(SAMPLE_DIR / "mmcif"), out=data,
                                       msa_dir=str(SAMPLE_DIR / "alignments"),
                                       template_mmcif_dir=str(SAMPLE_DIR / "mmcif"), allow_missing_msa=True))
        D.barrier(env)


def split_records(ids: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split of the cache's records: chains ordered by a hash of their id
    (independent of seed, order and cache location), the first ``max(1, round(f * n))`` validate.
    ``val_fraction`` <= 0: no validation. A cache of one chain trains and validates on it."""
    if val_fraction <= 0:
        return list(range(len(ids))), []
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())
    n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
    if n_val == 0:
        return [0], [0]
    return sorted(order[n_val:]), sorted(order[:n_val])


def subset_cache(cache: FeatureCache, indices: list[int]) -> FeatureCache:
    """A view of ``cache`` with only the records ``indices`` (the validation dataset)."""
    sub = copy.copy(cache)
    sub.entries = [cache.entries[i] for i in indices]
    sub._index = {e["id"]: i for i, e in enumerate(sub.entries)}
    return sub


def sample_num_recycles(seed: int, step: int, max_recycles: int) -> int:
    """AF2 Suppl. 1.10: the number of recycling iterations is drawn uniformly in [0, max] per step,
    from a generator of (seed, step) alone: identical on every rank, before or after a resume."""
    return int(np.random.default_rng([seed, step, 0x2EC]).integers(0, max_recycles + 1))


def reseed_step(seed: int, step: int, micro: int, rank: int) -> None:
    """Dropout masks of this step, micro-batch and rank (see the module docstring). Called right before
    the forward: creating a DataLoader iterator (at every epoch start) draws from the global torch RNG."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, micro, rank, 0xD20]).generate_state(1)[0]))


class DataPosition:
    """Where the sampler is: ``epoch`` and ``index`` in this rank's key list (stored in checkpoints)."""

    def __init__(self, epoch: int = 0, index: int = 0):
        self.epoch, self.index = epoch, index

    def stream(self, loader, sampler: D.ShardedKeySampler):
        """Batches forever; the position advances as batches are taken (not as workers prefetch them)."""
        while True:
            sampler.set_position(self.epoch, self.index)
            for batch in loader:
                self.index += batch.aatype.shape[0]
                yield batch
            self.epoch, self.index = self.epoch + 1, 0


def train(cfg: RunConfig, env: D.DistEnv, run_dir: Path, data: str, *, resume: bool = False,
          progress: bool = True) -> dict:
    t, device = cfg.train, env.device
    t.check()
    precision = t.precision if device.type == "cuda" else "fp32"   # bf16 autocast is a GPU recipe
    say = print if env.is_main else (lambda *a, **k: None)

    # 1. model, optimizer, EMA ------------------------------------------------------------------
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    random.seed(t.seed)
    model = AlphaFold2(cfg.model).to(device)
    model.set_checkpoint_blocks(cfg.model.checkpoint_blocks)
    frozen = freeze_zero_weight_heads(model, cfg.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, t, device)
    ema = EMA(model, t.ema_decay)

    # 2. data -------------------------------------------------------------------------------------
    train_ds = AF2Dataset(data, cfg.data, seed=t.seed, train=True)
    cache = train_ds.cache
    train_idx, val_idx = split_records(cache.ids(), t.val_fraction)
    val_ds = AF2Dataset(subset_cache(cache, val_idx), cfg.data, seed=t.seed, train=False) if val_idx else None
    n_fit = len(train_idx) if t.eval_train_chains < 0 else min(t.eval_train_chains, len(train_idx))
    fit_ds = AF2Dataset(subset_cache(cache, train_idx[:n_fit]), cfg.data, seed=t.seed, train=False) \
        if n_fit > 0 else None
    target_key = "mean_lddt_ca" if t.target_split == "val" else "train_mean_lddt_ca"
    target_ds = val_ds if t.target_split == "val" else fit_ds
    has_eval = val_ds is not None or fit_ds is not None
    samples_per_step = t.batch_size * t.grad_accum * env.world_size
    sampler = D.ShardedKeySampler(
        train_idx, sampling_weights([cache.entries[i] for i in train_idx], cfg.data),
        epoch_samples=D.epoch_samples(len(train_idx), samples_per_step), seed=t.seed, env=env)
    loader = make_loader(train_ds, sampler, batch_size=t.batch_size, num_workers=t.num_workers)

    # 3. resume -----------------------------------------------------------------------------------
    step, wall_s, nonfinite_total, in_a_row, pos = 0, 0.0, 0, 0, DataPosition()
    found = ckpt.load_latest(run_dir) if resume else None
    if found is not None:
        path, state = found
        check_resume_config(state, cfg, env.world_size)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        step, wall_s = state["step"], state["wall_s"]
        nonfinite_total, in_a_row = state["nonfinite_total"], state["nonfinite_in_a_row"]
        pos = DataPosition(state["data"]["epoch"], state["data"]["index"])
        say(f"resumed from {path} (step {step})")
        del state
    elif resume:
        say(f"no checkpoint in {run_dir}: starting from step 0 with its config.json")
    if env.is_main:
        ckpt.clean_temp_files(run_dir)
    metrics = MetricsLogger(run_dir, enabled=env.is_main)
    metrics.truncate_after(step if found is not None else -1)  # drop what a killed process logged later
    ddp_model = D.wrap_model(model, env)
    eval_model = AlphaFold2(cfg.model).to(device) if (has_eval and env.is_main) else None
    n_params = sum(p.numel() for p in model.parameters())
    say(f"run {run_dir}: {cfg.name}, {n_params:,} parameters, {len(train_idx)} train / {len(val_idx)} val "
        f"chains, {env.world_size} x {device.type} {precision}, {samples_per_step} samples/step, "
        f"steps {step}->{t.max_steps}" + (f"; frozen (loss weight 0): {', '.join(frozen)}" if frozen else ""))

    def evaluate(at_step: int) -> float | None:
        """EMA weights on the validation chains and (``train.eval_train_chains``) on training chains, rank 0;
        the mean lDDT-Ca of ``train.target_split`` is broadcast to all ranks."""
        value = torch.zeros(1, dtype=torch.float64, device=device)
        if eval_model is not None:
            from foldforge.eval.evaluate import evaluate_model

            t0 = time.perf_counter()
            ema.copy_to(eval_model).eval()
            rec: dict = {"kind": "eval", "step": at_step}
            for prefix, ds in (("", val_ds), ("train_", fit_ds)):
                if ds is None:
                    continue
                res = evaluate_model(eval_model, ds, num_recycles=cfg.data.max_recycling_iters, device=device,
                                     precision=precision)
                rec.update({f"{prefix}mean_lddt_ca": res["mean_lddt_ca"], f"{prefix}mean_lddt": res.get("mean_lddt"),
                            f"{prefix}per_chain": res.get("per_chain", {})})
            rec["eval_s"] = time.perf_counter() - t0
            metrics.log(rec)
            if target_ds is not None:
                value.fill_(rec[target_key])
                bar.val = rec[target_key]
        return float(D.broadcast_(value, env)) if target_ds is not None else None

    def save(at_step: int) -> None:
        if env.is_main:
            ckpt.save_checkpoint(run_dir, at_step, {
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": ckpt.rng_state(),
                "data": {"epoch": pos.epoch, "index": pos.index}, "config": cfg.to_dict(), "wall_s": wall_s,
                "nonfinite_total": nonfinite_total, "nonfinite_in_a_row": in_a_row,
                "world_size": env.world_size}, keep=t.keep_checkpoints)

    bar = Progress(step, t.max_steps, bar=progress, main=env.is_main)
    batches = pos.stream(loader, sampler)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    eval_due = lambda s: has_eval and t.eval_every > 0 and (s % t.eval_every == 0 or s == t.max_steps)  # noqa: E731
    target, reached = t.target_lddt, None
    if target is not None and (target_ds is None or t.eval_every <= 0):
        raise ValueError(f"--target-lddt with train.target_split={t.target_split!r} needs "
                         + ("validation (train.val_fraction > 0" if t.target_split == "val"
                            else "training chains to evaluate (train.eval_train_chains != 0")
                         + " and train.eval_every > 0)")
    if step == 0 and eval_due(0):
        evaluate(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # 4. the loop ---------------------------------------------------------------------------------
    while step < t.max_steps:
        t_start = time.perf_counter()
        num_recycles = sample_num_recycles(t.seed, step, cfg.data.max_recycling_iters)
        ddp_model.train()
        opt.zero_grad(set_to_none=True)
        data_wait, sums = 0.0, {}
        for micro in range(t.grad_accum):
            t_wait = time.perf_counter()
            batch = next(batches).to(device, non_blocking=True).as_dict()
            data_wait += time.perf_counter() - t_wait
            reseed_step(t.seed, step, micro, env.rank)
            last = micro == t.grad_accum - 1
            # DDP all-reduces gradients on the last micro-batch only
            with (ddp_model.no_sync() if env.distributed and not last else contextlib.nullcontext()):
                with autocast:
                    outputs = ddp_model(batch, num_recycles=num_recycles)
                loss, terms = af2_loss(outputs, batch, cfg.loss)   # fp32 (AF2 Suppl. 1.9)
                (loss / t.grad_accum).backward()
            terms["loss"] = loss.detach()   # the value backpropagated (what the NaN guard must see)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.float() / t.grad_accum
            del outputs, loss, terms, batch
        # global-norm clipping (AF2 Suppl. 1.11.3); grads are already averaged over ranks here
        max_norm = t.clip_grad_norm if t.clip_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        names = sorted(sums)
        reduced = D.all_reduce_mean(torch.stack([sums[k] for k in names]), env).tolist()
        logged = dict(zip(names, reduced))
        grad_norm = float(grad_norm)
        # NaN/Inf guard: the same decision on every rank (all-reduced loss, synchronised gradients)
        skipped = not (math.isfinite(logged["loss"]) and math.isfinite(grad_norm))
        if skipped:
            opt.zero_grad(set_to_none=True)
            nonfinite_total, in_a_row = nonfinite_total + 1, in_a_row + 1
        else:
            opt.step()
            ema.update(model)
            in_a_row = 0
        lr = sched.get_last_lr()[0]
        with warnings.catch_warnings():   # the rate follows the step even when the first updates are skipped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            sched.step()
        step += 1
        step_time = time.perf_counter() - t_start
        wall_s += step_time

        # 5. metrics, evaluation, checkpoints -----------------------------------------------------
        record = {"kind": "train", "step": step, **logged, "lr": lr, "grad_norm": grad_norm,
                  "step_time": step_time, "samples_per_s": samples_per_step / step_time,
                  "data_wait_s": data_wait, "num_recycles": num_recycles, "skipped": skipped,
                  "nonfinite_total": nonfinite_total}
        if device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if t.log_every > 0 and (step % t.log_every == 0 or skipped or step == t.max_steps):
            metrics.log(record)
        bar.update(logged["loss"], logged.get("lddt_ca"), skipped)
        if skipped:
            bar.write(f"step {step}: non-finite loss or gradient norm (loss {logged['loss']}, grad norm "
                      f"{grad_norm}); update skipped ({in_a_row} in a row, {nonfinite_total} in total)")
        if t.max_nonfinite_in_a_row > 0 and in_a_row >= t.max_nonfinite_in_a_row:
            bar.close()
            metrics.close()
            last = ckpt.list_checkpoints(run_dir)
            raise TrainingStopped(
                f"stopped at step {step}: {in_a_row} non-finite steps in a row (train.max_nonfinite_in_a_row="
                f"{t.max_nonfinite_in_a_row}); no update was applied for them. Last good checkpoint: "
                f"{last[-1][1] if last else 'none'}. Lower train.lr, check the data, or resume from it.")
        if eval_due(step):
            t_eval = time.perf_counter()
            val = evaluate(step)
            wall_s += time.perf_counter() - t_eval
            if target is not None and val is not None and val >= target and reached is None:
                reached = {"step": step, "wall_s": wall_s, "mean_lddt_ca": val}
        # no periodic checkpoint on a skipped step: the newest one stays that of the last good update
        if (t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and not skipped) or step == t.max_steps \
                or reached:
            save(step)
        if reached:
            bar.write(f"target lDDT-Ca {target} reached at step {step}: {val:.4f} after {wall_s:.1f} s")
            break
    bar.close()
    metrics.close()
    summary = _summary(run_dir, cfg, step, wall_s, nonfinite_total, reached) if env.is_main else {}
    if env.is_main:
        _write_report(run_dir)
    return summary


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _summary(run_dir: Path, cfg: RunConfig, step: int, wall_s: float, nonfinite_total: int,
             reached: dict | None) -> dict:
    """lDDT-Ca start -> end (train: mean of the first/last 10 logged steps; validation and training chains
    evaluated whole with the EMA weights: first/last eval),
    time to target; written to RUN_DIR/summary.json."""
    tr, ev = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    summary = {
        "run_dir": str(run_dir), "preset": cfg.name, "steps": step, "wall_s": wall_s,
        "nonfinite_skipped": nonfinite_total,
        "train_lddt_ca_start": _mean(tr[:10], "lddt_ca"), "train_lddt_ca_end": _mean(tr[-10:], "lddt_ca"),
        "val_lddt_ca_start": ev[0].get("mean_lddt_ca") if ev else None,
        "val_lddt_ca_end": ev[-1].get("mean_lddt_ca") if ev else None,
        "train_eval_lddt_ca_start": ev[0].get("train_mean_lddt_ca") if ev else None,
        "train_eval_lddt_ca_end": ev[-1].get("train_mean_lddt_ca") if ev else None,
        "target_split": cfg.train.target_split,
        "target_lddt": cfg.train.target_lddt, "time_to_target": reached,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _write_report(run_dir: Path) -> None:
    """Plots and tables by ``foldforge.eval.report`` when that module is installed."""
    try:
        from foldforge.eval.report import write_report
    except ImportError:
        return
    try:
        write_report(run_dir)
    except Exception as e:  # the run's checkpoints and metrics are written; a plotting problem is not fatal
        print(f"warning: report not written: {type(e).__name__}: {e}")
