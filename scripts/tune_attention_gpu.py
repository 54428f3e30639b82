"""Sweep the attention kernels' launch parameters on this GPU, one bucket at a time (each bucket's fragment
is written as soon as it is done, so a time limit loses at most one bucket). Usage:
    python scripts/tune_attention_gpu.py OUT_DIR tri_256 extra_msa_1024x256 msa_col_256x128 tri_384
then merge the fragments into foldforge/kernels/tuned/<gpu-slug>.json (scripts/merge_tuned.py)."""
import sys
from pathlib import Path

from foldforge.bench.shapes import ATTENTION_SHAPES
from foldforge.kernels import _attention_tune as AT

AT.TILES = ((64, 32), (64, 64), (128, 32), (128, 64), (64, 128), (128, 128))
AT.LAUNCH = ((4, 2), (4, 3), (8, 2), (8, 3))
out = Path(sys.argv[1])
for name in sys.argv[2:]:
    shape = next(s for s in ATTENTION_SHAPES if s.name == name)
    AT.sweep([shape], out / f"attention_{name}.json", log=lambda s: print(s, flush=True))
    print(f"done {name}", flush=True)
