"""Analytic FLOP count of the AF2 model at a given shape, for the achieved-TFLOP/s column of the step bench.

Only matrix products are counted (Linear layers, attention logits and weighted sums, the triangular
contraction, the outer product), at 2 FLOPs per multiply-add; LayerNorms, softmaxes, gates and other
elementwise work are memory-bound and left out, as in every published TFLOP/s figure for these models.
With ``a -> b`` a Linear from width a to width b applied to R rows costing ``2 R a b``, one forward is,
for L residues, S cluster rows (+ T template-angle rows), E extra rows (AF2 Suppl. Alg. 2-32):

- Evoformer block (c_m, c_z; MSA heads H x D; pair heads Hp x Dp; transition n; OPM c; tri-mul C):
    row attention  2 L^2 c_z H + 5 * 2 S L c_m H D + 2 * 2 S H L^2 D
    column attn    5 * 2 S L c_m H D + 2 * 2 L H S^2 D        (global, extra stack: see _global_column)
    MSA transition 2 * 2 S L c_m n c_m
    OPM            2 * 2 S L c_m c + 2 L^2 S c^2 + 2 L^2 c^2 c_z + 2 L^2 S
    tri-mul (x2)   2 L^2 c_z (4 C + c_z) + 2 L^3 C + 2 L^2 C c_z
    tri-attn (x2)  2 L^2 c_z Hp + 5 * 2 L^2 c_z Hp Dp + 2 * 2 L Hp L^2 Dp
    pair trans.    2 * 2 L^2 c_z n c_z
- template pair stack per template (c_t, its own heads/widths), pointwise attention over T templates,
  embedders, the structure module (IPA with its point terms) and the heads: the same rules, see the code.

A training step with r no-grad recycling iterations costs ``(r + 3) * forward``: r forwards, then the
gradient pass as forward + backward (backward = 2 forwards: one product for the input gradient, one for the
weight gradient). Activation checkpointing recomputes the checkpointed forwards; those FLOPs are not useful
work and are NOT counted, so the TFLOP/s figure compares configurations on the same work.
"""
from __future__ import annotations

from foldforge.config import EvoformerConfig, ModelConfig, TemplateConfig


def _lin(rows: float, c_in: float, c_out: float) -> float:
    return 2.0 * rows * c_in * c_out


def _attn_core(rows: float, heads: int, lq: float, lk: float, d: int) -> float:
    """Logits q.k and the weighted sum p.v of ``rows`` independent attentions."""
    return 2 * 2.0 * rows * heads * lq * lk * d


def _gated_mha(rows: float, lq: float, lk: float, c_q: int, c_kv: int, heads: int, d: int,
               gating: bool = True) -> float:
    """Attention module: q (+g) from c_q, k/v from c_kv, output projection back to c_q."""
    hd = heads * d
    f = _lin(rows * lq, c_q, hd) + 2 * _lin(rows * lk, c_kv, hd) + _lin(rows * lq, hd, c_q)
    if gating:
        f += _lin(rows * lq, c_q, hd)
    return f + _attn_core(rows, heads, lq, lk, d)


def _global_column(s: int, n: int, c: int, heads: int, d: int) -> float:
    """AF2 Alg. 19 on [S, L, c] (column-wise over S): one mean query per column and head, single-head
    keys/values, per-sequence gates."""
    f = _lin(n, c, heads * d)                       # q from the masked mean
    f += 2 * _lin(s * n, c, d)                      # k, v (shared by the heads)
    f += _lin(s * n, c, heads * d)                  # gates
    f += 2 * 2.0 * n * heads * s * d                # logits and weighted sum
    f += _lin(s * n, heads * d, c)                  # output projection
    return f


def _tri_mul(n: int, c_z: int, c: int) -> float:
    return _lin(n * n, c_z, 4 * c + c_z) + 2.0 * n ** 3 * c + _lin(n * n, c, c_z)


def _tri_att(n: int, c_z: int, heads: int, d: int) -> float:
    return _lin(n * n, c_z, heads) + _gated_mha(n, n, n, c_z, c_z, heads, d)


def evoformer_block_flops(cfg: EvoformerConfig, c_m: int, c_z: int, s: int, n: int) -> float:
    """One Evoformer (or extra-MSA, with ``global_column_attention``) block on S rows x N residues."""
    f = _lin(n * n, c_z, cfg.msa_heads) + _gated_mha(s, n, n, c_m, c_m, cfg.msa_heads, cfg.msa_head_dim)
    if cfg.global_column_attention:
        f += _global_column(s, n, c_m, cfg.msa_heads, cfg.msa_head_dim)
    else:
        f += _gated_mha(n, s, s, c_m, c_m, cfg.msa_heads, cfg.msa_head_dim)
    f += 2 * _lin(s * n, c_m, cfg.transition_n * c_m)
    c = cfg.opm_dim
    f += 2 * _lin(s * n, c_m, c) + 2.0 * n * n * s * c * c + _lin(n * n, c * c, c_z) + 2.0 * n * n * s
    f += 2 * _tri_mul(n, c_z, cfg.tri_mul_dim)
    f += 2 * _tri_att(n, c_z, cfg.pair_heads, cfg.pair_head_dim)
    f += 2 * _lin(n * n, c_z, cfg.transition_n * c_z)
    return f


