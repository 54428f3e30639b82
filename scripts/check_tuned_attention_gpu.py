"""On a GPU: attention fwd+bwd with the default launch parameters vs the committed tuned table (the benchmark's
timer, one process), and the triangle multiplication's per-gradient error ratios (kernel vs bf16 eager, both
against fp64) over seeds and lengths. Writes $OUT/final_check.json (OUT defaults to the current directory).

    python scripts/check_tuned_attention_gpu.py      # from the repository root"""
import json, os, sys
import torch
from foldforge.bench.ops import _Timer
from foldforge.bench.shapes import ATTENTION_SHAPES
from foldforge.kernels import _attention_triton as T, _attention_tune as AT, _launch
import foldforge.kernels as K

out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "attention": [], "triangle": []}
dev = torch.device("cuda")
slug = _launch.gpu_slug(dev)
table = _launch._table(slug)
timer = _Timer(dev, warmup_ms=100)
for s in ATTENTION_SHAPES:
    q, k, v, bias, do = AT._inputs(s, "cuda")          # the sweep's inputs: bf16 q/k/v/dO, fp32 bias
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if bias is not None:
        bias.requires_grad_()
    def step():
        K.evo_attention(q, k, v, bias, None, impl="triton").backward(do)
    row = {"shape": s.name}
    for label, tab in (("default", {k_: v_ for k_, v_ in table.items() if k_ != "evo_attention"}), ("tuned", table)):
        _launch.set_tuned_override(slug, tab); T.clear_config_cache()
        row[label] = round(timer(step)["median_ms"], 4)
    row["speedup"] = round(row["default"] / row["tuned"], 3)
    print(row, flush=True); out["attention"].append(row)
_launch.set_tuned_override(slug, None); T.clear_config_cache()

sys.path.insert(0, os.getcwd())
from tests.kernels._triton_env import gen, randn, leaves, F64
from tests.kernels import test_triangle_mult_triton as TT
from foldforge.kernels.triangle_mult import TriMulParams, triangle_multiplication_reference, triangle_multiplication_triton
labels = ("dz",) + tuple(f"d{f}" for f in TriMulParams._fields)
for length, direction, seed in [(384, "incoming", 8), (384, "incoming", 9), (384, "incoming", 10), (384, "outgoing", 8),
                                (256, "incoming", 8), (320, "incoming", 8), (448, "incoming", 8)]:
    g = gen(seed)
    z = randn(1, length, length, 128, g=g, dtype=torch.bfloat16, scale=2.0)
    dy = randn(1, length, length, 128, g=g, dtype=torch.bfloat16)
    mask, params = TT._pair_mask(1, length, g), TT._params(128, 128, g)
    ker = leaves(z, *params)
    triangle_multiplication_triton(ker[0], mask, TriMulParams(*ker[1:]), direction=direction).backward(dy)
    ref = leaves(z, *params)
    triangle_multiplication_reference(ref[0], mask, TriMulParams(*ref[1:]), direction=direction).backward(dy)
    hp = leaves(z, *params, dtype=F64)
    triangle_multiplication_reference(hp[0], mask, TriMulParams(*hp[1:]), direction=direction).backward(dy.to(F64))
    worst = []
    for lab, a, r, h in zip(labels, ker, ref, hp):
        H = h.grad.double()
        ek, er = (a.grad.double() - H).abs().max().item(), (r.grad.double() - H).abs().max().item()
        worst.append((round(ek / max(er, 1e-30), 2), lab, ek, er))
    worst.sort(reverse=True)
    row = {"L": length, "direction": direction, "seed": seed, "worst_ratio": worst[:3]}
    print(row, flush=True); out["triangle"].append(row)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "final_check.json"), "w"), indent=1)
