"""The tiny AF2 preset overfits one real chain on CPU: backbone FAPE falls and lDDT-Cα rises."""
import numpy as np
import torch

from foldforge.data.batch import collate
from foldforge.data.dataset import AF2Dataset, SampleKey
from foldforge.data.prepare import SAMPLE_DIR, PrepareOptions, run_prepare
from foldforge.model.af2.losses import af2_loss
from foldforge.model.af2.model import AlphaFold2
from foldforge.presets import tiny_af2

STEPS = 150


def test_tiny_model_overfits_a_real_chain(tmp_path):
    torch.manual_seed(0)
    run_prepare(PrepareOptions(mmcif_dir=str(SAMPLE_DIR / "mmcif"), out=str(tmp_path), workers=1,
                               msa_dir=str(SAMPLE_DIR / "alignments"), allow_missing_msa=True), progress=False)
    cfg = tiny_af2()
    ds = AF2Dataset(tmp_path, cfg.data, seed=0)
    batch = collate([ds[SampleKey(ds.cache.index_of("1psm_A"))]]).as_dict()  # 38 residues, whole chain
    model = AlphaFold2(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    fape, lddt = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        loss, terms = af2_loss(model(batch, num_recycles=0), batch, cfg.loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        fape.append(float(terms["fape_backbone"]))
        lddt.append(float(terms["lddt_ca"]))
    assert np.isfinite(fape).all()
    late_fape, late_lddt = np.mean(fape[-10:]), np.mean(lddt[-10:])
    print(f"backbone FAPE {fape[0]:.3f} -> {late_fape:.3f}; lDDT-Ca {lddt[0]:.3f} -> {late_lddt:.3f}")
    assert late_fape < 0.85 * fape[0]
    assert late_lddt > lddt[0] + 0.15
