"""Per-recycle MSA sampling for AF2 training (AF2 Suppl. 1.2.6-1.2.7, Alg. 1).

The steps follow OpenFold ``data/data_transforms.py`` (``block_delete_msa``, ``sample_msa``,
``make_masked_msa``, ``nearest_neighbor_clusters``, ``summarize_clusters``, ``crop_extra_msa``,
``make_msa_feat``), re-written on int8 numpy arrays; every random draw comes from the caller's
``numpy.random.Generator``. :func:`sample_msa_copy` runs one recycling copy and writes the real
(unpadded) region of its features straight into the caller's output arrays.

Deviations from OpenFold, all deliberate:

* Clustering profile: the cluster profile and deletion mean are summarised over the cluster centres
  plus the ``N_extra`` rows actually fed to the extra-MSA stack, not over *all* non-centre rows.
  OpenFold clusters every remaining row and only then crops the extra MSA; here the extra MSA is
  cropped first so that the per-sample cost is bounded by ``N_extra`` for arbitrarily deep MSAs.
* Masked-MSA "profile" replacement samples the residue of a uniformly random row of the (cropped)
  full MSA at that column. That is exactly a draw from OpenFold's ``hhblits_profile`` (the
  column-wise mean of the 22-class one-hot over all rows), without building the profile.
  Likewise the 23-way categorical is drawn as its mixture components (mask token / same /
  uniform / profile) with one uniform number per masked position; the distribution is identical.
* Crop of the extra MSA: the rows after the cluster centres are already in random order, so the
  first ``N_extra`` of them are a uniformly random subset (OpenFold draws a second permutation).
"""
from __future__ import annotations

import math
import threading
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from foldforge.config import DataConfig
from foldforge.data import residue_constants as rc

NUM_MSA_CLASSES = 23  # 20 amino acids, X, gap, mask token
_AGREE_CLASSES = 21   # classes that carry weight in the nearest-neighbour agreement (gap/mask do not)
_ONE = torch.ones(1, dtype=torch.float32)

# 2/pi * arctan(d / 3) for every uint16 deletion count (AF2 Suppl. 1.2.9 deletion_value).
DELETION_VALUE_LUT = (np.arctan(np.arange(65536, dtype=np.float64) / 3.0) * (2.0 / np.pi)).astype(np.float32)


