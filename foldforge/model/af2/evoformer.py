"""Evoformer (AF2 Suppl. Alg. 6) and extra-MSA stack (Alg. 18).

One block class serves both stacks: the extra-MSA block is the Evoformer block with global column
attention (Alg. 19) and its own widths (``ModelConfig.extra_msa``), as in OpenFold's ``ExtraMSABlock``.
Sub-modules return updates; the shared-mask dropout and the residual add happen here (AF2 Suppl. 1.11.6):
row-shared for MSA row attention, triangle multiplications and starting-node attention, column-shared for
ending-node attention, none for column attention, transitions and the outer product mean.

Activation checkpointing: each stack recomputes one block at a time in the backward pass when its
``checkpoint_blocks`` attribute is True (set from ``ModelConfig.checkpoint_blocks`` at build; ``train/``
may flip it) and the module is training with grad enabled; never in no-grad recycling passes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from foldforge.config import EvoformerConfig, KernelConfig, ModelConfig
from foldforge.model.dropout import DropoutResidual
from foldforge.model.msa import MSAColumnAttention, MSAColumnGlobalAttention, MSARowAttentionWithPairBias
from foldforge.model.opm import OuterProductMean
from foldforge.model.primitives import Linear
from foldforge.model.transition import Transition
from foldforge.model.triangle import TriangleAttention, TriangleMultiplication


class EvoformerBlock(nn.Module):
    """AF2 Suppl. Alg. 6 lines 2-11 (and Alg. 18 with ``cfg.global_column_attention``)."""

    def __init__(self, c_m: int, c_z: int, cfg: EvoformerConfig, kernels: KernelConfig):
        super().__init__()
        self.msa_att_row = MSARowAttentionWithPairBias(c_m, c_z, cfg.msa_head_dim, cfg.msa_heads, kernels)
        column = MSAColumnGlobalAttention if cfg.global_column_attention else MSAColumnAttention
        self.msa_att_col = column(c_m, cfg.msa_head_dim, cfg.msa_heads, kernels)
        self.msa_transition = Transition(c_m, cfg.transition_n, kernels)
        self.outer_product_mean = OuterProductMean(c_m, c_z, cfg.opm_dim, kernels)
        self.tri_mul_out = TriangleMultiplication(c_z, cfg.tri_mul_dim, "outgoing", kernels)
        self.tri_mul_in = TriangleMultiplication(c_z, cfg.tri_mul_dim, "incoming", kernels)
        self.tri_att_start = TriangleAttention(c_z, cfg.pair_head_dim, cfg.pair_heads, "starting", kernels)
        self.tri_att_end = TriangleAttention(c_z, cfg.pair_head_dim, cfg.pair_heads, "ending", kernels)
        self.pair_transition = Transition(c_z, cfg.transition_n, kernels)
        self.msa_dropout_row = DropoutResidual(cfg.msa_dropout, shared_dim=-3, impl=kernels.dropout)
        self.pair_dropout_row = DropoutResidual(cfg.pair_dropout, shared_dim=-3, impl=kernels.dropout)
        self.pair_dropout_col = DropoutResidual(cfg.pair_dropout, shared_dim=-2, impl=kernels.dropout)

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """m [*, S, L, c_m], z [*, L, L, c_z], msa_mask [*, S, L], pair_mask [*, L, L] -> (m, z)."""
        # MSA stack (Alg. 6 lines 2-4)
        m = self.msa_dropout_row(m, self.msa_att_row(m, z, msa_mask, chunk_size=chunk_size))
        m = m + self.msa_att_col(m, msa_mask, chunk_size=chunk_size)
        m = m + self.msa_transition(m, msa_mask)
        # communication (line 5)
        z = z + self.outer_product_mean(m, msa_mask, chunk_size=chunk_size)
        # pair stack (lines 6-10)
        z = self.pair_dropout_row(z, self.tri_mul_out(z, pair_mask))
        z = self.pair_dropout_row(z, self.tri_mul_in(z, pair_mask))
        z = self.pair_dropout_row(z, self.tri_att_start(z, pair_mask, chunk_size=chunk_size))
        z = self.pair_dropout_col(z, self.tri_att_end(z, pair_mask, chunk_size=chunk_size))
        z = z + self.pair_transition(z, pair_mask)
        return m, z


class _BlockStack(nn.Module):
    def __init__(self, c_m: int, c_z: int, cfg: EvoformerConfig, kernels: KernelConfig, checkpoint_blocks: bool):
        super().__init__()
        self.blocks = nn.ModuleList(EvoformerBlock(c_m, c_z, cfg, kernels) for _ in range(cfg.num_blocks))
        self.checkpoint_blocks = checkpoint_blocks

    def _run_blocks(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                    chunk_size: int | None) -> tuple[Tensor, Tensor]:
        ckpt = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:
                m, z = checkpoint(block, m, z, msa_mask, pair_mask, chunk_size, use_reentrant=False)
            else:
                m, z = block(m, z, msa_mask, pair_mask, chunk_size)
        return m, z


class EvoformerStack(_BlockStack):
    """AF2 Suppl. Alg. 6 x ``num_blocks`` (48), then the single representation s = Linear(m[0]) (Alg. 2
    line 17)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.c_m, cfg.c_z, cfg.evoformer, cfg.kernels, cfg.checkpoint_blocks)
        self.linear = Linear(cfg.c_m, cfg.c_s)

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                chunk_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """m [*, S, L, c_m], z [*, L, L, c_z] -> (m, z, s [*, L, c_s])."""
        m, z = self._run_blocks(m, z, msa_mask, pair_mask, chunk_size)
        return m, z, self.linear(m[..., 0, :, :])


class ExtraMSAStack(_BlockStack):
    """AF2 Suppl. Alg. 18 x ``num_blocks`` (4) on the extra-MSA activations (c_e); only z is kept."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.c_e, cfg.c_z, cfg.extra_msa, cfg.kernels, cfg.checkpoint_blocks)

    def forward(self, e: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                chunk_size: int | None = None) -> Tensor:
        """e [*, N_extra, L, c_e], z [*, L, L, c_z] -> z."""
        return self._run_blocks(e, z, msa_mask, pair_mask, chunk_size)[1]
