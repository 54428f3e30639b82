"""Reading training checkpoints for evaluation and prediction.

The checkpoint format (written by ``foldforge.train``; this module only reads it) is one ``torch.save``
dict, loadable with ``torch.load(path, map_location="cpu", weights_only=True)`` (no pickled objects)::

    {"format": 1, "step": int, "config": RunConfig.to_dict(),
     "model": state_dict, "ema": state_dict (same keys as "model"), ...}

Evaluation and prediction use the EMA weights by default (AF2 Suppl. 1.11.7: the model is evaluated with
an exponential moving average of the parameters); ``weights="model"`` picks the raw weights.
A run directory (``RUN/`` or ``RUN/checkpoints/``) may be given instead of a file: its latest
``step_XXXXXXX.pt`` is used.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from foldforge.config import RunConfig

CHECKPOINT_FORMAT = 1
WEIGHTS = ("ema", "model")
# wrappers that prefix parameter names when a state dict is taken from the wrapper instead of the model
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The ``step_XXXXXXX.pt`` with the highest step in ``run_dir/checkpoints`` (or ``run_dir`` itself)."""
    run_dir = Path(run_dir)
    for d in (run_dir / "checkpoints", run_dir):
        found = [(int(m.group(1)), p) for p in d.glob("step_*.pt") if (m := _STEP_FILE.match(p.name))]
        if found:
            return max(found)[1]
    raise CheckpointError(f"{run_dir}: no checkpoints/step_XXXXXXX.pt found")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint dict (tensors on the CPU). ``path`` may be a run directory."""
    path = Path(path)
    if path.is_dir():
        path = latest_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types (pickle, zip, EOF) for a bad file
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path}: not a foldforge checkpoint (expected a dict with a 'format' key)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']!r}, this foldforge reads "
                              f"format {CHECKPOINT_FORMAT}")
    for key in ("config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} entry")
    ckpt["path"] = str(path)
    return ckpt


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for p in _WRAPPER_PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def model_state(ckpt: dict[str, Any], weights: str = "ema") -> dict[str, torch.Tensor]:
    """The state dict to load: ``ckpt[weights]``, with DDP/compile name prefixes removed. The EMA entry may
    also be an EMA object's state (``{"decay", "num_updates", "shadow": state_dict}``); entries the EMA
    lacks but the raw weights have (buffers, if the EMA tracks parameters only) come from ``"model"``."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    where = ckpt.get("path", "checkpoint")
    if weights not in ckpt or ckpt[weights] is None:
        hint = "; use --weights model" if weights == "ema" else ""
        raise CheckpointError(f"{where}: no {weights!r} weights in the checkpoint{hint}")
    state = ckpt[weights]
    if weights == "ema" and isinstance(state.get("shadow"), dict):
        state = state["shadow"]  # an EMA object's own state dict ({"decay", "num_updates", "shadow"})
    state = _strip_prefixes(state)
    if weights == "ema":
        raw = _strip_prefixes(ckpt["model"])
        state = {**{k: v for k, v in raw.items() if k not in state}, **state}
    return state


def build_model(cfg: RunConfig):
    """The model a run config describes (AF2 today; AF3 presets will dispatch on their own config)."""
    from foldforge.model.af2.model import AlphaFold2

    return AlphaFold2(cfg.model)


def model_from_checkpoint(ckpt: dict[str, Any], *, weights: str = "ema",
                          device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """:func:`load_model` for a checkpoint dict already read with :func:`read_checkpoint`."""
    where = ckpt.get("path", "checkpoint")
    try:
        cfg = RunConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: config does not match this foldforge's RunConfig ({e})") from None
    model = build_model(cfg)
    state = model_state(ckpt, weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{where}: {weights!r} weights do not fit the model of its config: "
                              f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                              f"(e.g. {unexpected[:3]})")
    return model.to(device).eval(), cfg


def load_model(checkpoint_path: str | Path, *, weights: str = "ema",
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """Rebuild the model from the checkpoint's config, load ``weights`` ("ema" or "model") strictly and
    return ``(model in eval mode on device, RunConfig)``. ``checkpoint_path`` may be a run directory."""
    return model_from_checkpoint(read_checkpoint(checkpoint_path), weights=weights, device=device)
