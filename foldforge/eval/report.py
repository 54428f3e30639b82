"""Plots of a training run: ``foldforge report RUN_DIR`` -> PNG files in ``RUN_DIR/plots/``.

Reads ``RUN_DIR/metrics.jsonl``, whose lines the training loop writes:

- ``{"kind": "train", "step", "loss", <loss terms: fape_backbone, distogram, masked_msa, ...>, "lddt_ca",
  "lr", "grad_norm", "step_time", ...}``
- ``{"kind": "eval", "step", "mean_lddt_ca", "mean_lddt", "per_chain": {id: {"lddt_ca", ...}}}`` and, when
  training chains are evaluated too, the same keys prefixed ``train_``

and writes ``losses.png`` (total loss and the main AF2 loss terms over steps, log scale),
``lddt_ca.png`` (training lDDT-Cα of the crops and evaluation mean lDDT-Cα of whole chains over steps)
and ``per_chain_lddt.png`` (lDDT-Cα per chain of the latest evaluation). A line that is not valid JSON
(e.g. the half-written last line of a killed run) is skipped; when a resumed run logs a step again, the
last record of that step wins. Uses matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# AF2 Suppl. 1.9 terms plotted beside the total, in this order, where the log has them (and the run's
# config does not give them weight 0)
MAIN_LOSS_TERMS = ("fape_backbone", "fape_sidechain", "supervised_chi", "distogram", "masked_msa", "plddt",
                   "experimentally_resolved", "violation")
_TERM_WEIGHT = {"supervised_chi": "chi_weight", "distogram": "distogram_weight", "masked_msa": "masked_msa_weight",
                "plddt": "plddt_weight", "experimentally_resolved": "experimentally_resolved_weight",
                "violation": "violation_weight"}
PLOT_FILES = ("losses.png", "lddt_ca.png", "per_chain_lddt.png")


class ReportError(ValueError):
    """No usable metrics (missing or empty metrics.jsonl); the message says what was looked for."""


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of ``run_dir/metrics.jsonl``, each sorted by step, one per step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} not found: is {run_dir} a training run directory? "
                          f"(`foldforge train` writes metrics.jsonl there)")
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(rec, dict) or rec.get("kind") not in by_kind or not isinstance(rec.get("step"), int):
            continue
        by_kind[rec["kind"]][rec["step"]] = rec
    if bad:
        print(f"report: skipped {bad} malformed line(s) in {path}", file=sys.stderr)
    train = [by_kind["train"][s] for s in sorted(by_kind["train"])]
    evals = [by_kind["eval"][s] for s in sorted(by_kind["eval"])]
    if not train and not evals:
        raise ReportError(f"{path} has no train or eval records yet (is the run still starting?)")
    return train, evals


def _series(records: list[dict], key: str, positive: bool = False) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _figure(plt, title: str, xlabel: str, ylabel: str):
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _plot_losses(plt, train: list[dict], run_name: str, path: Path, loss_cfg: dict) -> Path:
    fig, ax = _figure(plt, f"{run_name}: training loss", "step", "loss (log scale)")
    window = max(1, len(train) // 50)
    plotted = 0
    terms = [k for k in MAIN_LOSS_TERMS if loss_cfg.get(_TERM_WEIGHT.get(k, ""), 1.0) != 0]
    for key in ["loss"] + terms:
        steps, values = _series(train, key, positive=True)
        if not steps:
            continue
        width = 2.0 if key == "loss" else 1.2
        if window > 1:  # raw values faint, moving average on top
            line, = ax.plot(steps, values, alpha=0.2, linewidth=0.8)
            ax.plot(steps, _smooth(values, window), color=line.get_color(), linewidth=width, label=key)
        else:
            ax.plot(steps, values, linewidth=width, marker="." if len(steps) < 30 else None, label=key)
        plotted += 1
    if plotted:
        ax.set_yscale("log")
        ax.legend(fontsize=8, ncol=2)
    else:
        ax.text(0.5, 0.5, "no training loss logged yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_lddt(plt, train: list[dict], evals: list[dict], run_name: str, path: Path) -> Path:
    fig, ax = _figure(plt, f"{run_name}: lDDT-Cα", "step", "lDDT-Cα")
    steps, values = _series(train, "lddt_ca")
    if steps:
        window = max(1, len(steps) // 50)
        ax.plot(steps, values, alpha=0.25 if window > 1 else 0.8, linewidth=0.8,
                label="train (crops)" if window == 1 else None, color="tab:blue")
        if window > 1:
            ax.plot(steps, _smooth(values, window), color="tab:blue", linewidth=1.5,
                    label=f"train (crops, mean of {window})")
    for key, label, color in (("mean_lddt_ca", "validation mean lDDT-Cα (EMA, whole chains)", "tab:red"),
                              ("mean_lddt", "validation mean lDDT (all atoms)", "tab:orange"),
                              ("train_mean_lddt_ca", "training chains mean lDDT-Cα (EMA, whole chains)",
                               "tab:green")):
        s, v = _series(evals, key)
        if s:
            ax.plot(s, v, marker="o", linewidth=1.5, color=color, label=label)
    ax.set_ylim(0.0, 1.0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no lDDT-Cα logged yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_per_chain(plt, evals: list[dict], run_name: str, path: Path) -> Path:
    latest = evals[-1]
    chains = {k: v.get("lddt_ca") for k, v in (latest.get("per_chain") or {}).items()}
    chains = {k: float(v) for k, v in chains.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    names = sorted(chains, key=chains.get)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4.5), dpi=120)
    ax.set_title(f"{run_name}: lDDT-Cα per chain, evaluation at step {latest['step']}")
    ax.set_ylabel("lDDT-Cα")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, axis="y", alpha=0.3)
    if names:
        ax.bar(range(len(names)), [chains[n] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7 if len(names) > 30 else 8)
        mean = latest.get("mean_lddt_ca")
        if isinstance(mean, (int, float)) and math.isfinite(mean):
            ax.axhline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.3f}")
            ax.legend(fontsize=8, loc="upper left")
    else:
        ax.text(0.5, 0.5, "the latest evaluation has no per-chain scores", ha="center", va="center",
                transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path) -> list[Path]:
    """Write the run's plots into ``run_dir/plots/`` and return their paths. The per-chain plot is left
    out (with a note on stderr) until the run has an evaluation record."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    name, loss_cfg = run_dir.resolve().name, {}
    config = run_dir / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
            name = f"{name} ({cfg.get('name', '?')})"
            loss_cfg = cfg.get("loss") or {}
        except (json.JSONDecodeError, AttributeError):
            pass
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = [_plot_losses(plt, train, name, plots / PLOT_FILES[0], loss_cfg),
               _plot_lddt(plt, train, evals, name, plots / PLOT_FILES[1])]
    if evals:
        written.append(_plot_per_chain(plt, evals, name, plots / PLOT_FILES[2]))
    else:
        print(f"report: no eval records in {run_dir / 'metrics.jsonl'} yet; {PLOT_FILES[2]} not written",
              file=sys.stderr)
    return written
