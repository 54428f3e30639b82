"""Template stack (AF2 Suppl. 1.7.1): pair stack (Alg. 16), pointwise attention (Alg. 17) and the
template embedding of Alg. 2 lines 9-13.

Layout as OpenFold's ``TemplatePairStackBlock`` / ``TemplatePairStack`` / ``TemplatePointwiseAttention``:
block order tri_att_start, tri_att_end, tri_mul_out, tri_mul_in, pair_transition; a final LayerNorm.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from foldforge.config import KernelConfig, ModelConfig, TemplateConfig
from foldforge.model.af2.embedders import TemplatePairEmbedder
from foldforge.model.af2.features import template_pair_feat
from foldforge.model.attention import Attention
from foldforge.model.dropout import DropoutResidual
from foldforge.model.primitives import LayerNorm
from foldforge.model.transition import Transition
from foldforge.model.triangle import TriangleAttention, TriangleMultiplication

# Per-template tensors of the batch ([B, T, ...]) that the pair features read.
_PAIR_FEAT_KEYS = ("template_pseudo_beta", "template_pseudo_beta_mask", "template_aatype",
                   "template_backbone_frame", "template_backbone_frame_mask")


class TemplatePairStackBlock(nn.Module):
    """AF2 Suppl. Alg. 16 lines 2-6 on one template's pair activations ``t`` [*, L, L, c_t]."""

    def __init__(self, c_t: int, cfg: TemplateConfig, kernels: KernelConfig):
        super().__init__()
        self.tri_att_start = TriangleAttention(c_t, cfg.tri_att_dim, cfg.tri_att_heads, "starting", kernels)
        self.tri_att_end = TriangleAttention(c_t, cfg.tri_att_dim, cfg.tri_att_heads, "ending", kernels)
        self.tri_mul_out = TriangleMultiplication(c_t, cfg.tri_mul_dim, "outgoing", kernels)
        self.tri_mul_in = TriangleMultiplication(c_t, cfg.tri_mul_dim, "incoming", kernels)
        self.pair_transition = Transition(c_t, cfg.transition_n, kernels)
        self.dropout_row = DropoutResidual(cfg.dropout, shared_dim=-3, impl=kernels.dropout)
        self.dropout_col = DropoutResidual(cfg.dropout, shared_dim=-2, impl=kernels.dropout)

    def forward(self, t: Tensor, pair_mask: Tensor, chunk_size: int | None = None) -> Tensor:
        t = self.dropout_row(t, self.tri_att_start(t, pair_mask, chunk_size=chunk_size))
        t = self.dropout_col(t, self.tri_att_end(t, pair_mask, chunk_size=chunk_size))
        t = self.dropout_row(t, self.tri_mul_out(t, pair_mask))
        t = self.dropout_row(t, self.tri_mul_in(t, pair_mask))
        return t + self.pair_transition(t, pair_mask)


class TemplatePairStack(nn.Module):
    """AF2 Suppl. Alg. 16: ``num_blocks`` blocks and a final LayerNorm. ``checkpoint_blocks`` (a plain
    attribute, set at build) recomputes each block in the backward pass when training."""

    def __init__(self, c_t: int, cfg: TemplateConfig, kernels: KernelConfig, checkpoint_blocks: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(TemplatePairStackBlock(c_t, cfg, kernels) for _ in range(cfg.num_blocks))
        self.layer_norm = LayerNorm(c_t, impl=kernels.layer_norm)
        self.checkpoint_blocks = checkpoint_blocks

    def forward(self, t: Tensor, pair_mask: Tensor, chunk_size: int | None = None) -> Tensor:
        """t [*, L, L, c_t], pair_mask [*, L, L] -> [*, L, L, c_t]."""
        ckpt = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:
                t = checkpoint(block, t, pair_mask, chunk_size, use_reentrant=False)
            else:
                t = block(t, pair_mask, chunk_size)
        return self.layer_norm(t)


class TemplatePointwiseAttention(nn.Module):
    """AF2 Suppl. Alg. 17: each pair position z_ij attends over its N_templ template activations t_ij.

    OpenFold: ``Attention(c_q=c_z, c_kv=c_t, c_hidden, heads, gating=False)``; masked templates get a
    logit bias of ``-inf`` (1e5), so with no template at all the softmax is uniform and the caller zeroes
    the result.
    """

    def __init__(self, c_z: int, cfg: TemplateConfig, kernels: KernelConfig):
        super().__init__()
        self.inf = cfg.inf
        self.mha = Attention(c_z, cfg.c_t, cfg.pointwise_dim, cfg.pointwise_heads, gating=False,
                             impl=kernels.attention, gated_output_impl=kernels.gated_output)

    def forward(self, t: Tensor, z: Tensor, template_mask: Tensor, chunk_size: int | None = None) -> Tensor:
        """t [*, T, L, L, c_t], z [*, L, L, c_z], template_mask [*, T] -> update [*, L, L, c_z]."""
        t = t.movedim(-4, -2)                                          # [*, L, L, T, c_t]
        q = z.unsqueeze(-2)                                            # [*, L, L, 1, c_z]
        bias = self.inf * (template_mask.to(torch.float32) - 1.0)      # [*, T]
        bias = bias[..., None, None, None, None, :]                    # [*, 1(L), 1(L), 1(H), 1(Lq), T]
        return self.mha(q, t, bias=bias, chunk_size=chunk_size).squeeze(-2)


class TemplateEmbedder(nn.Module):
    """AF2 Suppl. Alg. 2 lines 9-13: pair features -> linear -> pair stack, ONE TEMPLATE AT A TIME (the
    [*, L, L, c_t] activations of a 4-template batch stay one template big; the blocks' kernels see the
    same shapes as without templates), then pointwise attention from z, zeroed when a sample has no
    template (OpenFold ``embed_templates``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.template
        self.pair_embedder = TemplatePairEmbedder(cfg)
        self.pair_stack = TemplatePairStack(cfg.template.c_t, cfg.template, cfg.kernels, cfg.checkpoint_blocks)
        self.pointwise_att = TemplatePointwiseAttention(cfg.c_z, cfg.template, cfg.kernels)

    def forward(self, batch: dict[str, Tensor], z: Tensor, pair_mask: Tensor,
                chunk_size: int | None = None) -> Tensor:
        """batch: the template fields [B, T, ...]; z [B, L, L, c_z]; pair_mask [B, L, L]
        -> pair update [B, L, L, c_z]."""
        tc = self.cfg
        template_mask = batch["template_mask"]                          # [B, T]
        ts = []
        for i in range(template_mask.shape[-1]):
            feat = template_pair_feat({k: batch[k][:, i] for k in _PAIR_FEAT_KEYS},
                                      min_bin=tc.distogram_min, max_bin=tc.distogram_max,
                                      num_bins=tc.distogram_bins, inf=tc.inf)  # [B, L, L, 88]
            ts.append(self.pair_stack(self.pair_embedder(feat), pair_mask, chunk_size))
        t = torch.stack(ts, dim=1)                                      # [B, T, L, L, c_t]
        update = self.pointwise_att(t, z, template_mask, chunk_size)
        has_template = (template_mask.sum(-1) > 0).to(update.dtype)     # [B]
        return update * has_template[:, None, None, None]
