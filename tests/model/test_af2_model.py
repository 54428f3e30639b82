"""The assembled AF2 model (AF2 Suppl. Alg. 2) on a real prepared chain with a template (CPU, tiny preset)."""
import pytest
import torch

import foldforge.kernels as kernels
from foldforge.config import LossConfig
from foldforge.data.batch import collate
from foldforge.data.dataset import AF2Dataset, SampleKey
from foldforge.data.prepare import SAMPLE_DIR, PrepareOptions, run_prepare
from foldforge.model.af2 import features as F
from foldforge.model.af2.losses import af2_loss
from foldforge.model.af2.model import AlphaFold2, count_parameters
from foldforge.presets import af2_initial, tiny_af2

MLPERF_PARAMETERS = 93_229_082   # MLPerf HPC OpenFold compliance value (model_parameters_count)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One collated tiny_af2 sample of 4zey_A, a draw that keeps its one template."""
    out = tmp_path_factory.mktemp("af2model") / "cache"
    run_prepare(PrepareOptions(mmcif_dir=str(SAMPLE_DIR / "mmcif"), out=str(out),
                               msa_dir=str(SAMPLE_DIR / "alignments"), allow_missing_msa=True,
                               template_mmcif_dir=str(SAMPLE_DIR / "mmcif"), workers=1), progress=False)
    ds = AF2Dataset(out, tiny_af2().data, seed=0)
    index = ds.cache.index_of("4zey_A")
    for draw in range(32):
        sample = ds[SampleKey(index, 0, draw)]
        if sample.template_mask.sum() > 0:
            return collate([sample]).as_dict()
    pytest.fail("no draw of 4zey_A kept its template")


def _model(seed: int = 0, perturb: bool = True) -> AlphaFold2:
    """tiny_af2 model; ``perturb`` moves the zero-initialised ("final"/"gating") weights off zero so
    every path contributes to the outputs."""
    torch.manual_seed(seed)
    model = AlphaFold2(tiny_af2().model)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_parameter_count_matches_mlperf():
    with torch.device("meta"):
        model = AlphaFold2(af2_initial().model)
    counts = count_parameters(model)
    print("\nAF2 (af2_initial) parameters:")
    for name, n in count_parameters(model, depth=2).items():
        print(f"  {name:45s} {n:>12,}")
    assert counts["total"] == MLPERF_PARAMETERS, counts
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]


def test_features_layout(batch):
    r = 0
    assert F.target_feat(batch["aatype"]).shape[-1] == 22
    assert F.msa_feat(batch, r).shape[-1] == 49
    assert F.extra_msa_feat(batch, r).shape[-1] == 25
    angle = F.template_angle_feat(batch)
    assert angle.shape[-1] == 57
    tc = tiny_af2().model.template
    keys = ("template_pseudo_beta", "template_pseudo_beta_mask", "template_aatype", "template_backbone_frame",
            "template_backbone_frame_mask")
    t = {k: batch[k][:, 0] for k in keys}
    pair = F.template_pair_feat(t, min_bin=tc.distogram_min, max_bin=tc.distogram_max,
                                num_bins=tc.distogram_bins, inf=tc.inf)
    L = batch["aatype"].shape[-1]
    assert pair.shape == (1, L, L, 88)
    bb = batch["template_backbone_frame_mask"][:, 0]
    bb2d = bb[..., :, None] * bb[..., None, :]
    torch.testing.assert_close(pair[..., -1], bb2d)                       # last channel: backbone mask 2-d
    assert torch.all(pair[..., 84:87] == 0)                                # unit vector off (OpenFold monomer)
    aa = torch.nn.functional.one_hot(batch["template_aatype"][:, 0].long(), 22).float()
    torch.testing.assert_close(pair[..., 40:62], aa[:, None, :, :].expand(1, L, L, 22) * bb2d[..., None])  # aatype_j
    torch.testing.assert_close(pair[..., 62:84], aa[:, :, None, :].expand(1, L, L, 22) * bb2d[..., None])  # aatype_i
    # distogram: at most one bin per pair; pairs with CB-CB beyond 3.25 A light exactly one bin
    assert pair[..., :39].sum(-1).max() <= 1
    unit = F.template_pair_feat(t, min_bin=tc.distogram_min, max_bin=tc.distogram_max, num_bins=tc.distogram_bins,
                                inf=tc.inf, use_unit_vector=True)[..., 84:87]
    norms = unit.norm(dim=-1)[bb2d > 0]
    assert torch.allclose(norms[norms > 0], torch.ones_like(norms[norms > 0]), atol=1e-4)


