"""Shared fixtures of the evaluation tests: the bundled sample prepared once, and a tiny_af2 checkpoint in
the training checkpoint format (format 1: config, raw and EMA state dicts)."""
from __future__ import annotations

import pytest
import torch

from foldforge.data.prepare import SAMPLE_DIR, PrepareOptions, run_prepare
from foldforge.model.af2.model import AlphaFold2
from foldforge.presets import tiny_af2


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_cache")
    run_prepare(PrepareOptions(mmcif_dir=str(SAMPLE_DIR / "mmcif"), out=str(out), workers=1,
                               msa_dir=str(SAMPLE_DIR / "alignments"), allow_missing_msa=True), progress=False)
    return out


def make_checkpoint(path, *, seed: int = 0, ema_as_object: bool = False):
    """A freshly initialised tiny_af2 model saved as a training checkpoint. Layers with AF2's "final" init
    are zero until trained, which would put every atom at the origin, every pLDDT at 50 and every distogram
    argmax in bin 0: they get small random weights, so the outputs vary per residue. The EMA weights
    differ from the raw ones (all parameters + 0.01), so a test can tell which were loaded."""
    torch.manual_seed(seed)
    cfg = tiny_af2()
    model = AlphaFold2(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not p.any():  # AF2 "final" init: zero until trained
                p.normal_(0.0, 0.5 if name.startswith("heads.") else 0.05)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: (v + 0.01 if v.is_floating_point() else v.clone()) for k, v in raw.items()}
    if ema_as_object:  # the training loop's EMA.state_dict()
        ema = {"decay": 0.99, "num_updates": 3, "shadow": ema}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "step": 7, "config": cfg.to_dict(), "model": raw, "ema": ema,
                "optimizer": {}}, path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_0000007.pt")
