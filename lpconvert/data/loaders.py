"""The loaders: training batches in a seeded, resumable order split across ranks; the validation set in file order;
the batches BatchNorm statistics are re-estimated on. In-memory datasets (:mod:`lpconvert.data.memory`) are fetched a
whole batch at a time in the loading process."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset

from lpconvert.data.memory import MemoryImages, MemorySamples, as_batch
from lpconvert.data.sampler import EpochBatchSampler, SeededSamples
from lpconvert.errors import LatePhaseError

__all__ = ["eval_loader", "recalibration_loader", "train_loader"]


def train_loader(samples: SeededSamples, batch_size: int, *, seed: int, workers: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """Global batches in a (seed, epoch)-determined order, split across ranks; its position is settable
    (``loader.batch_sampler.set_position(epoch, batch)``) for resuming."""
    if len(samples) < batch_size:
        raise LatePhaseError(
            f"the training set has {len(samples)} images, fewer than one batch of {batch_size}; lower --batch-size"
        )
    sampler = EpochBatchSampler(len(samples), batch_size, seed=seed, rank=rank, world_size=world_size)
    if isinstance(samples, MemorySamples):
        return DataLoader(samples, batch_sampler=sampler, collate_fn=as_batch, pin_memory=pin_memory)
    return DataLoader(samples, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0)


def eval_loader(dataset: Dataset, batch_size: int, *, workers: int, pin_memory: bool = False) -> DataLoader:
    """The validation set in file order."""
    if isinstance(dataset, MemoryImages):
        return DataLoader(dataset, batch_size=batch_size, collate_fn=as_batch, pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)


def recalibration_loader(samples: SeededSamples, batch_size: int, *, seed: int, workers: int = 0,
                         pin_memory: bool = False) -> DataLoader:
    """What BatchNorm statistics are re-estimated on — by the fine-tuner (``--bn-stats recalibrate``, SWA),
    ``lpconvert collapse`` and ``lpconvert evaluate`` alike: the training images with their training augmentation
    (statistics of un-augmented images cost the shared CIFAR-10 ResNet-20 3 points), whole batches of the run's size
    in epoch 0's order of its seed. Callers take the first ``--recalibrate-batches`` (default 100)."""
    return train_loader(samples, batch_size, seed=seed, workers=workers, pin_memory=pin_memory)
