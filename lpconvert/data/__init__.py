"""Data for fine-tuning and evaluation: ImageFolder trees (or tar archives of them), Hugging Face datasets,
transforms, subsets, loaders.

The fine-tuner's whole pipeline is :func:`build_data` (datasets with the model's preprocessing) and the three
loaders :func:`train_loader`, :func:`eval_loader`, :func:`recalibration_loader`. One concept per module:

* :mod:`~lpconvert.data.archives` — locating data; uncompressed tar archives read in place (:class:`TarPath`),
  compressed ones extracted once into the cache (:func:`resolve_data_dirs`)
* :mod:`~lpconvert.data.hfds` — Hugging Face datasets through timm's dataset factory (``--dataset hfds/NAME``,
  :func:`hub_splits`)
* :mod:`~lpconvert.data.labels` — class folders → the model's label indices (:func:`class_to_index`)
* :mod:`~lpconvert.data.transforms` — the model's preprocessing and training augmentation (:func:`build_transform`)
* :mod:`~lpconvert.data.settings` — the data section of a run's settings (:class:`DataSettings`): all that
  :func:`build_data` reads
* :mod:`~lpconvert.data.datasets` — labelled image datasets of every source, subsets, the scikit-learn digits,
  :func:`build_data`
* :mod:`~lpconvert.data.fingerprint` — which files or rows each split of a run held (:func:`data_fingerprint`)
* :mod:`~lpconvert.data.selection` — a fixed, stratified selection / report split of an evaluation set
* :mod:`~lpconvert.data.sampler` — the seeded, resumable batch order and seeded augmentation
* :mod:`~lpconvert.data.memory` — small image sets decoded once into memory, augmented batch-wise (:func:`memory_data`)
* :mod:`~lpconvert.data.loaders` — the training, validation and recalibration loaders
"""

from lpconvert.data.archives import ARCHIVE_SUFFIXES, VAL_SPLITS, TarPath, resolve_data_dirs
from lpconvert.data.datasets import (
    DIGITS,
    DIGITS_MEAN,
    DIGITS_STD,
    Data,
    LabelledImages,
    Source,
    build_data,
    build_datasets,
    digits_datasets,
    stratified_indices,
)
from lpconvert.data.fingerprint import data_fingerprint
from lpconvert.data.hfds import HubImages, HubSplit, hub_dataset_id, hub_name, hub_splits
from lpconvert.data.labels import class_to_index
from lpconvert.data.loaders import eval_loader, recalibration_loader, train_loader
from lpconvert.data.memory import MemoryImages, MemorySamples, memory_data
from lpconvert.data.sampler import EpochBatchSampler, SeededSamples
from lpconvert.data.settings import DataSettings
from lpconvert.data.transforms import build_transform

__all__ = [
    "ARCHIVE_SUFFIXES",
    "DIGITS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "Data",
    "DataSettings",
    "EpochBatchSampler",
    "HubImages",
    "HubSplit",
    "LabelledImages",
    "MemoryImages",
    "MemorySamples",
    "SeededSamples",
    "Source",
    "TarPath",
    "VAL_SPLITS",
    "build_data",
    "build_datasets",
    "build_transform",
    "class_to_index",
    "data_fingerprint",
    "digits_datasets",
    "eval_loader",
    "hub_dataset_id",
    "hub_name",
    "hub_splits",
    "memory_data",
    "recalibration_loader",
    "resolve_data_dirs",
    "stratified_indices",
    "train_loader",
]