def template_flops(tc: TemplateConfig, c_z: int, n: int, t: int, pair_feat_dim: int = 88) -> float:
    """Template pair embedder + pair stack (per template) + pointwise attention over T templates."""
    per = _lin(n * n, pair_feat_dim, tc.c_t)
    per += tc.num_blocks * (2 * _tri_att(n, tc.c_t, tc.tri_att_heads, tc.tri_att_dim)
                            + 2 * _tri_mul(n, tc.c_t, tc.tri_mul_dim)
                            + 2 * _lin(n * n, tc.c_t, tc.transition_n * tc.c_t))
    pointwise = _gated_mha(n * n, 1, t, c_z, tc.c_t, tc.pointwise_heads, tc.pointwise_dim, gating=False)
    return t * per + pointwise


def structure_module_flops(cfg: ModelConfig, n: int) -> float:
    sc, c_s, c_z = cfg.structure, cfg.c_s, cfg.c_z
    h, c, pq, pv = sc.ipa_heads, sc.c_ipa, sc.qk_points, sc.v_points
    ipa = (_lin(n, c_s, h * c) + _lin(n, c_s, 2 * h * c) + _lin(n, c_s, h * pq * 3)
           + _lin(n, c_s, h * (pq + pv) * 3) + _lin(n * n, c_z, h)
           + 2.0 * h * n * n * c                     # scalar logits
           + 2.0 * h * n * n * (c + pv * 3)          # weighted sums of values and value points
           + 2.0 * h * n * n * c_z                   # pair output
           + _lin(n, h * (c_z + c + 4 * pv), c_s))
    layer = ipa + sc.transition_layers * 3 * _lin(n, c_s, c_s) + _lin(n, c_s, 6)
    angle = (2 * _lin(n, c_s, sc.c_resnet) + sc.resnet_blocks * 2 * _lin(n, sc.c_resnet, sc.c_resnet)
             + _lin(n, sc.c_resnet, sc.num_angles * 2))
    return _lin(n, c_s, c_s) + sc.num_blocks * (layer + angle)


def forward_flops(cfg: ModelConfig, *, n_res: int, n_clust: int, n_extra: int, n_templ: int) -> dict[str, float]:
    """FLOPs of one forward iteration (one recycling pass), by part."""
    n, t = n_res, n_templ if cfg.template.enabled else 0
    s = n_clust + (t if cfg.template.enabled and cfg.template.embed_angles else 0)
    parts = {
        "embedders": (_lin(n, cfg.target_feat_dim, 2 * cfg.c_z + cfg.c_m) + _lin(n_clust * n, cfg.msa_feat_dim, cfg.c_m)
                      + _lin(n * n, 2 * cfg.relpos_k + 1, cfg.c_z) + _lin(n * n, cfg.recycle_bins, cfg.c_z)
                      + _lin(n_extra * n, cfg.extra_msa_feat_dim, cfg.c_e)
                      + (2 * _lin(t * n, 57, cfg.c_m) if t and cfg.template.embed_angles else 0.0)),
        "templates": template_flops(cfg.template, cfg.c_z, n, t) if t else 0.0,
        "extra_msa_stack": cfg.extra_msa.num_blocks * evoformer_block_flops(cfg.extra_msa, cfg.c_e, cfg.c_z,
                                                                             n_extra, n),
        "evoformer": cfg.evoformer.num_blocks * evoformer_block_flops(cfg.evoformer, cfg.c_m, cfg.c_z, s, n)
                     + _lin(n, cfg.c_m, cfg.c_s),
        "structure_module": structure_module_flops(cfg, n),
        "heads": (_lin(n * n, cfg.c_z, cfg.heads.distogram_bins) + _lin(n_clust * n, cfg.c_m, cfg.heads.masked_msa_classes)
                  + _lin(n, cfg.c_s, cfg.heads.plddt_hidden) + _lin(n, cfg.heads.plddt_hidden, cfg.heads.plddt_hidden)
                  + _lin(n, cfg.heads.plddt_hidden, cfg.heads.plddt_bins)
                  + _lin(n, cfg.c_s, cfg.heads.experimentally_resolved_atoms)),
    }
    parts["total"] = sum(parts.values())
    return parts


def train_step_flops(cfg: ModelConfig, *, n_res: int, n_clust: int, n_extra: int, n_templ: int,
                     num_recycles: int) -> float:
    """``(num_recycles + 3) * forward``: see the module docstring."""
    fwd = forward_flops(cfg, n_res=n_res, n_clust=n_clust, n_extra=n_extra, n_templ=n_templ)["total"]
    return (num_recycles + 3) * fwd
