"""Data order: shuffled, sharded, resumable sampling that depends only on (seed, epoch, rank, world size)."""
from __future__ import annotations

import torch

from rtda.utils.seed import epoch_seed


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled indices from a generator seeded by (seed, epoch), sharded by rank, able to skip a prefix.

    The order depends only on (seed, epoch, rank, world size), never on the global RNG or the number of
    workers, so a resumed run can skip exactly the samples its previous life consumed. Each rank gets
    `len(dataset) // world_size` indices (the tail is dropped, so every rank takes the same number of steps).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start `epoch`, leaving out this rank's first `skip` indices (already consumed before a resume)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.size // self.world_size - self.skip

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        per_rank = self.size // self.world_size
        mine = order[self.rank : per_rank * self.world_size : self.world_size]
        return iter(mine[self.skip :].tolist())


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation order: rank r takes indices r, r + world_size, ...; every sample is scored exactly once."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
