"""A fixed split of an evaluation set into a selection part and a report part.

A pretrained checkpoint has usually seen every training image (the shared CIFAR-10 ResNet-20 scores 100 % on any
hold-out of them), so held-out training images can neither select (epochs, soups, interpolation weights) nor
calibrate. What the checkpoint never saw is the test set: :func:`selection_split` divides it once, stratified by
label and fixed by a seed, so that every arm and seed of a comparison selects on the same images and is reported on
the others — never on the images it was chosen on.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from lpconvert.data.datasets import check_every_class, stratified_indices
from lpconvert.data.memory import MemoryImages
from lpconvert.errors import LatePhaseError

__all__ = ["selection_split", "split_indices"]


def _targets(dataset: Dataset) -> list[int]:
    if isinstance(dataset, TensorDataset):
        return [int(t) for t in dataset.tensors[1]]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise LatePhaseError(f"cannot split a {type(dataset).__name__} by label: it has no targets")
    return [int(t) for t in targets]


def _part(dataset: Dataset, indices: Sequence[int]) -> Dataset:
    """The images at `indices`, as the same kind of dataset where that keeps batch loading fast."""
    index = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(dataset, MemoryImages):
        samples = [dataset.samples[i] for i in indices] if dataset.samples else ()
        return MemoryImages(dataset.images[index], dataset.targets[index], dataset.normalize, samples)
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[index] for t in dataset.tensors))
    part = Subset(dataset, list(indices))
    part.targets = [dataset.targets[i] for i in indices]  # type: ignore[attr-defined]
    return part


def split_indices(labels: Sequence[int], fraction: float, seed: int = 0, *,
                  flag: str = "--selection-split") -> tuple[list[int], list[int]]:
    """(chosen, rest): ``round(fraction · N)`` of N labelled examples, stratified by label and drawn with `seed`
    (:func:`~lpconvert.data.datasets.stratified_indices`), and the others; disjoint, each in order. The same labels in
    the same order give the same split for every model. `flag` names the setting in the one-line error."""
    targets = [int(t) for t in labels]
    size = round(fraction * len(targets))
    if not 0 < fraction < 1 or not 1 <= size < len(targets):
        raise LatePhaseError(f"{flag} {fraction:g} of {len(targets)} evaluation images takes {size}; choose a "
                             "fraction in (0, 1) that leaves images on both sides, e.g. 0.5")
    check_every_class(targets, fraction, flag=flag, images="evaluation images", part="held-out",
                      otherwise="use an evaluation set with more images of each class")
    chosen = stratified_indices(targets, size, seed)
    taken = set(chosen)
    return chosen, [i for i in range(len(targets)) if i not in taken]


def selection_split(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(selection, report): the images of `dataset` that :func:`split_indices` chooses, and the rest."""
    chosen, rest = split_indices(_targets(dataset), fraction, seed)
    return _part(dataset, chosen), _part(dataset, rest)
