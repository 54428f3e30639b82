"""Record assembly: template geometry computed at prepare time agrees with the template atoms."""
import numpy as np

from foldforge.data import residue_constants as rc
from foldforge.data.cache import FeatureCache
from foldforge.data.prepare import SAMPLE_DIR, PrepareOptions, run_prepare


def test_template_geometry_matches_template_atoms(tmp_path):
    run_prepare(PrepareOptions(mmcif_dir=str(SAMPLE_DIR / "mmcif"), out=str(tmp_path), workers=1,
                               msa_dir=str(SAMPLE_DIR / "alignments"), allow_missing_msa=True,
                               template_mmcif_dir=str(SAMPLE_DIR / "mmcif")), progress=False)
    cache = FeatureCache(tmp_path)
    rec = cache.load(cache.index_of("4zey_A"))
    assert rec.meta["template_domain_names"] and rec["template_aatype"].shape[0] >= 1
    aatype, pos, mask = rec["template_aatype"][0], rec["template_all_atom_positions"][0], rec["template_all_atom_mask"][0]
    cb = np.where(aatype == rc.restype_order["G"], rc.atom_order["CA"], rc.atom_order["CB"])
    has = rec["template_pseudo_beta_mask"][0].astype(bool)
    assert has.sum() > 20
    np.testing.assert_allclose(rec["template_pseudo_beta"][0][has], pos[has, cb[has]], atol=1e-5)
    np.testing.assert_array_equal(has, mask[np.arange(len(cb)), cb].astype(bool))
    # backbone frame: origin at CA, x axis towards C (AF2 Suppl. Alg. 21)
    fr = rec["template_backbone_frame"][0]
    ok = rec["template_backbone_frame_mask"][0].astype(bool)
    np.testing.assert_allclose(fr[ok, :3, 3], pos[ok, rc.atom_order["CA"]], atol=1e-5)
    x_axis = pos[ok, rc.atom_order["C"]] - pos[ok, rc.atom_order["CA"]]
    x_axis /= np.linalg.norm(x_axis, axis=-1, keepdims=True)
    np.testing.assert_allclose(fr[ok, :3, 0], x_axis, atol=1e-4)
    # unaligned positions (gap) carry no geometry
    gap = aatype == rc.GAP_ID
    assert gap.any() and not has[gap].any() and not rec["template_torsion_angles_mask"][0][gap].any()
