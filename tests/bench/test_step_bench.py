"""`foldforge bench step / ablation / max-crop` on CPU with tiny_af2: output schema, that a kernel toggle
really changes the implementation that runs, the FLOP count against PyTorch's counter, synthetic batches."""
import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from foldforge.bench.flops import forward_flops, train_step_flops
from foldforge.bench.step import ablation_configs, parse_kernels, run_ablation, run_max_crop, run_step_benchmark
from foldforge.bench.step_report import write_ablation_report
from foldforge.bench.synthetic import synthetic_batch_source
from foldforge.cli import main
from foldforge.data.batch import collate
from foldforge.data.dataset import AF2Dataset
from foldforge.kernels import _launch
from foldforge.model.af2.model import AlphaFold2
from foldforge.presets import get_preset

SCHEMA = {"bench", "label", "kernels_spec", "preset", "crop", "kernels", "compile", "dtype", "checkpointing",
          "steps", "warmup", "oom", "error", "kernels_used", "step_s", "split_s", "tflops_achieved",
          "tflop_per_step", "samples_per_s", "peak_allocated_gib", "device", "torch", "commit", "date", "command"}


def test_bench_step_synthetic_row_schema(tmp_path):
    results = tmp_path / "r.jsonl"
    assert main(["bench", "step", "--preset", "tiny_af2", "--steps", "2", "--warmup", "1",
                 "--results", str(results)]) == 0
    row = json.loads(results.read_text().splitlines()[-1])
    assert SCHEMA <= set(row)
    assert row["oom"] is False and row["error"] is None and row["data"] == "synthetic"
    assert row["crop"] == 64 and row["parameters"] == 103114 and row["num_recycles"] == "sampled"
    assert len(row["recycles_used"]) == 2 and all(0 <= r <= 1 for r in row["recycles_used"])
    s = row["step_s"]
    assert 0 < s["min"] <= s["median"] <= s["max"]
    assert set(row["split_s"]) == {"data", "forward", "backward", "optimizer"}
    assert all(v >= 0 for v in row["split_s"].values())
    # every op that ran used the reference path
    assert row["kernels_used"] and all(impls == ["reference"] for impls in row["kernels_used"].values())
    cfg = get_preset("tiny_af2")
    d = cfg.data
    expect = np.mean([train_step_flops(cfg.model, n_res=64, n_clust=d.max_msa_clusters, n_extra=d.max_extra_msa,
                                       n_templ=d.max_templates, num_recycles=r) for r in row["recycles_used"]])
    assert row["tflop_per_step"] == pytest.approx(expect / 1e12)


def test_bench_step_from_a_cache(tmp_path):
    cache = tmp_path / "cache"
    assert main(["prepare", "--out", str(cache), "--quiet", "--workers", "1"]) == 0
    row = run_step_benchmark("tiny_af2", data=str(cache), steps=1, warmup=0, num_recycles=1, log=lambda s: None)
    assert row["step_s"] is not None and row["num_recycles"] == 1 and row["recycles_used"] == [1]
    assert set(row["loss_last"]) >= {"fape_backbone", "lddt_ca", "loss"}


def test_bench_step_batch_size_stacks_samples(tmp_path):
    results = tmp_path / "r.jsonl"
    assert main(["bench", "step", "--preset", "tiny_af2", "--steps", "1", "--warmup", "0", "--recycles", "0",
                 "--batch-size", "2", "--results", str(results)]) == 0
    row = json.loads(results.read_text().splitlines()[-1])
    assert row["batch_size"] == 2 and "--batch-size 2" in row["command"]
    assert row["samples_per_s"] == pytest.approx(2 / row["step_s"]["median"])
    cfg = get_preset("tiny_af2")
    d = cfg.data
    one = train_step_flops(cfg.model, n_res=64, n_clust=d.max_msa_clusters, n_extra=d.max_extra_msa,
                           n_templ=d.max_templates, num_recycles=0)
    assert row["tflop_per_step"] == pytest.approx(2 * one / 1e12)


def test_kernel_toggle_changes_the_implementation_that_runs():
    """layer_norm=triton routes the LayerNorms (and the LN+Linear of the pair bias) to the Triton kernels
    (here through the interpreter); nothing else changes."""
    before = _launch._INTERPRET
    _launch._INTERPRET = True
    try:
        ref = run_step_benchmark("tiny_af2", crop=16, kernels="reference", steps=1, warmup=0, num_recycles=0,
                                 log=lambda s: None)
        tri = run_step_benchmark("tiny_af2", crop=16, kernels="layer_norm=triton", steps=1, warmup=0,
                                 num_recycles=0, log=lambda s: None)
    finally:
        _launch._INTERPRET = before
    assert ref["error"] is None and tri["error"] is None, (ref["error"], tri["error"])
    assert all("triton" not in impls for impls in ref["kernels_used"].values())
    assert "triton" in tri["kernels_used"]["layer_norm"] and tri["kernels_used"]["ln_linear"] == ["triton"]
    others = {op: impls for op, impls in tri["kernels_used"].items() if op not in ("layer_norm", "ln_linear")}
    assert all(impls == ["reference"] for impls in others.values())
    assert tri["kernels"]["layer_norm"] == "triton" and tri["kernels"]["attention"] == "reference"


