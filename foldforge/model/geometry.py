"""Rigid transformations as (rotation matrix, translation) pairs (AF2 Suppl. 1.1, Alg. 21-23).

A :class:`Rigid` holds ``rot`` ``[*, 3, 3]`` and ``trans`` ``[*, 3]``; ``x_global = rot @ x_local + trans``.
Rotation matrices (not quaternions) are the stored form: composing and applying them is a few batched
matmuls and they convert to and from the 4x4 homogeneous frames of the data pipeline
(``foldforge.data.targets``). Quaternions appear only in the backbone update (Alg. 23).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def quat_to_rot(q: Tensor) -> Tensor:
    """Unit quaternion (a, b, c, d) ``[*, 4]`` -> rotation matrix ``[*, 3, 3]`` (AF2 Suppl. 1.8.1)."""
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    a, b, c, d = q.unbind(-1)
    rows = [
        a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c),
        2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b),
        2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d,
    ]
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


@dataclass
class Rigid:
    rot: Tensor    # [*, 3, 3]
    trans: Tensor  # [*, 3]

    # ---- construction ----
    @staticmethod
    def identity(shape: tuple[int, ...], *, dtype=torch.float32, device=None) -> "Rigid":
        rot = torch.eye(3, dtype=dtype, device=device).expand(*shape, 3, 3).clone()
        return Rigid(rot, torch.zeros(*shape, 3, dtype=dtype, device=device))

    @staticmethod
    def from_tensor_4x4(t: Tensor) -> "Rigid":
        return Rigid(t[..., :3, :3], t[..., :3, 3])

    def to_tensor_4x4(self) -> Tensor:
        out = torch.zeros(self.shape + (4, 4), dtype=self.rot.dtype, device=self.rot.device)
        out[..., :3, :3] = self.rot
        out[..., :3, 3] = self.trans
        out[..., 3, 3] = 1
        return out

    @staticmethod
    def from_3_points(x1: Tensor, x2: Tensor, x3: Tensor, eps: float = 1e-8) -> "Rigid":
        """AF2 Suppl. Alg. 21 rigidFrom3Points: origin ``x2``, x axis along ``x3 - x2``, ``x1`` in the xy
        plane. The backbone frame is ``from_3_points(N, CA, C)``."""
        origin = x2
        v1 = x3 - x2
        v2 = x1 - x2
        e1 = v1 / torch.sqrt((v1 * v1).sum(-1, keepdim=True) + eps)
        u2 = v2 - e1 * (e1 * v2).sum(-1, keepdim=True)
        e2 = u2 / torch.sqrt((u2 * u2).sum(-1, keepdim=True) + eps)
        e3 = torch.cross(e1, e2, dim=-1)
        return Rigid(torch.stack([e1, e2, e3], dim=-1), origin)

    # ---- algebra ----
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.trans.shape[:-1])

    def compose(self, other: "Rigid") -> "Rigid":
        """``self ∘ other``: first ``other``, then ``self``."""
        rot = self.rot @ other.rot
        trans = (self.rot @ other.trans.unsqueeze(-1)).squeeze(-1) + self.trans
        return Rigid(rot, trans)

    def apply(self, pts: Tensor) -> Tensor:
        """``pts`` ``[*, 3]`` broadcast against the rigid's shape -> global coordinates."""
        return torch.einsum("...ij,...j->...i", self.rot, pts) + self.trans

    def invert(self) -> "Rigid":
        rot_t = self.rot.transpose(-1, -2)
        return Rigid(rot_t, -torch.einsum("...ij,...j->...i", rot_t, self.trans))

    def invert_apply(self, pts: Tensor) -> Tensor:
        return torch.einsum("...ji,...j->...i", self.rot, pts - self.trans)

    def compose_q_update_vec(self, update: Tensor) -> "Rigid":
        """AF2 Suppl. Alg. 23: ``update`` ``[*, 6]`` = (b, c, d) of a non-unit quaternion (1, b, c, d)
        and a translation, both in the local frame; returns ``self ∘ update``."""
        bcd, t = update[..., :3], update[..., 3:]
        q = torch.cat([torch.ones_like(bcd[..., :1]), bcd], dim=-1)
        return self.compose(Rigid(quat_to_rot(q), t))

    def scale_translation(self, factor: float) -> "Rigid":
        return Rigid(self.rot, self.trans * factor)

    def stop_rot_gradient(self) -> "Rigid":
        return Rigid(self.rot.detach(), self.trans)

    def detach(self) -> "Rigid":
        return Rigid(self.rot.detach(), self.trans.detach())

    def unsqueeze(self, dim: int) -> "Rigid":
        """Insert a dim into the rigid's own shape (negative ``dim`` counts from its end)."""
        d = dim if dim >= 0 else len(self.shape) + 1 + dim
        return Rigid(self.rot.unsqueeze(d), self.trans.unsqueeze(d))

    def __getitem__(self, index) -> "Rigid":
        index = index if isinstance(index, tuple) else (index,)
        return Rigid(self.rot[index + (slice(None), slice(None))], self.trans[index + (slice(None),)])

    def to(self, dtype: torch.dtype) -> "Rigid":
        return Rigid(self.rot.to(dtype), self.trans.to(dtype))
