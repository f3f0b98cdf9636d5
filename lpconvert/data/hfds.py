"""Hugging Face datasets through timm's dataset factory: ``--dataset hfds/NAME``, a Hub id or a local dataset folder.

``timm.data.create_dataset("hfds/NAME", split=...)`` opens a split as an Arrow table on disk: map-style, so lpconvert's
seeded batch order, exact resume and paired arms work as for image folders. Images come from the dataset's Image
column (``image``, else its only one), labels from its ClassLabel column (``label``, else its only one), mapped to the
model's indices in the ClassLabel's own order (:func:`~lpconvert.data.labels.class_to_index` with ``ordered``). The
splits are ``train`` and the first of ``val``, ``validation``, ``test`` — and, for fine-tuning, ``test`` as the test
set apart when it lies beside ``val`` or ``validation`` (:func:`hub_sources`). The ``datasets`` library is an extra
(``pip install 'lpconvert[hf]'``); its cache (``HF_DATASETS_CACHE``) and offline mode (``HF_DATASETS_OFFLINE=1``,
which reads a cached copy) apply::

    train, val = hub_splits("hfds/ORG/NAME")
    images = HubImages(val, class_to_index(val.class_names, 1000, ordered=True), transform)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from lpconvert.data.archives import VAL_SPLITS
from lpconvert.errors import LatePhaseError, one_line

__all__ = ["HFDS", "HubImages", "HubSplit", "hub_dataset_id", "hub_name", "hub_sources", "hub_splits"]

HFDS = "hfds/"  # timm's prefix of a (map-style) Hugging Face dataset


def hub_name(dataset: str) -> str:
    """The NAME of a ``--dataset hfds/NAME`` value (the prefix is case-insensitive, as in timm); refused otherwise."""
    if not dataset.lower().startswith(HFDS) or len(dataset) == len(HFDS):
        raise LatePhaseError(f"--dataset takes hfds/NAME (a Hugging Face dataset: a Hub id or a local dataset folder), "
                             f"got {dataset!r}; folders and tar archives go to --data")
    return dataset[len(HFDS):]


def hub_dataset_id(dataset: str | None) -> str | None:
    """The Hub id that a ``--dataset`` value names (``hfds/ORG/NAME`` → ``ORG/NAME``), for a model card's
    ``datasets:``; None for no value or a local dataset folder."""
    if dataset is None:
        return None
    name = hub_name(dataset)
    return None if Path(name).expanduser().exists() else name


@dataclass(frozen=True)
class HubSplit:
    """One split of a Hugging Face dataset as timm's reader opened it: rows, ClassLabel names, image bytes."""

    dataset: str  # the --dataset value, hfds/NAME
    split: str
    reader: Any = field(repr=False, compare=False)  # timm.data.readers.reader_hfds.ReaderHfds

    def __str__(self) -> str:
        return f"{self.dataset} (split {self.split})"

    @property
    def class_names(self) -> list[str]:
        """The ClassLabel names, in label order."""
        return sorted(self.reader.class_to_idx, key=self.reader.class_to_idx.get)

    @property
    def version(self) -> str:
        """The datasets library's fingerprint of the split's Arrow data (for a Hub dataset: of its revision)."""
        return self.reader.dataset._fingerprint

    def labels(self) -> np.ndarray:
        """The ClassLabel index of every row (-1: unlabelled), read without the images."""
        return np.asarray(self.reader.dataset.with_format("numpy")[self.reader.label_key], dtype=np.int64)

    def image(self, row: int) -> Image.Image:
        """The image of `row`, decoded to RGB."""
        file, _ = self.reader[row]
        with file:
            return Image.open(file).convert("RGB")


def hub_splits(dataset: str, *, quiet: bool = False) -> tuple[HubSplit | None, HubSplit | None]:
    """The training split (``train``) and the validation split (the first of ``val``, ``validation``, ``test``) of
    ``--dataset hfds/NAME``; None for one the dataset lacks. ``quiet``: without the datasets library's and the Hub's
    progress bars."""
    return _splits(dataset, quiet, with_test=False)[:2]


def hub_sources(dataset: str, *, quiet: bool = False) -> tuple[HubSplit | None, HubSplit | None, HubSplit | None]:
    """:func:`hub_splits` and the test set apart: the ``test`` split when the validation split is another one
    (``val`` or ``validation``), else None."""
    return _splits(dataset, quiet, with_test=True)