def test_triton_without_a_kernel_for_the_inputs_is_an_error_row():
    # a CPU tensor without the interpreter: the Triton path cannot run, and the row says so
    row = run_step_benchmark("tiny_af2", crop=16, kernels="layer_norm=triton", steps=1, warmup=0,
                             num_recycles=0, log=lambda s: None)
    assert row["step_s"] is None and row["oom"] is False and "layer_norm" in row["error"]


def test_parse_kernels():
    assert parse_kernels("triton").attention == "triton" and parse_kernels("triton").transition == "triton"
    kc = parse_kernels("attention=triton, gated_output=auto")
    assert (kc.attention, kc.gated_output, kc.layer_norm) == ("triton", "auto", "reference")
    for bad in ("attention=cuda", "attn=triton", "triton,attention"):
        with pytest.raises(ValueError, match="--kernels"):
            parse_kernels(bad)


def test_ablation_report_and_max_crop(tmp_path):
    configs = [c for c in ablation_configs() if c["label"].startswith(("baseline", "+ layer_norm"))]
    results = tmp_path / "r.jsonl"
    rows = run_ablation("tiny_af2", crop=16, steps=1, warmup=0, num_recycles=0, configs=configs,
                        results=results, log=lambda s: None)
    assert [r["label"] for r in rows] == ["baseline (reference, bf16)", "+ layer_norm triton"]
    # the toggle asks for impl="auto": on a CPU without the interpreter the reference runs, and the row says so
    assert rows[1]["kernels"]["layer_norm"] == "auto" and rows[1]["kernels_used"]["layer_norm"] == ["reference"]
    assert all(r["checkpointing"] for r in rows)
    crop = run_max_crop("tiny_af2", start=32, limit=64, results=results, log=lambda s: None)
    assert crop["max_crop"] == 64 and crop["first_oom"] is None and crop["probes"] == {"32": True, "64": True}
    assert len(results.read_text().splitlines()) == 3
    report = tmp_path / "ablation.md"
    write_ablation_report(report, rows, [crop])
    text = report.read_text()
    assert "| baseline (reference, bf16) |" in text and "| + layer_norm triton |" in text and "1.81" in text
    assert report.with_suffix(".png").stat().st_size > 1000


def test_analytic_flops_match_pytorch_flop_counter():
    cfg = get_preset("tiny_af2")
    torch.manual_seed(0)
    model = AlphaFold2(cfg.model).train()
    batch = collate([synthetic_batch_source(cfg.data)(0)]).as_dict()
    with FlopCounterMode(display=False) as fc:
        model(batch, num_recycles=0)
    d = cfg.data
    est = forward_flops(cfg.model, n_res=d.crop_size, n_clust=d.max_msa_clusters, n_extra=d.max_extra_msa,
                        n_templ=d.max_templates)["total"]
    assert est == pytest.approx(fc.get_total_flops(), rel=0.01)


def test_synthetic_batch_has_the_shapes_of_a_cached_one(tmp_path):
    cache = tmp_path / "cache"
    assert main(["prepare", "--out", str(cache), "--quiet", "--workers", "1"]) == 0
    cfg = get_preset("tiny_af2").data
    real = AF2Dataset(cache, cfg)[0]
    syn = synthetic_batch_source(cfg, seed=3)(0)
    for name, a in real.as_dict().items():
        b = syn.as_dict()[name]
        assert (None if a is None else (a.shape, a.dtype)) == (None if b is None else (b.shape, b.dtype)), name
    assert float(syn.seq_mask.mean()) == 1.0 and float(syn.msa_mask.mean()) == 1.0
    assert float(syn.extra_msa_mask.mean()) > 0.8 and float(syn.template_mask.mean()) == 1.0
    ca = syn.all_atom_mask[:, 1]
    assert float(ca.mean()) == 1.0
    # the sequence and structure are real: consecutive CA atoms inside a piece are ~3.8 A apart
    pos = syn.all_atom_positions[:, 1]
    gaps = (pos[1:] - pos[:-1]).norm(dim=-1)
    assert float(gaps.median()) == pytest.approx(3.8, abs=0.1)


def test_bad_kernel_specs_are_usage_errors(capsys):
    for argv in (["bench", "step", "--kernels", "attn=triton"], ["bench", "max-crop", "--kernels", "cuda"],
                 ["bench", "ablation", "--kernel-ops", "attention,foo"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bad entry 'attn=triton'" in err and "bad entry 'cuda'" in err and "['foo']" in err