def test_forward_backward_real_chain(batch):
    model = _model().train()
    out = model(batch, num_recycles=1)
    L = batch["aatype"].shape[-1]
    cfg = tiny_af2().model
    n_clust = batch["msa"].shape[2]
    n_sm = cfg.structure.num_blocks
    expected = {
        "sm_frames": (n_sm, 1, L, 4, 4), "sm_positions": (n_sm, 1, L, 14, 3), "sm_angles": (n_sm, 1, L, 7, 2),
        "final_atom_positions": (1, L, 37, 3), "final_atom_mask": (1, L, 37),
        "distogram_logits": (1, L, L, 64), "masked_msa_logits": (1, n_clust, L, 23),
        "plddt_logits": (1, L, 50), "experimentally_resolved_logits": (1, L, 37),
        "single": (1, L, cfg.c_s), "pair": (1, L, L, cfg.c_z), "msa_first_row": (1, L, cfg.c_m),
    }
    for key, shape in expected.items():
        assert tuple(out[key].shape) == shape, key
    for key, value in out.items():
        assert torch.isfinite(value.float()).all(), key
    # experimentally-resolved weight is 0 in initial training; switch it on so every head gets a gradient
    loss, terms = af2_loss(out, batch, LossConfig(experimentally_resolved_weight=0.01))
    assert torch.isfinite(loss), terms
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_gradient_pass_reads_the_last_msa_copy(batch):
    R = batch["msa"].shape[1]
    assert [F.recycle_index(batch, i, 3) for i in range(4)] == [max(0, R - 4 + i) for i in range(4)]
    assert F.recycle_index(batch, 0, 0) == R - 1
    model = _model().eval()
    other = dict(batch)
    for key in F.RECYCLED_MSA_KEYS:      # scramble every copy but the last
        other[key] = batch[key].clone()
        other[key][:, :-1] = batch[key][:, :-1].flip(-1)
    with torch.no_grad():
        a = model(batch, num_recycles=0)
        b = model(other, num_recycles=0)
    torch.testing.assert_close(a["masked_msa_logits"], b["masked_msa_logits"])
    torch.testing.assert_close(a["pair"], b["pair"])


def test_templates_change_the_output(batch):
    model = _model().eval()
    no_template = dict(batch, template_mask=torch.zeros_like(batch["template_mask"]))
    with torch.no_grad():
        a = model(batch, num_recycles=0)["pair"]
        b = model(no_template, num_recycles=0)["pair"]
    assert not torch.allclose(a, b)


def test_chunked_inference_matches(batch, monkeypatch):
    model = _model().eval()
    with torch.no_grad():
        ref = model(batch, num_recycles=1)
        seen = []
        attention = kernels.evo_attention
        monkeypatch.setattr(kernels, "evo_attention", lambda *a, **k: seen.append(k.get("chunk_size")) or attention(*a, **k))
        model.cfg.chunk_size = 4
        try:
            chunked = model(batch, num_recycles=1)
        finally:
            model.cfg.chunk_size = None
    assert seen and all(c == 4 for c in seen)
    for key in ref:
        torch.testing.assert_close(chunked[key], ref[key], atol=1e-5, rtol=1e-5, msg=key)


def test_checkpointed_blocks_give_same_gradients(batch):
    grads = []
    for ckpt in (False, True):
        model = _model().train()
        model.set_checkpoint_blocks(ckpt)
        torch.manual_seed(123)                     # same dropout masks in both runs
        out = model(batch, num_recycles=0)
        (out["distogram_logits"].pow(2).mean() + out["sm_positions"].pow(2).mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_forward_is_finite(batch):
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, num_recycles=1)
    for key in ("sm_positions", "final_atom_positions", "plddt_logits", "distogram_logits", "masked_msa_logits"):
        assert out[key].dtype == torch.float32, key   # fp32 islands
    for key, value in out.items():
        assert torch.isfinite(value.float()).all(), key
    (out["distogram_logits"].pow(2).mean() + out["sm_positions"].pow(2).mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
