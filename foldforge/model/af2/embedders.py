"""AF2 input embedders: input + relative position (AF2 Suppl. Alg. 3-4), recycling (Alg. 32), extra MSA
(Alg. 2 line 14), template torsion angles (Alg. 2 line 7) and template pair features (Alg. 2 line 9).

Parameter names and shapes follow OpenFold (``openfold/model/embedders.py``) so checkpoints map one to
one and the parameter count matches the MLPerf model. The features these take are built by
:mod:`foldforge.model.af2.features`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foldforge.config import ModelConfig
from foldforge.model.af2.features import distogram_one_hot
from foldforge.model.primitives import LayerNorm, Linear

# OpenFold's RecyclingEmbedder closes its last distance bin at sqrt(1e8) Angstrom.
RECYCLE_INF = 1e8


class InputEmbedder(nn.Module):
    """AF2 Suppl. Alg. 3 (input embedding) with Alg. 4 (relative position encoding).

    ``z_ij = a_i + b_j + relpos_ij`` and ``m_si = linear_msa_m(msa_feat_si) + linear_tf_m(target_feat_i)``;
    relpos is a one-hot of ``clip(r_i - r_j, -k, k) + k`` (2k + 1 = 65 bins for k = 32) through a linear.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.relpos_k = cfg.relpos_k
        self.linear_tf_z_i = Linear(cfg.target_feat_dim, cfg.c_z)
        self.linear_tf_z_j = Linear(cfg.target_feat_dim, cfg.c_z)
        self.linear_tf_m = Linear(cfg.target_feat_dim, cfg.c_m)
        self.linear_msa_m = Linear(cfg.msa_feat_dim, cfg.c_m)
        self.linear_relpos = Linear(2 * cfg.relpos_k + 1, cfg.c_z)

    def relpos(self, residue_index: Tensor) -> Tensor:
        """AF2 Suppl. Alg. 4: ``residue_index`` [*, L] -> [*, L, L, c_z]."""
        ri = residue_index.long()
        d = (ri[..., :, None] - ri[..., None, :]).clamp(-self.relpos_k, self.relpos_k) + self.relpos_k
        one_hot = F.one_hot(d, 2 * self.relpos_k + 1).to(self.linear_relpos.weight.dtype)
        return self.linear_relpos(one_hot)

    def forward(self, target_feat: Tensor, residue_index: Tensor, msa_feat: Tensor) -> tuple[Tensor, Tensor]:
        """target_feat [*, L, 22], residue_index [*, L], msa_feat [*, N, L, 49]
        -> m [*, N, L, c_m], z [*, L, L, c_z]."""
        z = self.relpos(residue_index)
        z = z + self.linear_tf_z_i(target_feat)[..., :, None, :] + self.linear_tf_z_j(target_feat)[..., None, :, :]
        m = self.linear_msa_m(msa_feat) + self.linear_tf_m(target_feat)[..., None, :, :]
        return m, z


class RecyclingEmbedder(nn.Module):
    """AF2 Suppl. Alg. 32: layer-normed previous first MSA row and pair, plus a linear embedding of the
    one-hot distogram of the previous pseudo-beta positions (``recycle_bins`` bins between
    ``recycle_min_bin`` and ``recycle_max_bin``, the last bin open-ended).

    Returns the updates; the caller adds them to ``m[:, 0]`` and ``z``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.min_bin, self.max_bin, self.num_bins = cfg.recycle_min_bin, cfg.recycle_max_bin, cfg.recycle_bins
        self.linear = Linear(cfg.recycle_bins, cfg.c_z)
        self.layer_norm_m = LayerNorm(cfg.c_m, impl=cfg.kernels.layer_norm)
        self.layer_norm_z = LayerNorm(cfg.c_z, impl=cfg.kernels.layer_norm)

    def forward(self, m0_prev: Tensor, z_prev: Tensor, x_prev: Tensor) -> tuple[Tensor, Tensor]:
        """m0_prev [*, L, c_m], z_prev [*, L, L, c_z], x_prev (pseudo-beta) [*, L, 3]
        -> (m0 update [*, L, c_m], z update [*, L, L, c_z])."""
        dgram = distogram_one_hot(x_prev, self.min_bin, self.max_bin, self.num_bins, RECYCLE_INF)
        return self.layer_norm_m(m0_prev), self.layer_norm_z(z_prev) + self.linear(dgram)


class ExtraMSAEmbedder(nn.Module):
    """AF2 Suppl. Alg. 2 line 14: extra-MSA features (25) -> c_e."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.linear = Linear(cfg.extra_msa_feat_dim, cfg.c_e)

    def forward(self, extra_msa_feat: Tensor) -> Tensor:
        """[*, N_extra, L, 25] -> [*, N_extra, L, c_e]."""
        return self.linear(extra_msa_feat)


class TemplateAngleEmbedder(nn.Module):
    """AF2 Suppl. Alg. 2 line 7: template torsion-angle features (57) -> c_m through Linear-ReLU-Linear;
    the result is appended to the MSA representation as extra rows."""

    def __init__(self, cfg: ModelConfig, c_in: int = 57):
        super().__init__()
        self.linear_1 = Linear(c_in, cfg.c_m, init="relu")
        self.linear_2 = Linear(cfg.c_m, cfg.c_m, init="relu")

    def forward(self, angle_feat: Tensor) -> Tensor:
        """[*, T, L, 57] -> [*, T, L, c_m]."""
        return self.linear_2(torch.relu(self.linear_1(angle_feat)))


class TemplatePairEmbedder(nn.Module):
    """AF2 Suppl. Alg. 2 line 9: template pair features (88) -> c_t, one linear (OpenFold monomer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tc = cfg.template
        self.c_in = tc.distogram_bins + 49   # 39 + mask + 2 x 22 aatype + 3 unit vector + mask = 88
        self.linear = Linear(self.c_in, tc.c_t, init="relu")

    def forward(self, pair_feat: Tensor) -> Tensor:
        """[*, L, L, 88] -> [*, L, L, c_t]."""
        return self.linear(pair_feat)
