"""Sweep the attention kernels' launch parameters on this GPU.

    python scripts/tune_attention_gpu.py --all OUT.json [--warm-processes N]
        every bucket of the canonical shapes with the module's candidate set: first each bucket's candidates
        are compiled in parallel processes (Triton's on-disk cache; their timings are discarded), then one
        process times them all, so compilation does not dominate the sweep. This produced the committed H100
        table (about 5 minutes on an H100).
    python scripts/tune_attention_gpu.py OUT_DIR tri_256 extra_msa_1024x256 ...
        the named shapes one at a time with a reduced candidate set, each fragment written as soon as it is
        done (a time limit loses at most one bucket).

Then merge into foldforge/kernels/tuned/<gpu-slug>.json: python scripts/merge_tuned.py SLUG FRAGMENT.json..."""
import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from foldforge.bench.shapes import ATTENTION_SHAPES
from foldforge.kernels import _attention_tune as AT


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="OUT_DIR for the per-shape mode")
    ap.add_argument("shapes", nargs="*", help="shape names (per-shape mode)")
    ap.add_argument("--all", metavar="OUT_JSON", help="sweep every bucket into one fragment")
    ap.add_argument("--warm-processes", type=int, default=8, help="parallel compile processes (--all)")
    ap.add_argument("--warm", metavar="BUCKET", help=argparse.SUPPRESS)   # internal: compile one bucket
    args = ap.parse_args()
    if args.warm:
        AT.tune_shape(AT.largest_per_bucket(ATTENTION_SHAPES)[args.warm], log=lambda s: None)
        return 0
    if args.all:
        buckets = list(AT.largest_per_bucket(ATTENTION_SHAPES))

        def warm(key):
            return subprocess.run([sys.executable, __file__, "--warm", key], capture_output=True, text=True)
        with ThreadPoolExecutor(max(1, args.warm_processes)) as pool:
            for key, r in zip(buckets, pool.map(warm, buckets)):
                print(f"compiled {key}: rc {r.returncode}", flush=True)
        AT.sweep(ATTENTION_SHAPES, Path(args.all), log=lambda s: print(s, flush=True))
        return 0
    if not args.out or not args.shapes:
        ap.error("give --all OUT_JSON, or OUT_DIR and shape names")
    AT.TILES = ((64, 32), (64, 64), (128, 32), (128, 64), (64, 128), (128, 128))
    AT.LAUNCH = ((4, 2), (4, 3), (8, 2), (8, 3))
    out = Path(args.out)
    for name in args.shapes:
        shape = next(s for s in ATTENTION_SHAPES if s.name == name)
        AT.sweep([shape], out / f"attention_{name}.json", log=lambda s: print(s, flush=True))
        print(f"done {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
