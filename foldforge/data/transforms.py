"""AF2 training transforms: one chain record -> fixed-shape, model-ready numpy batch.

:func:`make_af2_batch` implements AF2 Suppl. 1.2.6-1.2.8 and Alg. 1 with OpenFold
``data/data_transforms.py`` semantics (the MSA steps live in :mod:`foldforge.data.msa_sampling`):

1. residue crop to ``crop_size`` (contiguous with a uniform start, or with probability
   ``spatial_crop_prob`` the ``crop_size`` residues nearest (CA) to a random observed residue,
   kept in sequence order), applied to every residue-axis array with one index set;
2. template subsampling (OpenFold ``random_crop_to_size``: random permutation, random start in
   [0, T], at most ``max_templates``);
3. per recycling copy (``num_recycle_copies``, independent draws): MSA block deletion, cluster
   centre sampling, masked MSA, extra-MSA selection, nearest-neighbour cluster profile, deletion
   features;
4. padding to fixed shapes with masks marking the real entries.

Deviations from OpenFold (see also :mod:`foldforge.data.msa_sampling`):

* The crop is done FIRST, before any MSA work, which bounds the per-sample cost by the crop size.
  The MSA steps are column-wise independent, except the masked-MSA profile, which is the
  column-wise MSA profile and therefore the same whether taken before or after the crop.
* The contiguous crop start is uniform over [0, L - crop] (AF2); OpenFold's two-stage draw
  (``right_anchor``) is not used.
* ``train=False``: no crop, no block deletion, the first ``max_templates`` templates; the MSA is
  still sampled and masked (OpenFold's eval mode also masks, for the masked-MSA validation loss).
* All features are returned with compact dtypes (int8 residue types); the one-hot ``msa_feat`` /
  ``target_feat`` are built by the model on the device.
* Padding uses 0 everywhere (as OpenFold ``make_fixed_size``); masks mark the real entries.
"""
from __future__ import annotations

import math
import time
from typing import Mapping

import numpy as np

from foldforge.config import DataConfig
from foldforge.data import residue_constants as rc
from foldforge.data.msa_sampling import NUM_MSA_CLASSES, sample_msa_copy

_CA = rc.atom_order["CA"]

# Template masks that become float32 (every other template array keeps its dtype, uint8/bool -> float32).
_TEMPLATE_FLOAT_MASKS = ("template_all_atom_mask",)


def _is_msa_key(key: str) -> bool:
    return key.startswith("msa") or key.startswith("deletion_matrix")


# --------------------------------------------------------------------------------------------------
# Residue crop
# --------------------------------------------------------------------------------------------------


def contiguous_crop(num_res: int, crop_size: int, rng: np.random.Generator) -> slice:
    """A window of ``min(num_res, crop_size)`` residues with a uniform start."""
    if num_res <= crop_size:
        return slice(0, num_res)
    start = int(rng.integers(0, num_res - crop_size + 1))
    return slice(start, start + crop_size)


def spatial_crop(ca_positions: np.ndarray, ca_mask: np.ndarray, crop_size: int,
                 rng: np.random.Generator) -> np.ndarray | None:
    """The ``crop_size`` residues whose CA is nearest to the CA of a random residue with an observed
    CA, as sorted indices (sequence order). Residues without a CA come last (ties: lower index).
    ``None`` when no CA is observed."""
    observed = np.flatnonzero(ca_mask)
    if observed.size == 0:
        return None
    centre = int(observed[rng.integers(0, observed.size)])
    d2 = np.sum((ca_positions.astype(np.float64) - ca_positions[centre].astype(np.float64)) ** 2, axis=-1)
    d2 = np.where(ca_mask, d2, np.inf)
    nearest = np.argsort(d2, kind="stable")[:crop_size]
    return np.sort(nearest)


