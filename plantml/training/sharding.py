"""Each rank's share of a split: disjoint for evaluation, padded for training, a new order each epoch.

Used by both data paths (:mod:`plantml.training.data`'s loaders through :class:`~plantml.training.distributed.Ranks`,
:mod:`plantml.training.device_data`'s batches on the GPU); a single process's share is the whole split.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler, Sampler


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: each rank a disjoint share, every index exactly once.

    For validation and test, where torch's DistributedSampler would pad the last shares
    with repeated indices and so count those images twice in a metric. Evaluation runs no
    collective per batch, so the shares may differ by one image.
    """

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def rank_share(order: torch.Tensor, rank: int, world_size: int, pad: bool) -> torch.Tensor:
    """This rank's part of ``order`` (every ``world_size``-th element from ``rank``), as the samplers above.

    ``pad`` first extends ``order`` with its own beginning to a multiple of ``world_size``,
    as DistributedSampler does for training.
    """
    if world_size == 1:
        return order
    if pad:
        total = -(-len(order) // world_size) * world_size
        order = order.repeat(-(-total // max(len(order), 1)))[:total]
    return order[rank::world_size]


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell the train loader's DistributedSampler the epoch, so each epoch has its own order."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
