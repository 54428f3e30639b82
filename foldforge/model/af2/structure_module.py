"""AF2 structure module (AF2 Suppl. 1.8, Alg. 20-24): IPA, backbone update, angle resnet, all atoms.

Parameter names and shapes follow OpenFold's monomer ``StructureModule`` (``ipa.linear_q``, ...,
``angle_resnet.layers.0.linear_1``), so its checkpoints map one to one and the parameter count equals
OpenFold's (checked in the tests at MLPerf sizes).

Units: backbone translations are kept in nanometres inside the blocks and multiplied by
``cfg.trans_scale`` (10) for every output, which is in Angstrom (OpenFold convention; the idealized
literature positions are in Angstrom).

Precision: the module is an fp32 island. ``forward`` disables autocast and casts its inputs to float32
(float64 inputs stay float64, for tests).
Point transforms and the point-attention distances are elementwise (exact in fp32); the attention
averages are matmuls and therefore assume TF32 matmuls are off (PyTorch's default).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from foldforge.config import StructureConfig
from foldforge.model.af2.all_atom import atom14_to_atom37, frames_to_atom14, torsion_angles_to_frames
from foldforge.model.geometry import Rigid
from foldforge.model.primitives import LayerNorm, Linear

# softplus(x) = 1 at x = log(e - 1): the point-attention head weights start at 1 (AF2 Suppl. Alg. 22).
_SOFTPLUS_INVERSE_1 = math.log(math.e - 1.0)


def _to_global(rot: Tensor, trans: Tensor, pts: Tensor) -> Tensor:
    """``R x + t`` for points ``[*, L, N, 3]`` in frames ``rot [*, L, 3, 3]``, ``trans [*, L, 3]``."""
    return (rot.unsqueeze(-3) * pts.unsqueeze(-2)).sum(-1) + trans.unsqueeze(-2)


def _to_local(rot: Tensor, trans: Tensor, pts: Tensor) -> Tensor:
    """``R^T (x - t)`` for points ``[*, L, N, 3]``: the inverse of :func:`_to_global`."""
    return ((pts - trans.unsqueeze(-2)).unsqueeze(-1) * rot.unsqueeze(-3)).sum(-2)


class InvariantPointAttention(nn.Module):
    """Invariant point attention (AF2 Suppl. Alg. 22), OpenFold monomer parameter layout.

    The point projections are coordinate-major (``[x of all H*P points, y ..., z ...]``) and, within a
    coordinate, head-major; per head the key/value projection holds the P_qk key points, then the P_v
    value points. As in AF2's source (and OpenFold), the scalar projections have biases and
    LeCun-normal ("default") init, not the supplement's bias-free Glorot.
    """

    def __init__(self, c_s: int, c_z: int, c_hidden: int, num_heads: int, num_qk_points: int,
                 num_v_points: int, inf: float = 1e5, eps: float = 1e-8):
        super().__init__()
        self.c_hidden, self.num_heads = c_hidden, num_heads
        self.num_qk_points, self.num_v_points = num_qk_points, num_v_points
        self.inf, self.eps = inf, eps
        hc = num_heads * c_hidden
        self.linear_q = Linear(c_s, hc)
        self.linear_kv = Linear(c_s, 2 * hc)
        self.linear_q_points = Linear(c_s, num_heads * num_qk_points * 3)
        self.linear_kv_points = Linear(c_s, num_heads * (num_qk_points + num_v_points) * 3)
        self.linear_b = Linear(c_z, num_heads)
        self.head_weights = nn.Parameter(torch.full((num_heads,), _SOFTPLUS_INVERSE_1))
        self.linear_out = Linear(num_heads * (c_z + c_hidden + 4 * num_v_points), c_s, init="final")

    def _points(self, linear: Linear, s: Tensor, frames: Rigid, num_points: int) -> Tensor:
        """Project ``s`` to points in each residue's local frame and map them to global coordinates.

        Returns ``[*, L, H, num_points, 3]``.
        """
        p = linear(s)  # [*, L, 3 * H * P], coordinate-major
        p = p.unflatten(-1, (3, -1)).transpose(-1, -2)  # [*, L, H * P, 3]
        p = _to_global(frames.rot, frames.trans, p)
        return p.unflatten(-2, (self.num_heads, num_points))

    def forward(self, s: Tensor, z: Tensor, frames: Rigid, mask: Tensor) -> Tensor:
        """s ``[*, L, c_s]``, z ``[*, L, L, c_z]``, frames Rigid ``[*, L]``, mask ``[*, L]`` -> ``[*, L, c_s]``."""
        H, C, Pq, Pv = self.num_heads, self.c_hidden, self.num_qk_points, self.num_v_points
        q = self.linear_q(s).unflatten(-1, (H, C))  # [*, L, H, C]
        k, v = self.linear_kv(s).unflatten(-1, (H, 2 * C)).split(C, dim=-1)  # [*, L, H, C] each
        q_pts = self._points(self.linear_q_points, s, frames, Pq)  # [*, L, H, Pq, 3]
        k_pts, v_pts = self._points(self.linear_kv_points, s, frames, Pq + Pv).split([Pq, Pv], dim=-2)

        # Scalar and pair-bias terms (Alg. 22 line 7), [*, H, L, L]; w_L = sqrt(1/3) on every term.
        logits = torch.matmul(q.transpose(-2, -3), k.permute(*range(k.dim() - 3), -2, -1, -3))
        logits = logits * math.sqrt(1.0 / (3 * C))
        logits = logits + math.sqrt(1.0 / 3) * self.linear_b(z).permute(*range(z.dim() - 3), -1, -3, -2)

        # Point term: -gamma_h w_C / 2 * sum_p |T_i q_p - T_j k_p|^2 with w_C = sqrt(2 / (9 Pq)).
        # Flattening (P, 3) makes it one squared distance of 3*Pq-vectors per (i, j, head).
        diff = q_pts.flatten(-2).unsqueeze(-3) - k_pts.flatten(-2).unsqueeze(-4)  # [*, L, L, H, 3 * Pq]
        dist2 = diff.square().sum(-1)  # [*, L, L, H]
        gamma = nn.functional.softplus(self.head_weights) * math.sqrt(1.0 / (3 * (Pq * 9.0 / 2)))
        logits = logits - 0.5 * (dist2 * gamma).permute(*range(dist2.dim() - 3), -1, -3, -2)

        pair_mask = mask.unsqueeze(-1) * mask.unsqueeze(-2)  # [*, L, L]
        logits = logits + self.inf * (pair_mask.unsqueeze(-3) - 1.0)
        a = torch.softmax(logits, dim=-1)  # [*, H, L, L]

        # Outputs (Alg. 22 lines 10-11).
        o = torch.matmul(a, v.transpose(-2, -3)).transpose(-2, -3).flatten(-2)  # [*, L, H * C]
        o_pt = torch.matmul(a, v_pts.flatten(-2).transpose(-2, -3))  # [*, H, L, Pv * 3]
        o_pt = o_pt.transpose(-2, -3).unflatten(-1, (Pv, 3)).flatten(-3, -2)  # [*, L, H * Pv, 3]
        o_pt = _to_local(frames.rot, frames.trans, o_pt)
        o_pt_norm = torch.sqrt(o_pt.square().sum(-1) + self.eps)  # [*, L, H * Pv]
        o_pair = torch.matmul(a.transpose(-2, -3), z).flatten(-2)  # [*, L, H, L] @ [*, L, L, c_z] -> [*, L, H * c_z]
        return self.linear_out(torch.cat([o, *o_pt.unbind(-1), o_pt_norm, o_pair], dim=-1))


class BackboneUpdate(nn.Module):
    """AF2 Suppl. Alg. 23 lines 1-2: ``s -> (b, c, d, t_x, t_y, t_z)``, zero-initialised ("final")."""

    def __init__(self, c_s: int):
        super().__init__()
        self.linear = Linear(c_s, 6, init="final")

    def forward(self, s: Tensor) -> Tensor:
        return self.linear(s)  # [*, L, 6]; applied with Rigid.compose_q_update_vec


class StructureModuleTransitionLayer(nn.Module):
    """One residual 3-layer MLP of the single transition (AF2 Suppl. Alg. 20 line 9)."""

    def __init__(self, c: int):
        super().__init__()
        self.linear_1 = Linear(c, c, init="relu")
        self.linear_2 = Linear(c, c, init="relu")
        self.linear_3 = Linear(c, c, init="final")

    def forward(self, s: Tensor) -> Tensor:
        return s + self.linear_3(torch.relu(self.linear_2(torch.relu(self.linear_1(s)))))


class StructureModuleTransition(nn.Module):
    """AF2 Suppl. Alg. 20 lines 8-9: residual MLP layers, dropout, LayerNorm."""

    def __init__(self, c: int, num_layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(StructureModuleTransitionLayer(c) for _ in range(num_layers))
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = LayerNorm(c)

    def forward(self, s: Tensor) -> Tensor:
        for layer in self.layers:
            s = layer(s)
        return self.layer_norm(self.dropout(s))


class AngleResnetBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.linear_1 = Linear(c, c, init="relu")
        self.linear_2 = Linear(c, c, init="final")

    def forward(self, a: Tensor) -> Tensor:
        return a + self.linear_2(torch.relu(self.linear_1(torch.relu(a))))


class AngleResnet(nn.Module):
    """Torsion-angle prediction (AF2 Suppl. Alg. 20 lines 11-14).

    As in AF2's source (and OpenFold), ReLUs are applied to both inputs before their projections; the
    supplement's pseudocode omits them. Returns (unnormalized, normalized) ``[*, L, num_angles, 2]``.
    """

    def __init__(self, c_s: int, c_hidden: int, num_blocks: int, num_angles: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear_in = Linear(c_s, c_hidden)
        self.linear_initial = Linear(c_s, c_hidden)
        self.layers = nn.ModuleList(AngleResnetBlock(c_hidden) for _ in range(num_blocks))
        self.linear_out = Linear(c_hidden, num_angles * 2)

    def forward(self, s: Tensor, s_initial: Tensor) -> tuple[Tensor, Tensor]:
        a = self.linear_in(torch.relu(s)) + self.linear_initial(torch.relu(s_initial))
        for layer in self.layers:
            a = layer(a)
        unnormalized = self.linear_out(torch.relu(a)).unflatten(-1, (-1, 2))  # [*, L, num_angles, 2]
        norm = torch.sqrt(torch.clamp(unnormalized.square().sum(-1, keepdim=True), min=self.eps))
        return unnormalized, unnormalized / norm


class StructureModule(nn.Module):
    """AF2 Suppl. Alg. 20: ``cfg.num_blocks`` iterations of one shared-weight block.

    Each iteration: IPA (Alg. 22) + dropout + LayerNorm, the single transition, a backbone update
    (Alg. 23), torsion angles (lines 11-14) and all-atom coordinates (Alg. 24). Rotation gradients are
    stopped between iterations (line 20); translations keep their gradient.
    """

    def __init__(self, cfg: StructureConfig, c_s: int, c_z: int):
        super().__init__()
        self.cfg = cfg
        self.layer_norm_s = LayerNorm(c_s)
        self.layer_norm_z = LayerNorm(c_z)
        self.linear_in = Linear(c_s, c_s)
        self.ipa = InvariantPointAttention(c_s, c_z, cfg.c_ipa, cfg.ipa_heads, cfg.qk_points, cfg.v_points,
                                           inf=cfg.inf, eps=cfg.eps)
        self.ipa_dropout = nn.Dropout(cfg.dropout)
        self.layer_norm_ipa = LayerNorm(c_s)
        self.transition = StructureModuleTransition(c_s, cfg.transition_layers, cfg.dropout)
        self.bb_update = BackboneUpdate(c_s)
        self.angle_resnet = AngleResnet(c_s, cfg.c_resnet, cfg.resnet_blocks, cfg.num_angles, cfg.eps)

    def forward(self, s: Tensor, z: Tensor, aatype: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Run the structure module in fp32.

        Args:
          s: ``[*, L, c_s]`` single representation (Evoformer output).
          z: ``[*, L, L, c_z]`` pair representation.
          aatype: ``[*, L]`` integer residue types (AF2 order).
          mask: ``[*, L]`` residue mask (1 = real residue); all ones if None.
        Returns (B = ``cfg.num_blocks``; coordinates in Angstrom):
          sm_frames ``[B, *, L, 4, 4]``, sm_sidechain_frames ``[B, *, L, 8, 4, 4]``,
          sm_unnormalized_angles / sm_angles ``[B, *, L, 7, 2]``, sm_positions ``[B, *, L, 14, 3]``,
          sm_single ``[*, L, c_s]``, final_atom14_positions ``[*, L, 14, 3]``,
          final_atom_positions ``[*, L, 37, 3]``, final_atom_mask ``[*, L, 37]`` (atoms the residue
          type has, zero on masked residues).
        """
        dtype = torch.float64 if s.dtype == torch.float64 else torch.float32  # fp64 kept for tests
        with torch.autocast(device_type=s.device.type, enabled=False):
            s, z = s.to(dtype), z.to(dtype)
            mask = s.new_ones(s.shape[:-1]) if mask is None else mask.to(dtype)
            return self._forward(s, z, aatype, mask)

    def _forward(self, s: Tensor, z: Tensor, aatype: Tensor, mask: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        s = self.layer_norm_s(s)
        z = self.layer_norm_z(z)
        s_initial = s
        s = self.linear_in(s)
        frames = Rigid.identity(s.shape[:-1], dtype=s.dtype, device=s.device)  # [*, L], nm

        per_block: dict[str, list[Tensor]] = {k: [] for k in (
            "sm_frames", "sm_sidechain_frames", "sm_unnormalized_angles", "sm_angles", "sm_positions")}
        for i in range(cfg.num_blocks):
            s = s + self.ipa(s, z, frames, mask)
            s = self.layer_norm_ipa(self.ipa_dropout(s))
            s = self.transition(s)
            frames = frames.compose_q_update_vec(self.bb_update(s))

            backbone = frames.scale_translation(cfg.trans_scale)  # Angstrom
            unnormalized, angles = self.angle_resnet(s, s_initial)
            group_frames = torsion_angles_to_frames(backbone, angles, aatype)  # [*, L, 8]
            per_block["sm_frames"].append(backbone.to_tensor_4x4())
            per_block["sm_sidechain_frames"].append(group_frames.to_tensor_4x4())
            per_block["sm_unnormalized_angles"].append(unnormalized)
            per_block["sm_angles"].append(angles)
            per_block["sm_positions"].append(frames_to_atom14(group_frames, aatype))

            if i < cfg.num_blocks - 1:
                frames = frames.stop_rot_gradient()

        out = {k: torch.stack(v, dim=0) for k, v in per_block.items()}
        out["sm_single"] = s
        out["final_atom14_positions"] = out["sm_positions"][-1]
        pos37, mask37 = atom14_to_atom37(out["final_atom14_positions"], aatype)
        out["final_atom_positions"] = pos37
        out["final_atom_mask"] = mask37 * mask.unsqueeze(-1)
        return out