def _splits(dataset: str, quiet: bool, *,
            with_test: bool) -> tuple[HubSplit | None, HubSplit | None, HubSplit | None]:
    name = hub_name(dataset)
    try:
        import datasets
    except ImportError as err:
        raise LatePhaseError("--dataset hfds/NAME needs the Hugging Face datasets library: pip install "
                             "'lpconvert[hf]'") from err
    with _progress_bars_off() if quiet else contextlib.nullcontext():
        try:
            builder = datasets.load_dataset_builder(name)
            builder.download_and_prepare()  # what load_dataset does first: then the features and splits are known
        except Exception as err:  # DatasetNotFoundError, ConnectionError, FileNotFoundError…: they vary by version
            raise LatePhaseError(f"cannot open the Hugging Face dataset {name}: {one_line(err)}; check the name (a Hub "
                                 "id or a local dataset folder), or set HF_DATASETS_OFFLINE=1 to read a cached "
                                 "copy") from err
        columns = _columns(dataset, builder.info.features)
        names = list(builder.info.splits)
        train = "train" if "train" in names else None
        val = next((split for split in VAL_SPLITS if split in names), None)
        if train is None and val is None:
            raise LatePhaseError(f"{dataset} has no train, val, validation or test split (it has {', '.join(names)})")
        test = "test" if with_test and val != "test" and "test" in names else None
        return _open(dataset, train, *columns), _open(dataset, val, *columns), _open(dataset, test, *columns)


@contextlib.contextmanager
def _progress_bars_off() -> Iterator[None]:
    """The datasets library's and the Hub's progress bars off for the block, then on again unless they were off
    already. An environment variable that forces them on (``HF_DATASETS_DISABLE_PROGRESS_BARS=0``) keeps them."""
    import datasets
    from huggingface_hub import utils as hub

    libraries = [library for library in (datasets, hub) if not library.are_progress_bars_disabled()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the libraries warn when the environment forces the bars on
        for library in libraries:
            library.disable_progress_bars()
    try:
        yield
    finally:
        for library in libraries:
            library.enable_progress_bars()


def _columns(dataset: str, features: Mapping[str, Any]) -> tuple[str, str]:
    """The image and label columns: ``image`` / ``label``, else the only column of that feature type."""
    import datasets

    found = []
    for kind, preferred in ((datasets.Image, "image"), (datasets.ClassLabel, "label")):
        names = [name for name, feature in features.items() if isinstance(feature, kind)]
        if preferred not in names and len(names) != 1:
            raise LatePhaseError(f"{dataset} has {len(names)} {kind.__name__} columns ({', '.join(names) or 'none'}), "
                                 f"none named {preferred!r}; lpconvert reads the one named {preferred!r} or the only "
                                 "one")
        found.append(preferred if preferred in names else names[0])
    return found[0], found[1]


def _open(dataset: str, split: str | None, image: str, label: str) -> HubSplit | None:
    if split is None:
        return None
    import timm.data

    try:
        reader = timm.data.create_dataset(dataset, split=split, input_key=image, target_key=label).reader
    except Exception as err:  # the datasets library's errors vary by version
        raise LatePhaseError(f"cannot read split {split} of {dataset}: {one_line(err)}") from err
    return HubSplit(dataset, split, reader)


class HubImages(Dataset):
    """A Hugging Face split as a labelled image dataset: row i gives (transform(image), the model's label), with
    ImageFolder's bookkeeping — ``samples`` (row, label), ``targets``, ``classes``, ``class_to_idx``, ``transform``."""

    def __init__(self, split: HubSplit, class_to_idx: Mapping[str, int], transform: Any) -> None:
        labels = split.labels()
        if (labels < 0).any():
            raise LatePhaseError(f"{split} has unlabelled rows (label -1); use a labelled split")
        to_model = np.array([class_to_idx[name] for name in split.class_names], dtype=np.int64)
        self.split, self.transform = split, transform
        self.class_to_idx = {name: class_to_idx[name] for name in split.class_names}
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.targets: list[int] = to_model[labels].tolist()
        self.samples: list[tuple[int, int]] = list(enumerate(self.targets))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row, target = self.samples[index]
        try:
            image = self.split.image(row)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError… for corrupt images
            raise LatePhaseError(f"cannot read image {row} of {self.split}: {one_line(err)}") from err
        return (self.transform(image) if self.transform is not None else image), target
