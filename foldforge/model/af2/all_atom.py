"""All-atom reconstruction from backbone frames and torsion angles (AF2 Suppl. 1.8.1, Alg. 24).

``torsion_angles_to_frames`` places the eight rigid groups of every residue (backbone, pre-omega, phi,
psi, chi1-chi4; AF2 Suppl. Table 2), ``frames_to_atom14`` puts the idealized literature atoms into those
frames (Alg. 24 line 11), and ``atom14_to_atom37`` scatters the dense atom14 layout into atom37.

The residue tables come from :mod:`foldforge.data.residue_constants` (numpy) and are converted to tensors
on first use, once per (device, dtype), so importing this module does no work. The first call for a
device must therefore happen outside CUDA-graph capture (the warm-up step does this).

Atom and frame selection uses one-hot products summed elementwise, not ``gather``/``index``: the backward
of a gather is an atomic scatter-add on CUDA (non-deterministic), and a one-hot ``matmul`` would be
rounded to TF32 if that is ever enabled. The products here are a few hundred floats per residue.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from foldforge.data import residue_constants as rc
from foldforge.model.geometry import Rigid

_TABLES: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}


def _numpy_table(name: str) -> np.ndarray:
    if name == "default_frames":  # [21, 8, 4, 4] group -> parent frame (backbone, or chi k-1 for chi k)
        return rc.restype_rigid_group_default_frame
    if name == "atom14_group_onehot":  # [21, 14, 8] rigid group of each atom14 slot
        return np.eye(8)[rc.restype_atom14_to_rigid_group]
    if name == "atom14_positions":  # [21, 14, 3] idealized position inside the atom's group frame
        return rc.restype_atom14_rigid_group_positions
    if name == "atom14_mask":  # [21, 14]
        return rc.restype_atom14_mask
    if name == "atom37_from_atom14":  # [21, 37, 14] one-hot; all-zero rows for atoms a type lacks
        return np.eye(14)[rc.restype_atom37_to_atom14] * rc.restype_atom37_mask[..., None]
    if name == "atom37_mask":  # [21, 37]
        return rc.restype_atom37_mask
    raise KeyError(name)


def residue_table(name: str, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """A residue-constant table as a tensor on ``device``/``dtype``, built once and cached."""
    key = (name, torch.device(device), dtype)
    table = _TABLES.get(key)
    if table is None:
        table = torch.as_tensor(_numpy_table(name), dtype=dtype, device=device)
        _TABLES[key] = table
    return table


def _restype(aatype: Tensor) -> Tensor:
    """Residue types as long indices into the [21, ...] tables; gap/mask tokens (> 20) count as UNK."""
    return aatype.long().clamp(max=rc.UNK_ID)


def torsion_angles_to_frames(backbone: Rigid, angles_sin_cos: Tensor, aatype: Tensor) -> Rigid:
    """The 8 rigid-group frames of every residue in global coordinates (AF2 Suppl. Alg. 24 lines 1-10).

    Each group's frame is its default frame (relative to the parent group) composed with a rotation by
    its torsion about the group's x-axis. Pre-omega, phi, psi and chi1 hang off the backbone; chi2-4
    hang off chi1-3 and are chained so that all frames are finally relative to the backbone.

    Args:
      backbone: Rigid ``[*, L]``, backbone frames (origin CA, x along CA->C, N in the xy-plane).
      angles_sin_cos: ``[*, L, 7, 2]`` (sin, cos) of pre-omega, phi, psi, chi1-4; need not be unit
        length (the model passes normalized angles; the ground truth passes exact ones).
      aatype: ``[*, L]`` integer residue types (AF2 order).
    Returns:
      Rigid ``[*, L, 8]``: group frames in the same units as ``backbone.trans``.
    """
    restype = _restype(aatype)
    default = residue_table("default_frames", angles_sin_cos.device, angles_sin_cos.dtype)[restype]
    d_rot, d_trans = default[..., :3, :3], default[..., :3, 3]  # [*, L, 8, 3, 3], [*, L, 8, 3]

    # The backbone group has no torsion: (sin, cos) = (0, 1). Built on the device (no host copy, so
    # the function can be captured in a CUDA graph).
    bb = torch.zeros_like(angles_sin_cos[..., :1, :])
    bb[..., 1] = 1.0
    sin_cos = torch.cat([bb, angles_sin_cos], dim=-2)  # [*, L, 8, 2]
    sin, cos = sin_cos[..., 0, None], sin_cos[..., 1, None]  # [*, L, 8, 1]

    # default ∘ R_x(alpha) with R_x = [[1, 0, 0], [0, cos, -sin], [0, sin, cos]]: column 0 is unchanged,
    # columns 1 and 2 rotate into each other; the translation is the default frame's.
    c0, c1, c2 = d_rot[..., 0], d_rot[..., 1], d_rot[..., 2]  # columns, [*, L, 8, 3]
    rot = torch.stack([c0, cos * c1 + sin * c2, cos * c2 - sin * c1], dim=-1)  # [*, L, 8, 3, 3]

    # Chain chi2 -> chi1 -> backbone, chi3 -> chi2, chi4 -> chi3 (Alg. 24 lines 7-9).
    rots, transes = list(rot.unbind(-3)), list(d_trans.unbind(-2))
    for g in (5, 6, 7):
        to_bb = Rigid(rots[g - 1], transes[g - 1]).compose(Rigid(rots[g], transes[g]))
        rots[g], transes[g] = to_bb.rot, to_bb.trans
    to_backbone = Rigid(torch.stack(rots, dim=-3), torch.stack(transes, dim=-2))  # [*, L, 8]
    return backbone.unsqueeze(-1).compose(to_backbone)


def frames_to_atom14(frames: Rigid, aatype: Tensor) -> Tensor:
    """Idealized atom14 coordinates from the rigid-group frames (AF2 Suppl. Alg. 24 line 11).

    Args:
      frames: Rigid ``[*, L, 8]`` (from :func:`torsion_angles_to_frames`).
      aatype: ``[*, L]`` integer residue types.
    Returns:
      ``[*, L, 14, 3]`` positions (units of ``frames.trans``; literature positions are in Angstrom),
      zero in atom14 slots that the residue type does not have.
    """
    restype = _restype(aatype)
    dev, dt = frames.trans.device, frames.trans.dtype
    onehot = residue_table("atom14_group_onehot", dev, dt)[restype]  # [*, L, 14, 8]
    lit = residue_table("atom14_positions", dev, dt)[restype]  # [*, L, 14, 3]
    exists = residue_table("atom14_mask", dev, dt)[restype]  # [*, L, 14]

    # Each atom's group frame: [*, L, 14, 3, 3] and [*, L, 14, 3].
    rot = (onehot[..., None, None] * frames.rot.unsqueeze(-4)).sum(-3)
    trans = (onehot[..., None] * frames.trans.unsqueeze(-3)).sum(-2)
    pos = (rot * lit.unsqueeze(-2)).sum(-1) + trans  # R @ x + t, [*, L, 14, 3]
    return pos * exists[..., None]


def atom14_to_atom37(atom14: Tensor, aatype: Tensor) -> tuple[Tensor, Tensor]:
    """Dense atom14 coordinates ``[*, L, 14, 3]`` -> atom37 ``[*, L, 37, 3]`` and its mask ``[*, L, 37]``.

    The mask says which atom37 types the residue type has (1.0) — not whether they were observed.
    Atoms a residue type lacks are zero.
    """
    restype = _restype(aatype)
    sel = residue_table("atom37_from_atom14", atom14.device, atom14.dtype)[restype]  # [*, L, 37, 14]
    pos37 = (sel[..., None] * atom14.unsqueeze(-3)).sum(-2)  # [*, L, 37, 3]
    mask37 = residue_table("atom37_mask", atom14.device, atom14.dtype)[restype]  # [*, L, 37]
    return pos37, mask37