def deletion_value(d: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """2/pi * arctan(d / 3) of a uint16 deletion array (float32; table lookup at the nonzero entries,
    which are a few percent of a real MSA)."""
    d = np.asarray(d)
    if d.dtype != np.uint16:
        d = np.clip(d, 0, 65535).astype(np.uint16)
    if out is None:
        out = np.empty(d.shape, np.float32)
    out[...] = 0.0
    nz = np.flatnonzero(d > 0)
    if nz.size:
        if out.flags.c_contiguous and d.flags.c_contiguous:
            out.reshape(-1)[nz] = DELETION_VALUE_LUT[d.reshape(-1)[nz]]
        else:
            out[...] = DELETION_VALUE_LUT[d]
    return out


# --------------------------------------------------------------------------------------------------
# Row sampling
# --------------------------------------------------------------------------------------------------


def block_delete_rows(num_seq: int, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """AF2 Suppl. Alg. 1 (MSABlockDeletion): sorted indices of the kept rows; row 0 is always kept.

    ``num_blocks`` blocks of ``floor(num_seq * msa_fraction_per_block)`` consecutive rows, each
    starting at a uniform row in [1, num_seq), are deleted (blocks are clipped at the end).
    """
    keep = np.ones(num_seq, dtype=bool)
    block = int(math.floor(num_seq * cfg.msa_fraction_per_block))
    if num_seq > 1 and block > 0 and cfg.num_blocks > 0:
        starts = rng.integers(1, num_seq, size=cfg.num_blocks)
        for s in starts.tolist():
            keep[s:s + block] = False
    keep[0] = True
    return np.flatnonzero(keep)


def sample_rows(rows: np.ndarray, max_clusters: int, max_extra: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """OpenFold ``sample_msa`` + ``crop_extra_msa``: row 0 first, the rest shuffled; the first
    ``max_clusters`` are the cluster centres, the next ``max_extra`` the extra-MSA rows."""
    rest = rows[1:]
    order = rest[rng.permutation(rest.shape[0])]
    n_clust = min(max_clusters, rows.shape[0])
    centres = np.concatenate([rows[:1], order[:n_clust - 1]]) if n_clust > 0 else rows[:0]
    extras = order[max(n_clust - 1, 0): max(n_clust - 1, 0) + max_extra]
    return centres, extras


# --------------------------------------------------------------------------------------------------
# Masked MSA (BERT corruption)
# --------------------------------------------------------------------------------------------------


def mask_msa(true_msa: np.ndarray, profile_column: Callable[[np.ndarray, np.random.Generator], np.ndarray],
             cfg: DataConfig,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """AF2 Suppl. 1.2.7 / OpenFold ``make_masked_msa`` on the cluster centres.

    Each position is selected with probability ``masked_msa_replace_fraction``; a selected position
    becomes a uniform amino acid (``uniform_prob``), a draw from the column profile
    (``profile_prob``), stays unchanged (``same_prob``) or becomes the mask token 22 (the rest).

    Args:
      true_msa: int8 [N, L] centres.
      profile_column: ``f(cols: int64 [M], rng) -> int8 [M]``, one draw from the MSA profile of
        each column (see :func:`sample_msa_copy`).
    Returns:
      (masked msa int8 [N, L], bert_mask bool [N, L]).
    """
    p_uni, p_prof, p_same = cfg.masked_msa_uniform_prob, cfg.masked_msa_profile_prob, cfg.masked_msa_same_prob
    if p_uni + p_prof + p_same > 1.0 + 1e-9:
        raise ValueError("masked-MSA uniform + profile + same probabilities exceed 1")
    bert = rng.random(true_msa.shape, dtype=np.float32) < cfg.masked_msa_replace_fraction
    masked = true_msa.copy()
    pos = np.flatnonzero(bert)
    if pos.size:
        u = rng.random(pos.size)
        new = np.full(pos.size, rc.MASK_ID, dtype=np.int8)
        is_uni = u < p_uni
        is_prof = (u >= p_uni) & (u < p_uni + p_prof)
        is_same = (u >= p_uni + p_prof) & (u < p_uni + p_prof + p_same)
        n_uni = int(is_uni.sum())
        if n_uni:
            new[is_uni] = rng.integers(0, rc.restype_num, size=n_uni)
        if is_prof.any():
            cols = pos[is_prof] % true_msa.shape[1]
            new[is_prof] = profile_column(cols, rng)
        new[is_same] = true_msa.reshape(-1)[pos[is_same]]
        masked.reshape(-1)[pos] = new
    return masked, bert


# --------------------------------------------------------------------------------------------------
# Nearest-neighbour agreement (the hot spot)
# --------------------------------------------------------------------------------------------------


def _agreement_reference(centres: np.ndarray, extras: np.ndarray) -> np.ndarray:
    """OpenFold ``nearest_neighbor_clusters`` agreement, written out: int64 [N_extra, N_clust].

    ``agreement[e, c] = sum_j sum_k onehot(extras[e, j])_k * onehot(centres[c, j])_k * w_k`` with
    ``w_k = 1`` for the 21 residue classes (20 amino acids + X) and 0 for gap and mask token.
    """
    w = np.zeros(NUM_MSA_CLASSES, dtype=np.int64)
    w[:_AGREE_CLASSES] = 1
    x1 = np.eye(NUM_MSA_CLASSES, dtype=np.int64)[extras.astype(np.int64)]   # [E, L, 23]
    c1 = np.eye(NUM_MSA_CLASSES, dtype=np.int64)[centres.astype(np.int64)]  # [C, L, 23]
    e, l_ = extras.shape
    c = centres.shape[0]
    return x1.reshape(e, l_ * NUM_MSA_CLASSES) @ (c1 * w).reshape(c, l_ * NUM_MSA_CLASSES).T


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


_HAS_INT_MM = hasattr(torch, "_int_mm")


def _int8_matmul(a: np.ndarray, b_t: np.ndarray) -> np.ndarray:
    """Exact int32 ``a @ b_t.T`` for 0/1 int8 matrices a [M, K], b_t [N, K] (M > 16; K, N % 8 == 0)."""
    if _HAS_INT_MM:
        try:
            return torch._int_mm(torch.from_numpy(a), torch.from_numpy(b_t).T).numpy()
        except RuntimeError:  # pragma: no cover - builds without the CPU int8 kernel
            pass
    return (a.astype(np.float32) @ b_t.astype(np.float32).T).astype(np.int32)  # pragma: no cover


def column_class_keys(rows: np.ndarray) -> np.ndarray:
    """int32 ``j * 23 + rows[:, j]``: the (column, class) id of every entry of an int8 [N, L] MSA."""
    return np.arange(rows.shape[1], dtype=np.int32) * NUM_MSA_CLASSES + rows


def cluster_agreement(centres: np.ndarray, extras: np.ndarray, query: np.ndarray, *,
                      extra_keys: np.ndarray | None = None) -> np.ndarray:
    """Exact agreement counts, equal to :func:`_agreement_reference`: int32 [N_extra, N_clust].

    The count product ``[E, L*21] x [L*21, C]`` is split by class:

    * the class of the query at each column (the most frequent one in a real MSA, ~40% of the
      extra rows' entries) as an int8 0/1 matrix product ``[E, L] x [L, C]`` (``torch._int_mm``,
      exact int32, VNNI on x86);
    * every other residue entry of the extra rows (gaps skipped) as a sparse lookup: a
      ``[L*23, C]`` float16 table holds, for each (column, class), the indicator of the centres
      with that class there, and ``F.embedding_bag(mode="sum")`` adds up one table row per
      (extra row, column) entry. Sums are integers <= L, exact in float16 up to 2048 (float32 is
      used for longer crops).

    ``query`` only chooses the split; the result does not depend on it. ``extra_keys`` may pass
    :func:`column_class_keys` of ``extras`` when the caller has it already.
    """
    centres = np.asarray(centres, dtype=np.int8)
    extras = np.asarray(extras, dtype=np.int8)
    query = np.asarray(query, dtype=np.int8)
    n_c, n_res = centres.shape
    n_e = extras.shape[0]
    if n_e == 0 or n_c == 0 or n_res == 0:
        return np.zeros((n_e, n_c), dtype=np.int32)
    ncp, lp, mp = _round8(n_c), _round8(n_res), max(n_e, 17)

    centre_ok = centres < _AGREE_CLASSES
    # (1) query class: int8 matmul
    xq = np.zeros((mp, lp), dtype=np.int8)
    np.equal(extras, query, out=xq[:n_e, :n_res].view(np.bool_))
    cq = np.zeros((ncp, lp), dtype=np.int8)
    np.logical_and(centres == query, centre_ok, out=cq[:n_c, :n_res].view(np.bool_))
    agree = torch.from_numpy(_int8_matmul(xq, cq))[:n_e, :n_c]

    # (2) every other residue class: embedding-bag over a (column, class) -> centres table
    rest = (extras != query) & (extras < _AGREE_CLASSES)
    base = np.arange(n_res, dtype=np.int32) * NUM_MSA_CLASSES
    if extra_keys is None:
        extra_keys = base + extras
    keys = np.compress(rest.reshape(-1), extra_keys.reshape(-1))  # int32 table rows, by extra row
    if keys.size:
        n_rows = n_res * NUM_MSA_CLASSES
        half = n_res <= 2048
        table = _zeroed_scratch((n_rows + 1) * ncp, np.float16 if half else np.float32)
        one = _FP16_ONE_BITS if half else _FP32_ONE_BITS
        # column-major order (j outer, centre inner) keeps the scattered writes local
        cent_t = np.ascontiguousarray(centres.T)
        flat = (base[:, None] + cent_t).astype(np.int64) * ncp + np.arange(n_c)
        flat[~((cent_t < _AGREE_CLASSES) & (cent_t != query[:, None]))] = n_rows * ncp  # sink row
        bits = torch.from_numpy(table.view(np.int16 if half else np.int32))
        try:
            bits.index_fill_(0, torch.from_numpy(flat.reshape(-1)), one)  # integer view: fast scatter
            offsets = np.zeros(n_e, dtype=np.int32)
            np.cumsum(rest.view(np.uint8).sum(axis=1, dtype=np.int32)[:-1], out=offsets[1:])
            bag = F.embedding_bag(torch.from_numpy(keys), torch.from_numpy(table.reshape(n_rows + 1, ncp)),
                                  torch.from_numpy(offsets), mode="sum")
            agree = agree.float().add_(bag[:, :n_c].float())
        finally:
            table.fill(0)  # hand the scratch table back zeroed (a warm memset beats a scatter)
    return agree.to(torch.int32).numpy()


_FP16_ONE_BITS = int(np.float16(1.0).view(np.int16))
_FP32_ONE_BITS = int(np.float32(1.0).view(np.int32))
_SCRATCH = threading.local()


def _zeroed_scratch(size: int, dtype) -> np.ndarray:
    """A zero-filled 1-D array reused across calls of this thread (saves a large memset and its
    page faults per call); the caller must zero again whatever it writes."""
    cache = getattr(_SCRATCH, "arrays", None)
    if cache is None:
        cache = _SCRATCH.arrays = {}
    key = (size, np.dtype(dtype).str)
    arr = cache.get(key)
    if arr is None:
        if len(cache) >= 4:
            cache.clear()
        arr = cache[key] = np.zeros(size, dtype=dtype)
    return arr


def assign_clusters(centres: np.ndarray, extras: np.ndarray, query: np.ndarray, *,
                    extra_keys: np.ndarray | None = None) -> np.ndarray:
    """Index of the centre with maximal agreement for each extra row (first on ties), int64 [E]."""
    if extras.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmax(cluster_agreement(centres, extras, query, extra_keys=extra_keys), axis=1)


# --------------------------------------------------------------------------------------------------
# Cluster summaries
# --------------------------------------------------------------------------------------------------


def summarize_clusters(centres: np.ndarray, centre_del: np.ndarray, extras: np.ndarray,
                       extra_del: np.ndarray, assignment: np.ndarray,
                       profile_out: np.ndarray, deletion_mean_out: np.ndarray, *,
                       extra_keys: np.ndarray | None = None) -> None:
    """OpenFold ``summarize_clusters`` (+ ``make_msa_feat``'s arctan) into the given outputs.

    ``profile_out`` float32 [C, L, 23] receives the normalised class counts of each centre
    (its bert-masked row, as in OpenFold) plus its assigned extra rows; ``deletion_mean_out``
    float32 [C, L] receives ``2/pi * arctan(mean deletions / 3)`` over the same rows.
    All MSA masks are 1 inside the real region, so the denominator is ``1 + cluster size``.
    """
    n_c, n_res = centres.shape
    n_e = extras.shape[0]
    size = np.bincount(assignment, minlength=n_c)[:n_c]
    inv = (1.0 / (1.0 + size)).astype(np.float32)

    # class counts over (cluster, column, class) keys of the extra rows and the centres
    stride = n_res * NUM_MSA_CLASSES
    base = np.arange(n_res, dtype=np.int32) * NUM_MSA_CLASSES
    keys = np.empty((n_e + n_c, n_res), dtype=np.int32)
    np.add((assignment.astype(np.int32) * stride)[:, None], base + extras if extra_keys is None else extra_keys,
           out=keys[:n_e])
    np.add((np.arange(n_c, dtype=np.int32) * stride)[:, None], base + centres, out=keys[n_e:])
    prof = profile_out if profile_out.flags.c_contiguous else np.empty(profile_out.shape, np.float32)
    flat = torch.from_numpy(prof).view(-1)
    flat.zero_()
    # integer counts accumulated in float32 (exact), then scaled in place: no large temporaries
    flat.index_add_(0, torch.from_numpy(keys.reshape(-1)), _ONE.expand(keys.size))
    np.multiply(prof, inv[:, None, None], out=prof)
    if prof is not profile_out:
        profile_out[...] = prof

    # deletion sums per cluster (row-wise index_add; float32 holds these integer sums exactly)
    del_sum = torch.from_numpy(centre_del.astype(np.float32))
    if n_e:
        del_sum.index_add_(0, torch.from_numpy(assignment), torch.from_numpy(extra_del.astype(np.float32)))
    mean = del_sum.numpy() * inv[:, None]
    np.multiply(np.arctan(mean * np.float32(1.0 / 3.0)), np.float32(2.0 / np.pi), out=deletion_mean_out)


# --------------------------------------------------------------------------------------------------
# One recycling copy
# --------------------------------------------------------------------------------------------------


def sample_msa_copy(msa: np.ndarray, deletion_matrix: np.ndarray, cols, query: np.ndarray,
                    cfg: DataConfig, rng: np.random.Generator, out: dict[str, np.ndarray], r: int,
                    *, block_delete: bool, timer: dict | None = None) -> tuple[int, int]:
    """Sample one recycling copy and write its real region into ``out[key][r]``.

    Args:
      msa, deletion_matrix: the record's full [N, L_full] arrays (never written).
      cols: the residue crop, a slice or an int array of column indices into L_full.
      query: int8 [L] the cropped query (== ``msa[0, cols]``).
      out: preallocated padded outputs; only ``[r, :n, :L]`` of the per-row arrays is written
        (the caller zeroes the padding).
    Returns:
      (number of cluster centres, number of extra rows).
    """
    tick = _Ticker(timer)
    n_seq = msa.shape[0]
    n_res = query.shape[0]
    rows = block_delete_rows(n_seq, cfg, rng) if block_delete else np.arange(n_seq)
    centres_idx, extras_idx = sample_rows(rows, cfg.max_msa_clusters, cfg.max_extra_msa, rng)
    n_c, n_e = centres_idx.shape[0], extras_idx.shape[0]
    tick("msa_rows")
    true_c = _take(msa, centres_idx, cols)
    del_c = _take(deletion_matrix, centres_idx, cols)
    extras = _take(msa, extras_idx, cols)
    del_e = _take(deletion_matrix, extras_idx, cols)
    tick("msa_select")

    if isinstance(cols, slice):
        col_start = cols.start or 0

        def profile_column(c: np.ndarray, g: np.random.Generator) -> np.ndarray:
            return msa[g.integers(0, n_seq, size=c.shape[0]), c + col_start]
    else:
        def profile_column(c: np.ndarray, g: np.random.Generator) -> np.ndarray:
            return msa[g.integers(0, n_seq, size=c.shape[0]), cols[c]]

    masked, bert = mask_msa(true_c, profile_column, cfg, rng)
    tick("mask_msa")
    out["msa"][r, :n_c, :n_res] = masked
    out["true_msa"][r, :n_c, :n_res] = true_c
    out["bert_mask"][r, :n_c, :n_res] = bert
    out["msa_mask"][r, :n_c, :n_res] = 1.0
    np.greater(del_c, 0, out=out["msa_has_deletion"][r, :n_c, :n_res])
    deletion_value(del_c, out=out["msa_deletion_value"][r, :n_c, :n_res])
    tick("msa_features")

    extra_keys = column_class_keys(extras)
    assignment = assign_clusters(masked, extras, query, extra_keys=extra_keys)
    tick("agreement")
    summarize_clusters(masked, del_c, extras, del_e, assignment,
                       out["cluster_profile"][r, :n_c, :n_res], out["cluster_deletion_mean"][r, :n_c, :n_res],
                       extra_keys=extra_keys)
    tick("cluster_summary")

    if n_e:
        out["extra_msa"][r, :n_e, :n_res] = extras
        out["extra_msa_mask"][r, :n_e, :n_res] = 1.0
        np.greater(del_e, 0, out=out["extra_has_deletion"][r, :n_e, :n_res])
        deletion_value(del_e, out=out["extra_deletion_value"][r, :n_e, :n_res])
    tick("extra_features")
    return n_c, n_e


def _take(a: np.ndarray, rows: np.ndarray, cols) -> np.ndarray:
    """``a[rows][:, cols]`` as one contiguous array (cols: slice or index array)."""
    if isinstance(cols, slice):
        return a[rows, cols]
    return a[rows][:, cols]


class _Ticker:
    """Accumulates wall time per stage into ``timer`` (no-op when ``timer`` is None)."""

    def __init__(self, timer: dict | None):
        self.timer = timer
        if timer is not None:
            self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.timer is not None:
            t = time.perf_counter()
            self.timer[name] = self.timer.get(name, 0.0) + (t - self.t)
            self.t = t
