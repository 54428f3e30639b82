"""Dataset, sampler and loader over a prepared cache (AF2 Suppl. 1.2.5 sampling weights).

Randomness is explicit: a sample is addressed by a :class:`SampleKey` (record index, epoch, draw number)
and its generator is ``np.random.default_rng([seed, epoch, index, draw])``, so a batch is reproducible from
the key alone, in any worker, after a restart. The sampler is the only place that decides *which* keys
come next; a later priority loader can replace the DataLoader without touching either.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from foldforge.config import DataConfig
from foldforge.data.batch import AF2Batch, collate
from foldforge.data.cache import FeatureCache
from foldforge.data.transforms import make_af2_batch


class SampleKey(NamedTuple):
    index: int      # record index in the cache manifest
    epoch: int = 0
    draw: int = 0   # position in the epoch's draw: repeated draws of one record differ


def record_inputs(record) -> dict[str, np.ndarray]:
    """Record arrays plus the scalar features the transforms need."""
    arrays = dict(record.arrays)
    res = record.meta.get("resolution")
    arrays["resolution"] = np.float32(np.nan if res is None else res)
    return arrays


class AF2Dataset(torch.utils.data.Dataset):
    """Cached chain records -> fixed-shape :class:`AF2Batch` for one preset's :class:`DataConfig`."""

    def __init__(self, cache: FeatureCache | str | Path, cfg: DataConfig, *, seed: int = 0, train: bool = True,
                 verify: str = "once"):
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache, verify=verify)
        self.cfg = cfg
        self.seed = seed
        self.train = train

    def __len__(self) -> int:
        return len(self.cache)

    def rng(self, key: SampleKey) -> np.random.Generator:
        return np.random.default_rng([self.seed, key.epoch, key.index, key.draw])

    def __getitem__(self, key: int | SampleKey) -> AF2Batch:
        key = SampleKey(int(key)) if not isinstance(key, tuple) else SampleKey(*key)
        record = self.cache.load(key.index)
        feats = make_af2_batch(record_inputs(record), self.cfg, self.rng(key), train=self.train)
        return AF2Batch.from_numpy(feats)


def sampling_weights(entries: list[dict], cfg: DataConfig) -> np.ndarray:
    """AF2 Suppl. 1.2.5: max(min(L, 512), 256) / 512, divided by the size of the chain's cluster.

    Chains without a cluster id count as clusters of one.
    """
    lengths = np.array([e["length"] for e in entries], dtype=np.float64)
    length_w = np.clip(lengths, cfg.weight_length_min, cfg.weight_length_max) / cfg.weight_length_max
    sizes = Counter(e.get("cluster_id") for e in entries if e.get("cluster_id") is not None)
    cluster = np.array([sizes[e["cluster_id"]] if e.get("cluster_id") is not None else 1 for e in entries],
                       dtype=np.float64)
    return length_w / cluster


class WeightedChainSampler(torch.utils.data.Sampler):
    """Draws ``num_samples`` keys per epoch with replacement, weighted as AF2 samples training chains.

    With ``world_size`` > 1 every rank draws the same global sequence from (seed, epoch) and takes its
    strided share, so ranks never need to communicate about data.
    """

    def __init__(self, weights: np.ndarray, *, num_samples: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if len(weights) == 0:
            raise ValueError("cannot sample from an empty cache")
        self.p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.num_samples = num_samples
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def keys(self, epoch: int) -> list[SampleKey]:
        rng = np.random.default_rng([self.seed, epoch, 0x5A3])
        idx = rng.choice(len(self.p), size=self.num_samples, replace=True, p=self.p)
        keys = [SampleKey(int(i), epoch, d) for d, i in enumerate(idx)]
        return keys[self.rank::self.world_size]

    def __iter__(self) -> Iterator[SampleKey]:
        return iter(self.keys(self.epoch))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # featurisation is single-threaded numpy; threads only contend


def make_loader(dataset: AF2Dataset, sampler: torch.utils.data.Sampler, *, batch_size: int = 1,
                num_workers: int = 2, pin_memory: bool | None = None, prefetch_factor: int = 4
                ) -> torch.utils.data.DataLoader:
    """A standard DataLoader over keys from ``sampler``; batches are :class:`AF2Batch` with a batch dim."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=pin, worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=prefetch_factor if num_workers else None, persistent_workers=num_workers > 0)