def select_residues(record: Mapping[str, np.ndarray], cfg: DataConfig, rng: np.random.Generator,
                    train: bool) -> slice | np.ndarray:
    num_res = int(np.shape(record["aatype"])[0])
    if not train or num_res <= cfg.crop_size:
        return slice(0, num_res)
    if cfg.spatial_crop_prob > 0 and rng.random() < cfg.spatial_crop_prob and "all_atom_positions" in record:
        pos = np.asarray(record["all_atom_positions"])[:, _CA]
        mask = np.asarray(record["all_atom_mask"])[:, _CA] > 0 if "all_atom_mask" in record else np.ones(num_res, bool)
        sel = spatial_crop(pos, mask, cfg.crop_size, rng)
        if sel is not None:
            return sel
    return contiguous_crop(num_res, cfg.crop_size, rng)


def _n_selected(sel: slice | np.ndarray) -> int:
    return sel.stop - sel.start if isinstance(sel, slice) else int(sel.shape[0])


# --------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------


def select_templates(num_templates: int, cfg: DataConfig, rng: np.random.Generator, train: bool) -> np.ndarray:
    """Indices of the templates to keep (OpenFold ``random_crop_to_size`` template subsampling)."""
    if train and cfg.subsample_templates and num_templates > 0:
        perm = rng.permutation(num_templates)
        start = int(rng.integers(0, num_templates + 1))
        return perm[start:start + cfg.max_templates]
    return np.arange(min(num_templates, cfg.max_templates))


# --------------------------------------------------------------------------------------------------
# Padding helpers
# --------------------------------------------------------------------------------------------------


