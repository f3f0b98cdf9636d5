"""A batch order that is deterministic, resumable mid-epoch and split across ranks.

Epoch e visits the permutation seeded by (seed, e) in global batches of B; rank r of W takes slice r of each global
batch, so W processes see exactly what one process sees. Every sample carries (epoch, index) to the dataset, which
seeds its random augmentation from them: the images do not depend on workers, ranks or where a run was resumed.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from lpconvert.errors import LatePhaseError


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Global batches of one epoch, from batch `start` on, as lists of (epoch, index) for this rank."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise LatePhaseError(
                f"batch size {batch_size} cannot be split evenly across {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (the last incomplete one is dropped: members get equal minibatches)."""
        return self.num_samples // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self.batch_size // self.world_size
        for b in range(self.start, self.start + len(self)):
            first = b * self.batch_size + self.rank * per_rank
            yield [(self.epoch, i) for i in order[first : first + per_rank]]


class SeededSamples(Dataset):
    """Wraps a dataset so that sample (epoch, index) is read — and randomly augmented by the dataset's own transform
    — with torch's and Python's RNGs seeded from (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def sample_seed(self, epoch: int, index: int) -> int:
        """The seed of sample `index`'s augmentation in `epoch`."""
        return (self.seed * 1_000_003 + epoch) * 10_000_019 + index

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample_seed = self.sample_seed(epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(sample_seed)  # the CPU generator only: no CUDA seeding
            state = random.getstate()
            random.seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)
