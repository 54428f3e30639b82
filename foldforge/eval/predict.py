"""Structure prediction from FASTA (+ optional MSAs): ``foldforge predict``.

Each FASTA record becomes a chain known only by its sequence (:func:`foldforge.data.features.sequence_only`),
its MSA is the single sequence or the given A3M/Stockholm files merged as AF2 merges a chain's MSAs
(AF2 Suppl. 1.2.3: rows de-duplicated, query first), the record goes through ``build_record`` and
``make_af2_batch(train=False)`` exactly as evaluation chains do (whole chain; no templates), and the model
runs ``num_recycles`` recycling iterations (AF2 Suppl. 1.10). Outputs per record, in ``out_dir``:
``<name>.cif`` and/or ``<name>.pdb`` with the per-residue pLDDT (Alg. 29, 0-100) as B-factors, and
``<name>.json`` with the mean and per-residue pLDDT and what the prediction used.

Each MSA file is given to the FASTA record whose sequence is its query row (row 0), so one call may
predict several sequences, each with its own alignments.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from foldforge.data import residue_constants as rc
from foldforge.data.batch import AF2Batch, collate
from foldforge.data.features import build_record, sequence_only, single_sequence_msa
from foldforge.data.msa import MSA, MSAError, merge_msas, read_msa_file
from foldforge.data.transforms import make_af2_batch
from foldforge.eval.evaluate import autocast_context
from foldforge.eval.metrics import plddt_from_logits
from foldforge.eval.writer import build_structure, safe_name, write_structure_files


class PredictError(ValueError):
    """Unusable prediction inputs; the message names the file / record and the problem."""


@dataclass
class FastaRecord:
    name: str          # first word of the header, made file-safe
    description: str   # the whole header line after '>'
    sequence: str      # upper-case one-letter sequence


_VALID = re.compile(r"^[A-Z]+$")


def parse_fasta(text: str, *, source: str = "<fasta>") -> list[FastaRecord]:
    """Protein FASTA records. Whitespace and a trailing '*' are dropped, case is ignored; any other
    character than A-Z (gaps, digits, '.') is an error naming the record and the position."""
    records: list[FastaRecord] = []
    header: str | None = None
    chunks: list[str] = []

    def finish() -> None:
        if header is None:
            return
        seq = "".join(chunks).upper().removesuffix("*")
        where = f"{source}: record {len(records) + 1} ('>{header[:60]}')"
        if not seq:
            raise PredictError(f"{where}: empty sequence")
        if not _VALID.match(seq):
            bad = next(i for i, c in enumerate(seq) if not "A" <= c <= "Z")
            hint = " (an alignment? pass A3M files with --msa)" if seq[bad] in "-." else ""
            raise PredictError(f"{where}: invalid character {seq[bad]!r} at residue {bad + 1}; expected "
                               f"one-letter amino-acid codes{hint}")
        token = header.split()[0] if header.split() else ""
        records.append(FastaRecord(safe_name(token or f"seq{len(records) + 1}"), header, seq))

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            finish()
            header, chunks = line[1:].strip(), []
        elif header is None:
            raise PredictError(f"{source}: line {lineno} comes before the first '>' header; not a FASTA file")
        else:
            chunks.append("".join(line.split()))
    finish()
    if not records:
        raise PredictError(f"{source}: no FASTA records (expected lines starting with '>')")
    seen: dict[str, int] = {}
    for r in records:  # unique output names
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}_{seen[r.name]}"
    return records


def read_fasta(path: str | Path) -> list[FastaRecord]:
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{path}: FASTA file not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise PredictError(f"{path}: not a text file; expected FASTA") from None
    return parse_fasta(text, source=str(path))


def assign_msas(records: Sequence[FastaRecord], msa_paths: Sequence[str | Path]) -> dict[str, list[MSA]]:
    """Parse every MSA file and give it to the record whose sequence equals its query row."""
    by_name: dict[str, list[MSA]] = {r.name: [] for r in records}
    queries = {r.name: rc.sequence_to_aatype(r.sequence) for r in records}
    for p in msa_paths:
        p = Path(p)
        if not p.is_file():
            raise PredictError(f"{p}: MSA file not found")
        try:
            msa = read_msa_file(p)
        except MSAError as e:
            raise PredictError(f"{p}: {e}") from None
        if msa.depth == 0:
            raise PredictError(f"{p}: MSA has no rows")
        hits = [n for n, q in queries.items() if np.array_equal(q, msa.query)]
        if not hits:
            query = rc.aatype_to_sequence(msa.query)
            lengths = ", ".join(f"{r.name} ({len(r.sequence)})" for r in records)
            raise PredictError(f"{p}: its query row ({len(query)} residues, {query[:30]}...) matches no FASTA "
                               f"record; records (length): {lengths}. The first row of an A3M must be the "
                               f"query sequence itself")
        for n in hits:
            by_name[n].append(msa)
    return by_name


def prediction_inputs(record: FastaRecord, msas: Sequence[MSA] = ()) -> tuple[dict[str, np.ndarray], int]:
    """Record arrays (record schema, no structure, no templates) for one sequence; returns the arrays and
    the merged MSA depth."""
    structure, chain = sequence_only(record.sequence, record.name)
    msa = merge_msas([single_sequence_msa(record.sequence), *msas])  # the query is row 0 either way
    arrays, _ = build_record(structure, chain, msa)
    arrays["resolution"] = np.float32(math.nan)
    return arrays, msa.depth


@torch.no_grad()
def predict_arrays(model: torch.nn.Module, cfg, arrays: dict[str, np.ndarray], *, num_recycles: int,
                   device: str | torch.device, precision: str = "fp32", seed: int = 0) -> dict[str, np.ndarray]:
    """One whole-chain forward pass: ``final_atom_positions`` [L, 37, 3], ``final_atom_mask`` [L, 37],
    ``plddt`` [L] (0-100) and ``aatype`` [L], padding removed."""
    device = torch.device(device)
    # no padding up to the training crop: a whole chain of its own length (same features otherwise)
    data_cfg = dataclasses.replace(cfg.data, crop_size=1)
    feats = make_af2_batch(arrays, data_cfg, np.random.default_rng(seed), train=False)
    batch = collate([AF2Batch.from_numpy(feats)]).to(device)
    was_training = model.training
    model.eval()
    try:
        with autocast_context(device, precision):
            out = model(batch.as_dict(), num_recycles=num_recycles)
    finally:
        model.train(was_training)
    n = int(batch.seq_length[0])
    return {
        "aatype": batch.aatype[0, :n].cpu().numpy(),
        "final_atom_positions": out["final_atom_positions"][0, :n].float().cpu().numpy(),
        "final_atom_mask": out["final_atom_mask"][0, :n].float().cpu().numpy(),
        "plddt": plddt_from_logits(out["plddt_logits"][0, :n]).cpu().numpy(),
    }


def run_predict(checkpoint: str | Path, fasta: str | Path, *, msa_paths: Sequence[str | Path] = (),
                out_dir: str | Path = "predictions", num_recycles: int | None = None, fmt: str = "cif",
                weights: str = "ema", device: str | None = None, precision: str = "fp32",
                seed: int = 0) -> list[dict]:
    """``foldforge predict``: every FASTA record -> structure file(s) + JSON summary in ``out_dir``.
    Inputs are all checked before the model is loaded. Returns the JSON summaries."""
    from foldforge.eval.checkpoint_io import model_from_checkpoint, read_checkpoint
    from foldforge.eval.writer import FORMATS

    if fmt not in FORMATS:
        raise PredictError(f"--format must be one of {FORMATS}, got {fmt!r}")
    records = read_fasta(fasta)
    msas = assign_msas(records, msa_paths)
    inputs = {r.name: prediction_inputs(r, msas[r.name]) for r in records}

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = read_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(ckpt, weights=weights, device=device)
    step = ckpt.get("step")
    del ckpt
    recycles = cfg.data.max_recycling_iters if num_recycles is None else num_recycles
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for r in records:
        arrays, depth = inputs[r.name]
        pred = predict_arrays(model, cfg, arrays, num_recycles=recycles, device=device, precision=precision,
                              seed=seed)
        st = build_structure(r.name, pred["aatype"], pred["final_atom_positions"], pred["final_atom_mask"],
                             pred["plddt"])
        files = write_structure_files(st, out_dir / r.name, fmt)
        plddt = np.round(pred["plddt"].astype(np.float64), 2)
        summary = {
            "name": r.name, "description": r.description, "sequence": r.sequence, "length": len(r.sequence),
            "mean_plddt": round(float(pred["plddt"].mean()), 2), "plddt": plddt.tolist(),
            "msa_depth": depth, "msa_files": [m.source for m in msas[r.name]],
            "num_recycles": recycles, "checkpoint": str(checkpoint), "step": step, "weights": weights,
            "files": [str(f) for f in files],
        }
        json_path = out_dir / f"{r.name}.json"
        json_path.write_text(json.dumps(summary, indent=1) + "\n")
        summary["files"].append(str(json_path))
        summaries.append(summary)
    return summaries
