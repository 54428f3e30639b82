"""Presets are plain functions returning a :class:`RunConfig`; variants call a base preset and edit it."""
from __future__ import annotations

from typing import Callable

from foldforge.config import DataConfig, RunConfig


def af2_initial() -> RunConfig:
    """MLPerf HPC OpenFold closed division: crop 256, N_clust 124, N_extra 1024, 4 templates, 3 recycles."""
    return RunConfig(name="af2_initial", data=DataConfig())


def tiny_af2() -> RunConfig:
    """Small shapes for CPU tests and the demo on the bundled sample."""
    return RunConfig(
        name="tiny_af2",
        data=DataConfig(crop_size=64, max_msa_clusters=16, max_extra_msa=32, max_templates=2,
                        max_recycling_iters=1),
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {f.__name__: f for f in (af2_initial, tiny_af2)}


def get_preset(name: str) -> RunConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}") from None