def _crop_pad(arr: np.ndarray, res_axis: int, sel: slice | np.ndarray, padded_len: int,
              dtype, lead_sel: np.ndarray | None = None, lead_len: int | None = None) -> np.ndarray:
    """Crop ``arr`` along ``res_axis`` with ``sel`` (and its leading axis with ``lead_sel``), then
    zero-pad the residue axis to ``padded_len`` (and the leading axis to ``lead_len``)."""
    a = arr
    if lead_sel is not None:
        a = a[lead_sel]
    a = a[(slice(None),) * res_axis + (sel,)]
    shape = list(a.shape)
    shape[res_axis] = padded_len
    if lead_len is not None:
        shape[0] = lead_len
    out = np.zeros(shape, dtype=dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def _per_row_outputs(n_copies: int, n_clust: int, n_extra: int, padded_len: int) -> dict[str, np.ndarray]:
    shapes = {
        "msa": ((n_copies, n_clust, padded_len), np.int8),
        "true_msa": ((n_copies, n_clust, padded_len), np.int8),
        "bert_mask": ((n_copies, n_clust, padded_len), np.float32),
        "msa_mask": ((n_copies, n_clust, padded_len), np.float32),
        "msa_has_deletion": ((n_copies, n_clust, padded_len), np.float32),
        "msa_deletion_value": ((n_copies, n_clust, padded_len), np.float32),
        "cluster_profile": ((n_copies, n_clust, padded_len, NUM_MSA_CLASSES), np.float32),
        "cluster_deletion_mean": ((n_copies, n_clust, padded_len), np.float32),
        "extra_msa": ((n_copies, n_extra, padded_len), np.int8),
        "extra_msa_mask": ((n_copies, n_extra, padded_len), np.float32),
        "extra_has_deletion": ((n_copies, n_extra, padded_len), np.float32),
        "extra_deletion_value": ((n_copies, n_extra, padded_len), np.float32),
    }
    return {k: np.empty(s, dtype=d) for k, (s, d) in shapes.items()}


def _zero_padding(arr: np.ndarray, r: int, n_rows: int, n_res: int) -> None:
    """Zero everything of copy ``r`` outside ``[:n_rows, :n_res]``."""
    arr[r, n_rows:] = 0
    if n_res < arr.shape[2]:
        arr[r, :n_rows, n_res:] = 0


def _scalar(value, default: float = 0.0) -> float:
    if value is None:
        return default
    v = float(np.asarray(value).reshape(-1)[0]) if np.size(value) else default
    return default if math.isnan(v) else v


# --------------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------------


def make_af2_batch(record: Mapping[str, np.ndarray], cfg: DataConfig, rng: np.random.Generator, *,
                   train: bool = True, timer: dict | None = None) -> dict[str, np.ndarray]:
    """One chain record (schema in docs/design.md) -> a fixed-shape AF2 training batch.

    Args:
      record: arrays of one chain (may be read-only memmaps; never written) plus an optional scalar
        ``resolution`` (NaN/None -> 0.0).
      cfg: shapes and sampling knobs.
      rng: the only source of randomness.
      train: False for evaluation (no crop, no block deletion, first templates).
      timer: optional dict; per-stage wall seconds are accumulated into it (benchmarking).

    Returns a dict of numpy arrays; with R = ``cfg.num_recycle_copies``, N_c = ``max_msa_clusters``,
    N_e = ``max_extra_msa``, T = ``max_templates`` and Lc = ``crop_size`` (or the full length when
    ``train=False`` and the chain is longer than the crop):

      aatype int8 [Lc], residue_index int32 [Lc], seq_mask f32 [Lc], seq_length int32 [],
      resolution f32 [];
      msa, true_msa int8 [R, N_c, Lc]; bert_mask, msa_mask, msa_has_deletion, msa_deletion_value,
      cluster_deletion_mean f32 [R, N_c, Lc]; cluster_profile f32 [R, N_c, Lc, 23];
      extra_msa int8 [R, N_e, Lc]; extra_msa_mask, extra_has_deletion, extra_deletion_value
      f32 [R, N_e, Lc];
      template_aatype int8 [T, Lc], template_all_atom_positions f32 [T, Lc, 37, 3],
      template_all_atom_mask f32 [T, Lc, 37], template_mask f32 [T], template_sum_probs f32 [T];
      use_clamped_fape f32 [] (1 = clamp the backbone FAPE of this sample);
      all_atom_positions f32 [Lc, 37, 3], all_atom_mask f32 [Lc, 37], and every other residue-axis
      array of the record (ground-truth targets) cropped and padded on axis 0 with its own dtype,
      except 0/1 uint8/bool masks and flags, which become float32.

    Other ``msa*`` / ``deletion_matrix*`` arrays, template arrays with fewer than 2 dims (besides
    ``template_sum_probs``), non-numeric arrays and scalars other than ``resolution`` are ignored.
    """
    t_start = time.perf_counter()
    stages: dict | None = {} if timer is not None else None

    aatype = np.asarray(record["aatype"])
    num_res_full = int(aatype.shape[0])
    if num_res_full == 0:
        raise ValueError("make_af2_batch: empty chain (L = 0)")
    sel = select_residues(record, cfg, rng, train)
    n_res = _n_selected(sel)
    padded = max(cfg.crop_size, n_res)

    out: dict[str, np.ndarray] = {}
    # ---- per-residue arrays (sequence features and ground-truth targets) ----
    for key, value in record.items():
        if key == "resolution" or _is_msa_key(key) or key.startswith("template_"):
            continue
        if not isinstance(value, np.ndarray) or value.ndim == 0 or value.dtype.kind not in "biuf":
            continue
        if value.shape[0] != num_res_full:
            raise ValueError(f"make_af2_batch: {key} has {value.shape[0]} residues, aatype has {num_res_full}")
        as_f32 = value.dtype in (np.uint8, np.bool_) or key in ("all_atom_positions", "all_atom_mask")
        dtype = np.float32 if as_f32 else value.dtype
        out[key] = _crop_pad(value, 0, sel, padded, dtype)
    out["aatype"] = out["aatype"].astype(np.int8, copy=False)
    if "residue_index" in out:
        out["residue_index"] = out["residue_index"].astype(np.int32, copy=False)
    else:
        idx = np.arange(num_res_full, dtype=np.int32)[sel]
        out["residue_index"] = np.zeros(padded, np.int32)
        out["residue_index"][:n_res] = idx
    seq_mask = np.zeros(padded, np.float32)
    seq_mask[:n_res] = 1.0
    out["seq_mask"] = seq_mask
    out["seq_length"] = np.array(n_res, dtype=np.int32)
    out["resolution"] = np.array(_scalar(record.get("resolution")), dtype=np.float32)
    if stages is not None:
        stages["crop_targets"] = time.perf_counter() - t_start

    # ---- templates ----
    t0 = time.perf_counter()
    n_templ_max = cfg.max_templates
    if "template_aatype" in record:
        num_templates = int(np.shape(record["template_aatype"])[0])
    else:
        num_templates = 0
    tsel = select_templates(num_templates, cfg, rng, train)
    n_templ = int(tsel.shape[0])
    for key, value in record.items():
        if not key.startswith("template_") or key == "template_sum_probs" or not isinstance(value, np.ndarray):
            continue
        if value.ndim < 2 or value.dtype.kind not in "biuf":
            continue  # per-template metadata (names, ...) is not a model input
        dtype = np.float32 if (key in _TEMPLATE_FLOAT_MASKS or value.dtype in (np.uint8, np.bool_)) else value.dtype
        if key == "template_aatype":
            dtype = np.int8
        out[key] = _crop_pad(value, 1, sel, padded, dtype, lead_sel=tsel, lead_len=n_templ_max)
    if "template_aatype" not in out:  # a record without template arrays
        out["template_aatype"] = np.zeros((n_templ_max, padded), np.int8)
        out["template_all_atom_positions"] = np.zeros((n_templ_max, padded, rc.atom_type_num, 3), np.float32)
        out["template_all_atom_mask"] = np.zeros((n_templ_max, padded, rc.atom_type_num), np.float32)
    sum_probs = np.zeros(n_templ_max, np.float32)
    if "template_sum_probs" in record and n_templ:
        sum_probs[:n_templ] = np.asarray(record["template_sum_probs"]).reshape(-1)[tsel]
    out["template_sum_probs"] = sum_probs
    template_mask = np.zeros(n_templ_max, np.float32)
    template_mask[:n_templ] = 1.0
    out["template_mask"] = template_mask
    if stages is not None:
        stages["templates"] = time.perf_counter() - t0

    # ---- MSA, one independent sample per recycling copy ----
    t0 = time.perf_counter()
    msa = record["msa"]
    deletion_matrix = record["deletion_matrix"]
    if msa.ndim != 2 or msa.shape[1] != num_res_full or deletion_matrix.shape != msa.shape or msa.shape[0] < 1:
        raise ValueError(f"make_af2_batch: msa {msa.shape} / deletion_matrix {deletion_matrix.shape} do not "
                         f"match L = {num_res_full}")
    query = np.ascontiguousarray(np.asarray(msa[0])[sel], dtype=np.int8)
    n_copies = cfg.num_recycle_copies
    per_row = _per_row_outputs(n_copies, cfg.max_msa_clusters, cfg.max_extra_msa, padded)
    if stages is not None:
        stages["msa_alloc"] = time.perf_counter() - t0
    for r in range(n_copies):
        n_c, n_e = sample_msa_copy(msa, deletion_matrix, sel, query, cfg, rng, per_row, r,
                                   block_delete=train and cfg.block_delete_msa, timer=stages)
        t0 = time.perf_counter()
        for key, arr in per_row.items():
            _zero_padding(arr, r, n_e if key.startswith("extra_") else n_c, n_res)
        if stages is not None:
            stages["msa_padding"] = stages.get("msa_padding", 0.0) + time.perf_counter() - t0
    out.update(per_row)
    # AF2 Suppl. 1.11.5: backbone FAPE is clamped for 90% of training samples (drawn last so the
    # earlier stages see the same random stream whatever this probability is)
    clamp = rng.random() < cfg.clamped_fape_prob if train else True
    out["use_clamped_fape"] = np.array(1.0 if clamp else 0.0, dtype=np.float32)
    if timer is not None:
        for k, v in stages.items():
            timer[k] = timer.get(k, 0.0) + v
        timer["total"] = timer.get("total", 0.0) + time.perf_counter() - t_start
    return out
