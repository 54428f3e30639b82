"""AF2 output heads (AF2 Suppl. 1.9): pLDDT (Alg. 29), distogram (1.9.8), masked MSA (1.9.9),
experimentally resolved (1.9.10) and, when enabled, the TM / predicted-aligned-error head (1.9.7).

Layout as OpenFold's ``AuxiliaryHeads``. Inputs as OpenFold: pLDDT reads the structure module's final
single representation (``sm_single``), experimentally-resolved the Evoformer single (``single``).
The heads run in fp32: the model calls them with autocast disabled on fp32 inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from foldforge.config import ModelConfig
from foldforge.model.primitives import LayerNorm, Linear


class PLDDTHead(nn.Module):
    """AF2 Suppl. Alg. 29: LayerNorm -> Linear-ReLU -> Linear-ReLU -> Linear to 50 lDDT-Ca bins."""

    def __init__(self, c_s: int, c_hidden: int, num_bins: int):
        super().__init__()
        self.layer_norm = LayerNorm(c_s)
        self.linear_1 = Linear(c_s, c_hidden, init="relu")
        self.linear_2 = Linear(c_hidden, c_hidden, init="relu")
        self.linear_3 = Linear(c_hidden, num_bins, init="final")

    def forward(self, s: Tensor) -> Tensor:
        """[*, L, c_s] -> [*, L, num_bins]."""
        s = torch.relu(self.linear_1(self.layer_norm(s)))
        return self.linear_3(torch.relu(self.linear_2(s)))


class DistogramHead(nn.Module):
    """AF2 Suppl. 1.9.8: Linear(c_z, 64) on z, symmetrised as logits_ij + logits_ji."""

    def __init__(self, c_z: int, num_bins: int):
        super().__init__()
        self.linear = Linear(c_z, num_bins, init="final")

    def forward(self, z: Tensor) -> Tensor:
        """[*, L, L, c_z] -> [*, L, L, num_bins]."""
        logits = self.linear(z)
        return logits + logits.transpose(-2, -3)


class LinearHead(nn.Module):
    """One final-init Linear: masked MSA (c_m -> 23), experimentally resolved (c_s -> 37), TM (c_z -> 64)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear = Linear(c_in, c_out, init="final")

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class AF2Heads(nn.Module):
    """All AF2 heads; ``forward`` reads the model's outputs dict and returns the logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hc = cfg.heads
        self.plddt = PLDDTHead(cfg.c_s, hc.plddt_hidden, hc.plddt_bins)
        self.distogram = DistogramHead(cfg.c_z, hc.distogram_bins)
        self.masked_msa = LinearHead(cfg.c_m, hc.masked_msa_classes)
        self.experimentally_resolved = LinearHead(cfg.c_s, hc.experimentally_resolved_atoms)
        self.tm = LinearHead(cfg.c_z, hc.tm_bins) if hc.tm_enabled else None

    def forward(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``outputs``: ``sm_single`` [*, L, c_s], ``single`` [*, L, c_s], ``pair`` [*, L, L, c_z],
        ``msa`` [*, N_clust, L, c_m] -> ``plddt_logits`` [*, L, 50], ``distogram_logits`` [*, L, L, 64],
        ``masked_msa_logits`` [*, N_clust, L, 23], ``experimentally_resolved_logits`` [*, L, 37]
        (+ ``tm_logits`` [*, L, L, 64])."""
        out = {
            "plddt_logits": self.plddt(outputs["sm_single"]),
            "distogram_logits": self.distogram(outputs["pair"]),
            "masked_msa_logits": self.masked_msa(outputs["msa"]),
            "experimentally_resolved_logits": self.experimentally_resolved(outputs["single"]),
        }
        if self.tm is not None:
            out["tm_logits"] = self.tm(outputs["pair"])
        return out
