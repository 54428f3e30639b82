"""Run metrics: one JSON line per event in ``RUN_DIR/metrics.jsonl`` (+ TensorBoard if installed), and
the progress bar. Only rank 0 writes; on other ranks every method is a no-op.

Records (one per line, appended and flushed as they happen):

* ``{"kind": "train", "step", "loss", <loss terms>, "lr", "grad_norm", "step_time", "samples_per_s",
  "peak_mem_gib" (CUDA only), "data_wait_s", "num_recycles", "skipped", "nonfinite_total"}``:
  ``step`` counts updates (1 = the first), loss terms are averaged over the step's samples on all ranks.
* ``{"kind": "eval", "step", "mean_lddt_ca", "mean_lddt", "per_chain": {...}, "eval_s"}``: the EMA
  weights after ``step`` updates (0 = the initial weights) on the validation chains; with
  ``train.eval_train_chains`` also ``train_mean_lddt_ca``, ``train_mean_lddt``, ``train_per_chain`` on
  training chains (whole chains, eval mode: the "train lDDT-Ca" of a memorisation run).

On resume, lines of steps after the checkpoint (written by the interrupted process before it died) are
dropped, so the file reads like one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null (a skipped step's loss is then visibly missing)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:   # a line cut short by a kill
            continue
        if kind is None or row.get("kind") == kind:
            rows.append(row)
    return rows


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:       # optional: needs the tensorboard package
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps > ``step`` (resume from the checkpoint of ``step``)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()
        if self._tb is not None:
            kind, step = record.get("kind", "train"), record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A tqdm bar over the run's steps (ETA from tqdm) showing the loss, the train lDDT-Ca (smoothed)
    and the last validation lDDT-Ca; only on rank 0 (``main``), and only with ``bar`` (else messages
    are printed as lines)."""

    def __init__(self, start: int, total: int, *, bar: bool, main: bool = True):
        self.bar = None
        self.main = main
        self.smooth: dict[str, float] = {}
        self.val = None
        if bar and main:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=0.5)

    def update(self, loss: float, lddt_ca: float | None, skipped: bool) -> None:
        if self.bar is None:
            return
        for key, value in (("loss", loss), ("lddt", lddt_ca)):
            if value is not None and math.isfinite(value):   # exponential smoothing over ~10 steps
                self.smooth[key] = value if key not in self.smooth else 0.9 * self.smooth[key] + 0.1 * value
        post = {"loss": f"{self.smooth.get('loss', float('nan')):.3f}",
                "lDDT-Ca": f"{self.smooth.get('lddt', float('nan')):.3f}"}
        if self.val is not None:
            post["val"] = f"{self.val:.3f}"
        if skipped:
            post["skipped"] = "nonfinite"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update()

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.main:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
