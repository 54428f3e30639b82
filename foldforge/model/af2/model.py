"""The AlphaFold2 model (AF2 Suppl. Alg. 2): embedders, template and extra-MSA stacks, 48-block
Evoformer, structure module and heads, run ``num_recycles + 1`` times with recycling (Alg. 30/32).

Precision: the caller may run ``forward`` under ``torch.autocast(dtype=torch.bfloat16)``; the structure
module and the heads are fp32 islands (autocast disabled, fp32-cast inputs), as in the MLPerf HPC
OpenFold bf16 recipe. The model knows nothing of parallelism (DDP, DAP, CUDA graphs are applied from
``train/``); per-block activation checkpointing is a plain ``checkpoint_blocks`` attribute on each stack.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from foldforge.config import ModelConfig
from foldforge.model.af2 import features as F
from foldforge.model.af2.embedders import ExtraMSAEmbedder, InputEmbedder, RecyclingEmbedder, TemplateAngleEmbedder
from foldforge.model.af2.evoformer import EvoformerStack, ExtraMSAStack
from foldforge.model.af2.heads import AF2Heads
from foldforge.model.af2.structure_module import StructureModule
from foldforge.model.af2.template import TemplateEmbedder

Prev = tuple[Tensor, Tensor, Tensor]   # (m0_prev [B, L, c_m], z_prev [B, L, L, c_z], x_prev [B, L, 3])


class AlphaFold2(nn.Module):
    """AF2 Suppl. Alg. 2 with OpenFold's module layout (parameter count 93,229,082 for the MLPerf config).

    ``forward(batch, num_recycles)``: ``batch`` is :meth:`AF2Batch.as_dict` with a leading batch dim B;
    iterations 0..num_recycles-1 run under ``torch.no_grad()``, the last with grad. Each iteration reads
    its own recycle copy of the MSA features (``batch["msa"][:, r]`` etc.), aligned to the end so the
    gradient pass reads the last copy (:func:`features.recycle_index`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedder = InputEmbedder(cfg)
        self.recycling_embedder = RecyclingEmbedder(cfg)
        tc = cfg.template
        self.template_embedder = TemplateEmbedder(cfg) if tc.enabled else None
        self.template_angle_embedder = TemplateAngleEmbedder(cfg) if tc.enabled and tc.embed_angles else None
        self.extra_msa_embedder = ExtraMSAEmbedder(cfg)
        self.extra_msa_stack = ExtraMSAStack(cfg)
        self.evoformer = EvoformerStack(cfg)
        self.structure_module = StructureModule(cfg.structure, cfg.c_s, cfg.c_z)
        self.heads = AF2Heads(cfg)

    # ---- configuration applied from train/ ----

    def set_checkpoint_blocks(self, enabled: bool) -> None:
        """Per-block activation checkpointing of every stack (Evoformer, extra MSA, template pair)."""
        for module in self.modules():
            if hasattr(module, "checkpoint_blocks"):
                module.checkpoint_blocks = enabled

    # ---- forward ----

    def forward(self, batch: dict[str, Tensor], num_recycles: int) -> dict[str, Tensor]:
        """Returns the structure-module outputs (``sm_*``, ``final_atom*``) of the last iteration and
        ``distogram_logits`` [B, L, L, 64], ``masked_msa_logits`` [B, N_clust, L, 23], ``plddt_logits``
        [B, L, 50], ``experimentally_resolved_logits`` [B, L, 37] (+ ``tm_logits``), ``single``
        [B, L, c_s], ``pair`` [B, L, L, c_z] and ``msa_first_row`` [B, L, c_m]. The masked-MSA logits
        belong to the last MSA copy (targets ``true_msa[:, -1]``, ``bert_mask[:, -1]``)."""
        if num_recycles < 0:
            raise ValueError(f"num_recycles must be >= 0, got {num_recycles}")
        device_type = batch["aatype"].device.type
        # Chunking trades speed for memory; only inference needs it.
        chunk_size = None if self.training else self.cfg.chunk_size
        prev = None
        if num_recycles > 0:
            with torch.no_grad():
                for it in range(num_recycles):
                    _, prev = self.iteration(batch, F.recycle_index(batch, it, num_recycles), prev,
                                             chunk_size)
            if torch.is_autocast_enabled(device_type):
                # weight casts cached under no_grad carry no autograd history (pytorch/pytorch#65766)
                torch.clear_autocast_cache()
        outputs, _ = self.iteration(batch, F.recycle_index(batch, num_recycles, num_recycles), prev, chunk_size)

        with torch.autocast(device_type, enabled=False):
            outputs.update(self.heads({k: outputs[k].float() for k in ("sm_single", "single", "pair", "msa")}))
        del outputs["msa"]   # [B, N_seq, L, c_m]: only its first row and the logits leave the model
        return outputs

    def iteration(self, batch: dict[str, Tensor], r: int, prev: Prev | None,
                  chunk_size: int | None) -> tuple[dict[str, Tensor], Prev]:
        """One pass of AF2 Suppl. Alg. 2 lines 5-21 on recycle copy ``r``; returns (outputs, next prev)."""
        aatype = batch["aatype"].long()                                         # [B, L]
        seq_mask = batch["seq_mask"].float()
        pair_mask = seq_mask[..., :, None] * seq_mask[..., None, :]             # [B, L, L]
        msa_mask = batch["msa_mask"][:, r]                                      # [B, N_clust, L]
        n_clust = msa_mask.shape[1]

        # Alg. 2 lines 5-6: input embedding (Alg. 3, 4)
        m, z = self.input_embedder(F.target_feat(aatype), batch["residue_index"], F.msa_feat(batch, r))

        # lines 7-8 (Alg. 32): recycling; zeros on the first pass
        if prev is None:
            prev = (m.new_zeros(m.shape[:1] + m.shape[2:]), z.new_zeros(z.shape),
                    seq_mask.new_zeros(seq_mask.shape + (3,)))
        m0_update, z_update = self.recycling_embedder(*prev)
        m = torch.cat([m[:, :1] + m0_update[:, None], m[:, 1:]], dim=1)
        z = z + z_update

        # lines 9-13: templates (pair stack + pointwise attention; torsion angles as extra MSA rows)
        if self.template_embedder is not None:
            z = z + self.template_embedder(batch, z, pair_mask, chunk_size)
        if self.template_angle_embedder is not None:
            a = self.template_angle_embedder(F.template_angle_feat(batch))      # [B, T, L, c_m]
            m = torch.cat([m, a.to(m.dtype)], dim=1)                            # [B, N_clust + T, L, c_m]
            msa_mask = torch.cat([msa_mask, batch["template_torsion_angles_mask"][..., 2]], dim=1)

        # lines 14-16: extra MSA stack (Alg. 18)
        e = self.extra_msa_embedder(F.extra_msa_feat(batch, r))                 # [B, N_extra, L, c_e]
        z = self.extra_msa_stack(e, z, batch["extra_msa_mask"][:, r], pair_mask, chunk_size)
        del e

        # lines 17-18: Evoformer (Alg. 6) and the single representation
        m, z, s = self.evoformer(m, z, msa_mask, pair_mask, chunk_size)

        # line 20: structure module, an fp32 island
        with torch.autocast(m.device.type, enabled=False):
            sm = self.structure_module(s.float(), z.float(), aatype, seq_mask)

        outputs = dict(sm)
        outputs.update(single=s, pair=z, msa=m[:, :n_clust], msa_first_row=m[:, 0])
        x_prev = F.pseudo_beta(aatype, sm["final_atom_positions"])
        return outputs, (m[:, 0].detach(), z.detach(), x_prev.detach())


def count_parameters(model: nn.Module, depth: int = 1) -> dict[str, int]:
    """Parameters per module, down to ``depth`` levels of dotted names (1: top-level modules), plus
    ``total``. Works on a model built on the meta device (``with torch.device("meta"): AlphaFold2(cfg)``)."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = ".".join(name.split(".")[:depth]) if "." in name else name
        counts[key] = counts.get(key, 0) + p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
