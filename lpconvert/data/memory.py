"""Image datasets decoded once into memory and augmented batch-wise: a data path that keeps up with small models.

When the training augmentation is the CIFAR one (:func:`~lpconvert.data.transforms.build_transform` ``"cifar"``:
resize to the input size, RandomCrop with zero padding, horizontal flip) and the images fit a memory budget, the
training and validation sets (ImageFolders, Hugging Face splits) are decoded ONCE — through their own loader and
labels, and the deterministic head of their own transforms (resize; resize + center crop) — into uint8 tensors
(N, C, H, W). Batches are then cropped, flipped and normalised as whole tensors, with the very ``Normalize`` of the
per-sample transform: validation tensors equal the per-sample path's bit for bit. The loaders fetch such batches in
the training process itself (``--workers`` only parallelises the decode); every process of a torchrun job holds its
own copy of the images.

The seeded order contract of :mod:`lpconvert.data.sampler` holds: batches come from the same
:class:`~lpconvert.data.sampler.EpochBatchSampler`, and the crop offsets and flip of sample (epoch, index) are a
hash (SplitMix64) of its :meth:`~lpconvert.data.sampler.SeededSamples.sample_seed` — not draws from a stream — so
they depend neither on the batch the sample falls in, nor on the rank, nor on where a run was resumed. The random
numbers differ from the per-sample path's; their distribution (offsets uniform in 0..2·padding, flip with p) does not.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

from lpconvert.data.hfds import HubImages
from lpconvert.data.sampler import SeededSamples
from lpconvert.errors import LatePhaseError

__all__ = ["IN_MEMORY_MODES", "MEMORY_BUDGET", "BatchAugment", "MemoryImages", "MemorySamples", "as_batch",
           "memory_data"]

logger = logging.getLogger(__name__)

IN_MEMORY_MODES = ("auto", "on", "off")
MEMORY_BUDGET = 2 * 2**30  # bytes of decoded training + validation images up to which "auto" keeps them in memory

_DETERMINISTIC = (transforms.Resize, transforms.CenterCrop)  # PIL steps that are the same for every visit
# SplitMix64's first three states after a sample's seed: its crop row, crop column and flip draws
_STREAMS = tuple(np.uint64(j * 0x9E3779B97F4A7C15 % 2**64) for j in (1, 2, 3))


# ------------------------------------------------------------------------------------------------- the datasets


class MemoryImages(Dataset):
    """Decoded images as one uint8 tensor (N, C, H, W) with their labels; items and batches are normalised by the
    per-sample transform's own ``Normalize``. ``samples`` are the (file or row, label) pairs they were decoded from,
    as in the source dataset."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, normalize: transforms.Normalize,
                 samples: Sequence[tuple[str, int]] = ()) -> None:
        self.images, self.targets, self.normalize, self.samples = images, targets, normalize, list(samples)

    def __len__(self) -> int:
        return len(self.targets)

    def normalised(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images as ToTensor + Normalize make them: float32 in [0, 1], then (x − mean) / std."""
        return TF.normalize(images.float().div_(255), self.normalize.mean, self.normalize.std, inplace=True)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch (what a DataLoader with :func:`as_batch` as ``collate_fn`` yields)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.normalised(self.images[index]), self.targets[index]


@dataclass(frozen=True)
class BatchAugment:
    """RandomCrop to ``size`` (None: the images' own) after zero padding by ``padding``, then RandomHorizontalFlip
    with ``flip_p``, on uint8 batches; sample i's offsets and flip are a function of ``keys[i]`` alone."""

    size: tuple[int, int] | None
    padding: int
    flip_p: float

    def __call__(self, images: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
        batch, channels, height, width = images.shape
        (th, tw), padding = self.size or (height, width), self.padding
        dy_bits, dx_bits, flip_bits = (_splitmix64(keys + stream) for stream in _STREAMS)
        dy = _below(dy_bits, height + 2 * padding - th + 1)
        dx = _below(dx_bits, width + 2 * padding - tw + 1)
        flip = torch.from_numpy((flip_bits >> np.uint64(11)).astype(np.float64) * 2.0**-53 < self.flip_p)
        padded = F.pad(images, (padding,) * 4)
        rows = dy[:, None] + torch.arange(th)
        cols = torch.arange(tw).expand(batch, tw)
        cols = torch.where(flip[:, None], tw - 1 - cols, cols) + dx[:, None]  # torchvision flips after cropping
        pixels = (rows[:, :, None] * (width + 2 * padding) + cols[:, None, :]).view(batch, 1, th * tw)
        crops = padded.view(batch, channels, -1).gather(2, pixels.expand(batch, channels, th * tw))
        return crops.view(batch, channels, th, tw)


class MemorySamples(SeededSamples):
    """:class:`~lpconvert.data.sampler.SeededSamples` over :class:`MemoryImages`: sample (epoch, index) is
    augmented by :class:`BatchAugment` keyed by its seed; lists of such keys are fetched as one batch."""

    def __init__(self, dataset: MemoryImages, augment: BatchAugment | None, seed: int = 0) -> None:
        super().__init__(dataset, seed)
        self.augment = augment

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([key if isinstance(key, tuple) else (0, key)])
        return x[0], y[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of (epoch, index) keys (what a DataLoader with :func:`as_batch` as ``collate_fn`` yields)."""
        index = torch.as_tensor([i for _, i in keys], dtype=torch.long)
        images = self.dataset.images[index]
        if self.augment is not None:
            seeds = np.array([self.sample_seed(e, i) % 2**64 for e, i in keys], dtype=np.uint64)
            images = self.augment(images, seeds)
        return self.dataset.normalised(images), self.dataset.targets[index]


def as_batch(batch: Any) -> Any:
    """The ``collate_fn`` of the in-memory datasets: their ``__getitems__`` already returns the batch."""
    return batch


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: 64 well-mixed bits per uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _below(bits: np.ndarray, n: int) -> torch.Tensor:
    """Integers uniform in [0, n) from 64 random bits (the high 32 bits scaled, bias below 2⁻³²)."""
    return torch.from_numpy(((bits >> np.uint64(32)) * np.uint64(n) >> np.uint64(32)).astype(np.int64))


# ------------------------------------------------------------------------------------------------- from folders


@dataclass
class _Split:
    """A per-sample transform taken apart: its deterministic PIL head, its random crop / flip, its normalisation."""

    decode: transforms.Compose
    augment: BatchAugment | None
    normalize: transforms.Normalize


def _split(transform: Any) -> _Split | None:
    """The parts of `transform` if the batch path does all it does (deterministic resize / center crop, zero-padded
    RandomCrop, horizontal flip, ToTensor, Normalize — in that order); None otherwise (RandomResizedCrop, …)."""
    steps = list(transform.transforms) if isinstance(transform, transforms.Compose) else []
    if len(steps) < 2 or not isinstance(steps[-2], transforms.ToTensor) \
            or not isinstance(steps[-1], transforms.Normalize):
        return None
    body = steps[:-2]
    random_from = next((i for i, step in enumerate(body) if not isinstance(step, _DETERMINISTIC)), len(body))
    head, rest = body[:random_from], body[random_from:]
    crops = [s for s in rest if type(s) is transforms.RandomCrop and isinstance(s.padding, int) and s.fill == 0
             and s.padding_mode == "constant" and not s.pad_if_needed]
    flips = [s for s in rest if type(s) is transforms.RandomHorizontalFlip]
    if len(crops) > 1 or len(flips) > 1 or len(crops) + len(flips) != len(rest):
        return None
    augment = BatchAugment(tuple(crops[0].size) if crops else None, crops[0].padding if crops else 0,
                           flips[0].p if flips else 0.0) if rest else None
    return _Split(transforms.Compose([*head, transforms.PILToTensor()]), augment, steps[-1])


def _decoding(dataset: ImageFolder | HubImages, split: _Split) -> ImageFolder | HubImages:
    """`dataset` (its files, labels and loader) with the deterministic head of its transform, ending in uint8."""
    decoding = copy.copy(dataset)
    decoding.transform = split.decode
    return decoding


def _decode(decoding: ImageFolder | HubImages, normalize: transforms.Normalize, workers: int) -> MemoryImages:
    images = torch.empty((len(decoding), *decoding[0][0].shape), dtype=torch.uint8)
    start = 0
    for batch, _ in DataLoader(decoding, batch_size=256, num_workers=workers):
        images[start:start + len(batch)] = batch
        start += len(batch)
    return MemoryImages(images, torch.as_tensor(decoding.targets, dtype=torch.long), normalize, decoding.samples)


def memory_data(train: ImageFolder | HubImages, *evaluation: ImageFolder | HubImages, mode: str, seed: int,
                workers: int = 0, budget: int = MEMORY_BUDGET) -> tuple[MemorySamples | MemoryImages, ...] | None:
    """The training samples and the evaluation sets (validation, test) decoded into memory, or None to keep the
    per-sample path.

    ``mode``: ``"off"`` — None; ``"on"`` — decode (refused when a transform does something the batch path cannot,
    e.g. the ``timm`` RandomResizedCrop); ``"auto"`` — decode when the transforms allow it and the decoded images
    take at most `budget` bytes. Decoding uses `workers` processes."""
    if mode not in IN_MEMORY_MODES:
        raise LatePhaseError(f"unknown in-memory mode {mode!r}; use {', '.join(IN_MEMORY_MODES)}")
    if mode == "off":
        return None
    sets = (train, *evaluation)
    splits = [_split(data.transform) for data in sets]
    if None in splits:
        if mode == "on":
            raise LatePhaseError("--data-in-memory on augments batches with random crop and flip only; pass "
                                 "--train-transform cifar, or --data-in-memory auto to decode per sample")
        return None
    decoding = [_decoding(data, split) for data, split in zip(sets, splits)]
    size = sum(len(data) * data[0][0].numel() for data in decoding)
    if mode == "auto" and size > budget:
        return None
    decoded = [_decode(data, split.normalize, workers) for data, split in zip(decoding, splits)]
    logger.debug("decoded %s images into memory (%.0f MiB)", " + ".join(str(len(data)) for data in sets),
                 size / 2**20)
    return MemorySamples(decoded[0], splits[0].augment, seed), *decoded[1:]
