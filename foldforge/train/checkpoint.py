"""Training checkpoints: atomic, pickle-free, newest-that-loads on resume.

A checkpoint is one file ``RUN_DIR/checkpoints/step_XXXXXXX.pt`` (``XXXXXXX`` = completed steps) holding
the model and EMA weights, the optimizer and scheduler state, the step, the RNG states, the data
position (sampler epoch and index in the rank's key list), the wall time so far and the config dict.

* **Atomic**: written to a temp file in the same directory, flushed and fsynced, then ``os.replace``d
  over its final name (and the directory fsynced), so a process killed mid-write leaves at most a
  ``.tmp`` file, never a partial checkpoint. Stale temp files are deleted when a run (re)starts.
* **Pickle-free**: everything is tensors, numbers, strings, lists and dicts, and loading uses
  ``torch.load(weights_only=True)``. RNG states are stored as tensors (numpy's MT19937 key, python's
  ``random`` state) instead of the pickled objects ``get_state()`` returns.
* **Keep last K**: older checkpoints are deleted only after a new one is in place.
* **Latest**: the newest file that loads; a truncated or corrupt file (disk full, copied half-way) is
  skipped with a warning and the previous one is used.

The run directory also holds the resolved ``config.json`` (written when the run starts, read back on
``--resume``) and ``run.json`` (the data path and world size). ``--set key=value`` overrides are typed by
the config dataclass field; on resume only run-length keys (:data:`RUN_LENGTH_KEYS`) may change.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import os
import random
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foldforge.config import RunConfig
from foldforge.presets import get_preset
from foldforge.train.distributed import DistEnv, barrier, broadcast_object

CHECKPOINT_DIR = "checkpoints"
FORMAT = 1
_NAME = re.compile(r"^step_(\d{7,})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:07d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoint files, oldest first (temp files are not listed)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def clean_temp_files(run_dir: str | Path) -> None:
    """Delete temp files left by a process killed while writing (never part of a checkpoint)."""
    d = checkpoint_dir(run_dir)
    if d.is_dir():
        for tmp in d.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)


# ---- RNG states as tensors ----

def rng_state() -> dict[str, Any]:
    """torch CPU/CUDA, numpy global and python ``random`` states, as tensors and plain values."""
    np_state = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- write / read ----

def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], *, keep: int = 3) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``, then delete all but the newest ``keep``."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = d / f".{final.name}.tmp{os.getpid()}"
    payload = {"format": FORMAT, "step": int(step), **state}
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(d)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint on the CPU, pickle-free (``weights_only=True``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a foldforge checkpoint (format {FORMAT})")
    return state


def load_latest(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads (skipping unreadable ones with a warning), or None if none does."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # truncated zip, bad header, wrong format: fall back to the previous one
            warnings.warn(f"checkpoint {path} does not load ({type(e).__name__}: {str(e)[:200]}); "
                          f"falling back to an earlier one", stacklevel=2)
    return None


# ---- the run's config: overrides, config.json, resume rules ----

CONFIG_FILE, RUN_FILE = "config.json", "run.json"
# Keys that change how long a run goes or how it reports, never what a step computes: the only ones
# that may differ on --resume.
RUN_LENGTH_KEYS = frozenset({"train.max_steps", "train.target_lddt", "train.eval_every", "train.checkpoint_every",
                             "train.keep_checkpoints", "train.log_every", "train.num_workers"})


def _convert(text: str, tp, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null") and type(None) in args:
            return None
        return _convert(text, next(a for a in args if a is not type(None)), key)
    try:
        if tp is bool:
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return low in ("true", "1", "yes", "on")
        if tp in (int, float, str):
            return tp(text)
        if origin is tuple:
            parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
            if len(parts) != len(args):
                raise ValueError(text)
            return tuple(_convert(p.strip(), a, key) for p, a in zip(parts, args))
    except ValueError:
        name = getattr(tp, "__name__", str(tp))
        raise ValueError(f"--set {key}: {text!r} is not a valid {name}") from None
    raise ValueError(f"--set {key}: fields of type {tp} cannot be set from the command line")


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Apply ``section.field=value`` (nested: ``model.evoformer.num_blocks=4``) in place, each value typed
    by its dataclass field; returns the dotted keys set. Unknown keys raise with the closest names."""
    keys = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        obj, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                close = difflib.get_close_matches(part, names, n=3)
                where = ".".join(parts[:i]) or "the run config"
                raise ValueError(f"--set {key}: unknown key {part!r} in {where}"
                                 + (f"; did you mean {', '.join(close)}?" if close else "")
                                 + f" (fields: {', '.join(names)})")
            if i < len(parts) - 1:
                obj = getattr(obj, part)
                if not dataclasses.is_dataclass(obj):
                    raise ValueError(f"--set {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
        if dataclasses.is_dataclass(getattr(obj, parts[-1])):
            raise ValueError(f"--set {key}: is a section; set one of its fields ({key}.<field>=...)")
        setattr(obj, parts[-1], _convert(text, typing.get_type_hints(type(obj))[parts[-1]], key))
        keys.append(key)
    return keys


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts (tuples and lists compare equal)."""
    a, b = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def resolve_config(env: DistEnv, *, preset: str | None, data: str | None, out: str | None, resume: bool,
                   overrides=(), max_steps: int | None = None, target_lddt: float | None = None,
                   default_preset: str = "tiny_af2", default_data: str = "cache/sample"
                   ) -> tuple[RunConfig, Path, str]:
    """The run's config, directory and data path; rank 0 writes ``config.json`` and ``run.json``.

    Fresh run: preset (default tiny_af2) + overrides; the directory (default ``runs/<preset>-<time>``,
    chosen on rank 0) must not already hold a run. ``--resume``: ``config.json`` is read back, only
    :data:`RUN_LENGTH_KEYS` may be overridden, and the data path defaults to the recorded one."""
    run_args = [f"train.max_steps={max_steps}"] if max_steps is not None else []
    run_args += [f"train.target_lddt={target_lddt}"] if target_lddt is not None else []
    if resume:
        if out is None:
            raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
        run_dir = Path(out)
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"--resume: {run_dir / CONFIG_FILE} not found; is {run_dir} a run directory?")
        cfg = RunConfig.load(run_dir / CONFIG_FILE)
        if preset is not None and preset != cfg.name:
            raise ValueError(f"--resume: {run_dir} is a {cfg.name!r} run; --preset {preset} cannot change that")
        before = cfg.to_dict()
        apply_overrides(cfg, list(overrides))   # repeating the run's own values is fine; changing them is not
        changed = [k for k in config_changes(before, cfg.to_dict()) if k not in RUN_LENGTH_KEYS]
        if changed:
            raise ValueError(f"--resume: cannot change {', '.join(changed)} of a run in progress (only "
                             f"run-length keys: {', '.join(sorted(RUN_LENGTH_KEYS))}); start a new run instead")
        apply_overrides(cfg, run_args)
        recorded = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {}
        if data is None:
            data = recorded.get("data", default_data)
        elif recorded.get("data") not in (None, data) and env.is_main:
            print(f"note: resuming with data {data} (the run started on {recorded['data']})")
    else:
        cfg = get_preset(preset or default_preset)
        apply_overrides(cfg, list(overrides) + run_args)
        if out is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = broadcast_object(f"runs/{cfg.name}-{stamp}", env)
        run_dir = Path(out)
        if (run_dir / CONFIG_FILE).exists() or list_checkpoints(run_dir):
            raise FileExistsError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
        data = data or default_data
    cfg.train.check()   # a bad value fails here, before the run directory holds a config
    barrier(env)   # every rank has checked the directory before rank 0 writes into it
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / CONFIG_FILE)
        (run_dir / RUN_FILE).write_text(json.dumps({"data": str(data), "world_size": env.world_size}) + "\n")
    barrier(env)
    return cfg, run_dir, str(data)


def check_resume_config(state: dict, cfg: RunConfig, world_size: int) -> None:
    """A checkpoint continues only the run it belongs to, on as many processes as wrote it (the data
    position is an index into each rank's share of the key list)."""
    changed = [k for k in config_changes(state["config"], cfg.to_dict()) if k not in RUN_LENGTH_KEYS]
    if changed:
        raise ValueError(f"checkpoint config differs from config.json in {', '.join(changed[:8])}")
    if state["world_size"] != world_size:
        raise ValueError(f"the checkpoint was written by {state['world_size']} processes, this run has "
                         f"{world_size}: the data position would not continue exactly")
