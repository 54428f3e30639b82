"""Evaluation of a model on whole chains of a prepared cache (the MLPerf HPC OpenFold validation step).

:func:`evaluate_model` is what the training loop calls with its EMA model; ``foldforge evaluate`` wraps it
for a checkpoint (:func:`run_evaluate`). Every chain is predicted whole, as the MLPerf HPC OpenFold
validation does: the features come from ``make_af2_batch(train=False)`` (no crop, no MSA block deletion,
the first templates), padding residues (``pad_to``) are sliced off before scoring, and the model runs in
eval mode without gradient (AF2 Suppl. 1.11.7: evaluation uses the EMA of the parameters, which is what the
training loop passes in). Metrics per chain: :func:`foldforge.eval.metrics.chain_metrics`; the means are plain
averages over chains (MLPerf averages per-chain lDDT-Cα), ignoring NaN entries.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from foldforge.config import LossConfig
from foldforge.data.batch import AF2Batch, collate
from foldforge.data.dataset import AF2Dataset, SampleKey, record_inputs
from foldforge.data.transforms import make_af2_batch
from foldforge.eval.metrics import chain_metrics

PRECISIONS = ("fp32", "bf16")
# per-chain metric -> key of its mean in the result (the training loop logs these names)
MEAN_KEYS = {"lddt_ca": "mean_lddt_ca", "lddt": "mean_lddt", "rmsd_ca": "mean_rmsd_ca",
             "distogram_acc": "mean_distogram_acc", "mean_plddt": "mean_plddt"}
TABLE_COLUMNS = ("id", "num_residues", "num_observed_ca", "lddt_ca", "lddt", "rmsd_ca", "distogram_acc",
                 "mean_plddt")


def eval_batch(dataset: AF2Dataset, index: int, *, pad_to: int | None = None) -> AF2Batch:
    """Whole-chain features of record ``index`` with a batch dim of 1: ``make_af2_batch(train=False)``
    whatever ``dataset.train`` is, with the dataset's deterministic generator for epoch 0, draw 0.

    The residue axis has the chain's own length, or ``pad_to`` if that is longer (fixed shapes); the
    features of the real residues are the same either way (padding never draws random numbers)."""
    record = dataset.cache.load(index)
    cfg = dataclasses.replace(dataset.cfg, crop_size=pad_to or 1)  # eval never crops: crop_size only pads
    feats = make_af2_batch(record_inputs(record), cfg, dataset.rng(SampleKey(index)), train=False)
    return collate([AF2Batch.from_numpy(feats)])


def autocast_context(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset: AF2Dataset, *, num_recycles: int,
                   device: str | torch.device | None = None, precision: str = "fp32",
                   ids: Iterable[str] | None = None, loss_cfg: LossConfig | None = None,
                   pad_to: int | None = None, progress: bool = False) -> dict:
    """Predict every chain of ``dataset`` (or the record ``ids``) whole and score it.

    ``model`` must already be on ``device`` (default: the device of its parameters); it is put in eval
    mode for the call and back in its previous mode after. ``precision`` "bf16" runs the forward under
    bf16 autocast (the structure module and heads stay fp32 inside the model). Distogram bins follow
    ``loss_cfg`` (default :class:`LossConfig`). Chains run at their own length; ``pad_to`` pads shorter
    ones to a fixed length (padding is sliced off before scoring).

    Returns ``{"mean_lddt_ca", "mean_lddt", "mean_rmsd_ca", "mean_distogram_acc", "mean_plddt",
    "num_chains", "per_chain": {record_id: {"lddt_ca", "lddt", "rmsd_ca", "distogram_acc", "mean_plddt",
    "num_residues", "num_observed_ca"}}}``; metric values are Python floats.
    """
    loss_cfg = loss_cfg or LossConfig()
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    all_ids = dataset.cache.ids()
    if ids is None:
        indices = list(range(len(all_ids)))
    else:
        wanted, known = list(ids), set(all_ids)
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise ValueError(f"records not in the cache {dataset.cache.dir}: {unknown}")
        indices = [dataset.cache.index_of(i) for i in wanted]
    iterator = indices
    if progress:
        from tqdm import tqdm

        iterator = tqdm(indices, desc="evaluate", unit="chain")

    was_training = model.training
    model.eval()
    per_chain: dict[str, dict] = {}
    try:
        for index in iterator:
            batch = eval_batch(dataset, index, pad_to=pad_to).to(device)
            with autocast_context(device, precision):
                out = model(batch.as_dict(), num_recycles=num_recycles)
            n = int(batch.seq_length[0])  # real residues; the rest is padding (pad_to)
            b = {k: v[0, :n] for k, v in batch.as_dict().items()
                 if k in ("aatype", "all_atom_positions", "all_atom_mask", "pseudo_beta", "pseudo_beta_mask")}
            per_chain[all_ids[index]] = chain_metrics(
                out["final_atom_positions"][0, :n].float(), out["final_atom_mask"][0, :n],
                b["all_atom_positions"], b["all_atom_mask"], b["aatype"],
                distogram_logits=out["distogram_logits"][0, :n, :n].float(),
                pseudo_beta=b.get("pseudo_beta"), pseudo_beta_mask=b.get("pseudo_beta_mask"),
                plddt_logits=out["plddt_logits"][0, :n], distogram_min=loss_cfg.distogram_min,
                distogram_max=loss_cfg.distogram_max)
    finally:
        model.train(was_training)

    result: dict = {mean_key: _nanmean(m.get(key, math.nan) for m in per_chain.values())
                    for key, mean_key in MEAN_KEYS.items()}
    result["num_chains"] = len(per_chain)
    result["per_chain"] = per_chain
    return result


# --------------------------------------------------------------------------------------------------
# Table output (foldforge evaluate)
# --------------------------------------------------------------------------------------------------


def _fmt(value, width: int = 8) -> str:
    if isinstance(value, float):
        return f"{value:>{width}.4f}" if not math.isnan(value) else f"{'nan':>{width}}"
    return f"{value!s:>{width}}"


def format_table(result: dict) -> str:
    """Per-chain rows and the mean row as fixed-width text."""
    cols = TABLE_COLUMNS
    width = max([len("mean")] + [len(k) for k in result["per_chain"]]) + 2
    lines = [f"{'id':<{width}}" + "".join(f"{c:>16}" for c in cols[1:])]
    for rid, m in result["per_chain"].items():
        lines.append(f"{rid:<{width}}" + "".join(_fmt(m.get(c, math.nan), 16) for c in cols[1:]))
    means = {c: result.get(MEAN_KEYS[c], math.nan) if c in MEAN_KEYS else "" for c in cols[1:]}
    lines.append(f"{'mean':<{width}}" + "".join(_fmt(means[c], 16) for c in cols[1:]))
    return "\n".join(lines)


def table_csv(result: dict) -> str:
    """CSV with one row per chain and a final ``mean`` row (NaN written as ``nan``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for rid, m in result["per_chain"].items():
        writer.writerow([rid] + [m.get(c, math.nan) for c in TABLE_COLUMNS[1:]])
    writer.writerow(["mean"] + [result.get(MEAN_KEYS[c], "") if c in MEAN_KEYS else "" for c in TABLE_COLUMNS[1:]])
    return buf.getvalue()


def json_safe(obj):
    """NaN is not valid JSON: written as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_results(result: dict, out: str | Path) -> list[Path]:
    """Write ``<stem>.csv`` and ``<stem>.json`` for ``out`` (``table.csv``, ``table.json`` or a stem)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".csv", ".json") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")
    csv_path.write_text(table_csv(result))
    json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    return [csv_path, json_path]


