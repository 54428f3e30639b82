"""Markdown report (+ PNG chart) of a step ablation and max-crop search (``foldforge bench ablation --report``).

The published anchors the report compares against (shared/research): ScaleFold on one H100 without DAP
1.81 s/step, with DAP-8 over 8 H100s 0.68 s/step (MLPerf HPC OpenFold shapes); OpenFold 6.5-10 s/step on
an A100. Our goal is <= 0.68 s/step on ONE H100.
"""
from __future__ import annotations

from pathlib import Path

ANCHORS = (
    ("ScaleFold, 1 x H100, no DAP", 1.81),
    ("ScaleFold, 8 x H100, DAP-8 (per step)", 0.68),
    ("OpenFold, 1 x A100 (range 6.5-10)", 6.5),
)
GOAL_S = 0.68


def _fmt(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _used(row: dict) -> str:
    used = row.get("kernels_used") or {}
    tri = sorted(op for op, impls in used.items() if "triton" in impls)
    return ", ".join(tri) if tri else "none"


def format_ablation_report(rows: list[dict], crops: list[dict]) -> str:
    ok = [r for r in rows if r.get("step_s")]
    first = rows[0] if rows else {}
    base = next((r for r in ok if r.get("kernels_spec") == "reference" and r.get("dtype") == "bf16"
                 and not r.get("compile")), ok[0] if ok else None)
    lines = [f"# Training-step ablation: {first.get('preset')} at crop {first.get('crop')} on {first.get('device')}",
             "",
             f"Date {first.get('date', '')[:10]}, commit `{first.get('commit')}`, torch {first.get('torch')}, "
             f"triton {first.get('triton')}. Data: {first.get('data')} (N_clust {first.get('n_clust')}, "
             f"N_extra {first.get('n_extra')}, {first.get('n_templ')} templates); recycles: "
             f"{first.get('num_recycles')}; {first.get('steps')} timed steps after {first.get('warmup')} warm-up. "
             "Step = recycling forward + loss + backward + clipping + Adam + EMA. Times are GPU time between CUDA "
             "events (median; p20-p80 in brackets); TFLOP/s from the analytic matmul count "
             "(foldforge/bench/flops.py; checkpoint recomputation not counted). Rows: "
             "benchmarks/results/train_step.jsonl.",
             "",
             "| configuration | s/step | vs baseline | data | forward | backward | optimizer | peak alloc GiB "
             "| TFLOP/s | Triton ops that ran |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("step_s"):
            why = "OOM" if r.get("oom") else f"error: {str(r.get('error'))[:80]}"
            lines.append(f"| {r['label']} | {why} | | | | | | {_fmt(r.get('peak_allocated_gib'), 2)} | | |")
            continue
        s, sp = r["step_s"], r["split_s"]
        speed = base["step_s"]["median"] / s["median"] if base else None
        lines.append(f"| {r['label']} | {s['median']:.3f} ({s['p20']:.3f}-{s['p80']:.3f}) | "
                     f"{_fmt(speed, 2)}x | {sp['data']:.3f} | {sp['forward']:.3f} | {sp['backward']:.3f} | "
                     f"{sp['optimizer']:.3f} | {_fmt(r.get('peak_allocated_gib'), 2)} | "
                     f"{r['tflops_achieved']:.1f} | {_used(r)} |")
    if crops:
        lines += ["", "## Longest trainable crop", "",
                  "One training step (0 recycles) per probe, synthetic data; doubling from the start crop, then "
                  "bisection in steps of 32, up to the search limit.", "", "| configuration | max crop | first OOM | limit | probes |", "|---|---|---|---|---|"]
        for c in crops:
            cfg = c["kernels"] + (" + compile" if c.get("compile") else "") + \
                (", checkpointing" if c.get("checkpointing") else ", no checkpointing")
            probes = ", ".join(f"{k}{'' if v else ' OOM'}" for k, v in c["probes"].items())
            lines.append(f"| {cfg} | {c['max_crop']} | {c.get('first_oom') or '-'} | {c['limit']} | {probes} |")
    if ok:
        best = min(ok, key=lambda r: r["step_s"]["median"])
        b = best["step_s"]["median"]
        lines += ["", "## Against the published anchors", "",
                  f"Fastest configuration here: **{best['label']}**, {b:.3f} s/step on {best['device']}.", "",
                  "| system | s/step | ours |", "|---|---|---|"]
        for name, t in ANCHORS:
            rel = f"{t / b:.2f}x faster" if t >= b else f"{b / t:.2f}x slower"
            lines.append(f"| {name} | {t:.2f} | {rel} |")
        gap = b / GOAL_S
        lines += ["", f"Goal: <= {GOAL_S} s/step on one H100 — we are at {b:.3f} s, "
                      + ("goal met." if b <= GOAL_S else f"{gap:.2f}x away.")]
        if best.get("profile_top"):
            lines += ["", "## Where the fastest configuration spends its time (one profiled step)", "",
                      "| kernel / op | ms | share | calls |", "|---|---|---|---|"]
            for e in best["profile_top"][:20]:
                lines.append(f"| `{e['name'][:90]}` | {e['ms']:.2f} | {e['share']:.1%} | {e['calls']} |")
    return "\n".join(lines) + "\n"


def plot_ablation(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("step_s")]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ok) + 1.5))
    labels = [r["label"] for r in ok]
    left = [0.0] * len(ok)
    for phase, color in zip(("data", "forward", "backward", "optimizer"), ("#999999", "#4c72b0", "#dd8452", "#55a868")):
        vals = [r["split_s"][phase] for r in ok]
        ax.barh(labels, vals, left=left, color=color, label=phase)
        left = [a + b for a, b in zip(left, vals)]
    ax.axvline(GOAL_S, color="k", ls="--", lw=1, label=f"goal {GOAL_S} s")
    ax.invert_yaxis()
    ax.set_xlabel("seconds per training step (GPU time, median)")
    first = ok[0]
    ax.set_title(f"{first['preset']} crop {first['crop']} on {first['device']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_ablation_report(path: Path, rows: list[dict], crops: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png")
    plot_ablation(png, rows)
    text = format_ablation_report(rows, crops)
    if png.exists():
        text += f"\n![step time by phase]({png.name})\n"
    path.write_text(text)
