"""Data parallelism around the model: torchrun detection, DDP wrapping, the rank-sharded sampler.

The same ``foldforge train`` command runs as one process or as N under ``torchrun`` (which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``). With N > 1 the process group is
NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``) and gloo on CPU. The model is wrapped in DDP
here and nowhere else: model code knows nothing of parallelism.

Data: every rank draws the same global key sequence from (seed, epoch) and takes its strided share
(``WeightedChainSampler(rank, world_size)``), so a step on N ranks with batch b each sees exactly the
samples a 1-process step with batch N*b sees, without communication. Only rank 0 logs and writes
checkpoints; all ranks take identical decisions (skip, stop) from all-reduced values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from foldforge.data.dataset import SampleKey, WeightedChainSampler


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Read the torchrun environment; with WORLD_SIZE > 1 initialise the process group."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, device)


def shutdown(env: DistEnv, *, ok: bool) -> None:
    """Tear the process group down. After a clean run the ranks meet at a barrier first (so rank 0's
    last checkpoint and report are written before any rank exits); after an error they do not wait for
    each other (a barrier could hang on a rank that is already gone)."""
    if env.distributed and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP over the trainable parameters. Heads with loss weight 0 are frozen before this
    (``optim.freeze_zero_weight_heads``), so every parameter DDP sees gets a gradient every step and
    ``find_unused_parameters`` (an extra graph traversal per step) is not needed."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value of a small picklable object, on every rank (used for the default run dir)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over ranks of a small tensor of per-rank scalars (losses for logging and the skip test)."""
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= env.world_size
    return values


def broadcast_(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.broadcast(values, src=0)
    return values


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


class ShardedKeySampler(torch.utils.data.Sampler):
    """The rank's share of the weighted draw over the training chains, resumable mid-epoch.

    Wraps :class:`WeightedChainSampler` built over the training subset (its key ``index`` is a position
    in ``indices``) and maps keys to cache record indices. ``epoch_samples`` (the global number of draws
    per epoch) is a multiple of the global batch, so every rank has the same number of batches.
    :meth:`set_position` starts the next iteration at ``index`` of the rank's key list: the data
    position stored in a checkpoint.
    """

    def __init__(self, indices: Sequence[int], weights: np.ndarray, *, epoch_samples: int, seed: int,
                 env: DistEnv):
        if epoch_samples % env.world_size:
            raise ValueError(f"epoch_samples {epoch_samples} is not a multiple of world size {env.world_size}")
        self.indices = list(indices)
        self.inner = WeightedChainSampler(weights, num_samples=epoch_samples, seed=seed, rank=env.rank,
                                          world_size=env.world_size)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, index: int) -> None:
        self.epoch, self.start = epoch, index

    def keys(self, epoch: int) -> list[SampleKey]:
        return [SampleKey(self.indices[k.index], k.epoch, k.draw) for k in self.inner.keys(epoch)]

    def __iter__(self) -> Iterator[SampleKey]:
        return iter(self.keys(self.epoch)[self.start:])

    def __len__(self) -> int:
        return len(self.inner) - self.start


def epoch_samples(num_train: int, global_batch: int) -> int:
    """Draws per epoch: about one pass over the training chains, rounded up to whole global batches
    (independent of how the global batch is split over ranks, so 1 and N processes draw the same keys)."""
    steps = max(1, -(-num_train // global_batch))
    return steps * global_batch