def run_evaluate(checkpoint: str | Path, data: str | Path, *, out: str | Path | None = None,
                 num_recycles: int | None = None, weights: str = "ema", ids: list[str] | None = None,
                 device: str | None = None, precision: str = "fp32", progress: bool = True) -> dict:
    """``foldforge evaluate``: load a checkpoint, evaluate it on the cache ``data``, optionally write the
    table. ``num_recycles`` defaults to the run's ``max_recycling_iters``."""
    from foldforge.eval.checkpoint_io import model_from_checkpoint, read_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = read_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(ckpt, weights=weights, device=device)
    step = ckpt.get("step")
    del ckpt  # both weight sets and any optimizer state: free them before the forward passes
    dataset = AF2Dataset(data, cfg.data, seed=cfg.train.seed, train=False)
    recycles = cfg.data.max_recycling_iters if num_recycles is None else num_recycles
    result = evaluate_model(model, dataset, num_recycles=recycles, device=device, precision=precision,
                            ids=ids, loss_cfg=cfg.loss, progress=progress)
    result.update(checkpoint=str(checkpoint), weights=weights, num_recycles=recycles, precision=precision)
    if step is not None:
        result["step"] = step
    if out is not None:
        result["written"] = [str(p) for p in write_results(result, out)]
    return result
