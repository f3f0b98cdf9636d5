"""Datasets: ImageFolder trees (folders, or inside uncompressed tar archives) and Hugging Face splits with the model's
transforms and labels, stratified subsets, the scikit-learn digits, and :func:`build_data` — the fine-tuner's training
and validation sets — with their fingerprint.

::

    train_dir, val_dir = resolve_data_dirs(data="~/data/cifar10")        # or hub_splits("hfds/ORG/NAME")
    cfg = timm.data.resolve_data_config(model=model)
    train_ds, val_ds = build_datasets(train_dir, val_dir, data_config=cfg, num_classes=model.num_classes)

The scikit-learn handwritten digits (:func:`digits_datasets`, ``--data sklearn-digits``) serve as a small real data
set that needs no download.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import posixpath
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader, has_file_allowed_extension

from lpconvert.data.archives import TarPath, data_splits
from lpconvert.data.hfds import HubImages, HubSplit, hub_sources
from lpconvert.data.labels import class_to_index, output_names
from lpconvert.data.fingerprint import data_fingerprint, digits_fingerprint
from lpconvert.data.memory import memory_data
from lpconvert.data.sampler import SeededSamples
from lpconvert.data.settings import DIGITS
from lpconvert.data.transforms import build_transform, data_config
from lpconvert.errors import LatePhaseError, one_line

if TYPE_CHECKING:
    from lpconvert.data.settings import DataSettings

logger = logging.getLogger(__name__)

__all__ = [
    "DIGITS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "Data",
    "LabelledImages",
    "Source",
    "build_data",
    "build_datasets",
    "check_every_class",
    "data_fingerprint",
    "digits_datasets",
    "hold_out",
    "stratified_indices",
]


# Mean and std of all 1,797 scikit-learn digit images after scaling the pixels (0..16) to [0, 1].
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760


#: Where a dataset comes from: a folder, a folder inside an uncompressed tar archive, a Hugging Face split.
Source = Path | TarPath | HubSplit
#: What :func:`build_datasets` makes of a source: an ImageFolder (folders and tar trees) or :class:`HubImages`.
LabelledImages = ImageFolder | HubImages


# ------------------------------------------------------------------------------------------------------- datasets


class _MappedImageFolder(ImageFolder):
    """ImageFolder whose labels come from a given folder-name → index mapping."""

    def __init__(self, root: Path | TarPath, class_to_idx: Mapping[str, int], transform: Any,
                 loader: Callable[[str], Any] = default_loader) -> None:
        self._mapping, self._tree = dict(class_to_idx), root
        super().__init__(str(root), transform=transform, loader=loader)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = {name: self._mapping[name] for name in _class_folders(self._tree) if name in self._mapping}
        return sorted(present, key=present.get), present

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """torchvision's samples and order (classes alphabetically, then files by folder and name) of the files
        :meth:`_files` finds."""
        found: dict[str, list[tuple[tuple[str, str], str]]] = {}
        for name, key, sample in self._files(directory, class_to_idx):
            if has_file_allowed_extension(sample, extensions or ()):
                found.setdefault(name, []).append((key, sample))
        empty = sorted(set(class_to_idx) - set(found))
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
        return [(sample, class_to_idx[name]) for name in sorted(found) for _, sample in sorted(found[name])]

    def _files(self, directory: str, class_to_idx: Mapping[str, int]) -> Iterator[tuple[str, tuple[str, str], str]]:
        """(class, (folder, name), path) of every file below the class folders. Unlike torchvision's
        ``os.walk(followlinks=True)``, a symlink is followed only to a file or folder inside the root and never back
        into a folder it lies in (a loop): the others are skipped, and counted in one warning."""
        root = Path(directory).resolve()
        skipped: list[Path] = []
        for name in class_to_idx:
            for folder, file in _walk(Path(directory, name), root, (root,), skipped):
                yield name, (folder, file), os.path.join(folder, file)
        _warn_skipped(directory, [str(path.relative_to(directory)) for path in skipped])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        try:
            return super().__getitem__(index)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError… for corrupt or truncated files
            raise LatePhaseError(
                f"cannot read image {self.samples[index][0]}: {one_line(err)}; remove or replace that file"
            ) from err


class _MappedTarFolder(_MappedImageFolder):
    """An ImageFolder tree inside an uncompressed tar archive, read in place: the samples, order and labels of the
    extracted tree, each image read at its offset in the archive (no handle is kept: safe in forked workers)."""

    def __init__(self, root: TarPath, class_to_idx: Mapping[str, int], transform: Any) -> None:
        self._places: dict[str, tuple[int, int]] = {}  # sample → (offset, size) in the archive
        super().__init__(root, class_to_idx, transform, loader=self._read)

    def _files(self, directory: str, class_to_idx: Mapping[str, int]) -> Iterator[tuple[str, tuple[str, str], str]]:
        """The archive's files below the class folders, each one's place recorded: a symbolic link to a file inside
        the root counts as that file, as in the extracted tree; the other links are counted in one warning."""
        for path, place in self._tree.files():
            name, _, rest = path.partition("/")
            if rest and name in class_to_idx:
                sample = f"{directory}/{path}"
                self._places[sample] = place
                yield name, posixpath.split(path), sample
        _warn_skipped(directory, [link for link in self._tree.skipped_links() if link.split("/", 1)[0] in class_to_idx])

    def _read(self, sample: str) -> Image.Image:
        offset, size = self._places[sample]
        with open(self._tree.index.archive, "rb") as file:
            file.seek(offset)
            return Image.open(io.BytesIO(file.read(size))).convert("RGB")


def _warn_skipped(root: str, links: Sequence[str]) -> None:
    """One warning for the symlinks below `root` (paths relative to it) that were not followed."""
    if links:
        logger.warning("%s: skipped %d symlink(s) leading outside it or into a loop (%s%s); remove them or copy the "
                       "files in", root, len(links), ", ".join(links[:3]), ", …" * (len(links) > 3))


def _walk(folder: Path, root: Path, chain: tuple[Path, ...], skipped: list[Path]) -> Iterator[tuple[str, str]]:
    """(folder, name) of the files below `folder` (reached through `chain`, the resolved folders above it), symlinks
    followed only as :func:`_inside` says, the others put in `skipped`. Unreadable folders are passed over, as
    ``os.walk`` does."""
    if not _inside(folder, root, chain):
        skipped.append(folder)
        return
    chain = (*chain, folder.resolve())
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():
            yield from _walk(path, root, chain, skipped)
        elif _inside(path, root, chain):
            yield str(folder), entry.name
        else:
            skipped.append(path)


def _inside(path: Path, root: Path, chain: tuple[Path, ...]) -> bool:
    """Not a symlink, or one to an existing file or folder inside `root` (resolved) that is none of `chain` (a loop)."""
    if not path.is_symlink():
        return True
    target = path.resolve()
    return target.exists() and target.is_relative_to(root) and target not in chain


def _class_names(source: Source) -> list[str]:
    """The classes of a source: its class folders, alphabetically, or a Hugging Face split's ClassLabel names."""
    return source.class_names if isinstance(source, HubSplit) else _class_folders(source)


def _class_folders(root: Path | TarPath) -> list[str]:
    """The class folders of an ImageFolder tree, alphabetically: its folders, as torchvision's ImageFolder finds them
    (files beside them are no classes). In an archive read in place, a ``.tar`` inside it is a class only in a tree of
    such archives (ImageNet's training archive, one per class): beside real folders it is a file, as extracted."""
    try:
        folders = [e for e in root.iterdir() if e.is_dir() and not e.name.startswith(".")]
        real = [e for e in folders if not (isinstance(e, TarPath) and e.is_archive())]
        names = sorted(e.name for e in (real or folders))
    except FileNotFoundError as exc:
        raise LatePhaseError(f"data folder {root} does not exist; check the path") from exc
    except OSError as exc:
        raise LatePhaseError(f"cannot read data folder {root}: {exc.strerror or exc}") from exc
    if not names:
        raise LatePhaseError(f"data folder {root} has no class folders; expected ImageFolder layout root/<class>/<img>")
    return names


def build_datasets(
    train_dir: str | os.PathLike | Source | None,
    val_dir: str | os.PathLike | Source | None,
    *,
    data_config: Mapping[str, Any],
    num_classes: int | None,
    class_map: str | os.PathLike | Sequence[str] = "auto",
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    train_transform: str = "auto",
) -> tuple[LabelledImages | None, LabelledImages | None]:
    """Datasets with the model's transforms (:func:`build_transform`) and labels (:func:`class_to_index`).

    A source is an ImageFolder tree (a folder, or a :class:`~lpconvert.data.archives.TarPath` inside an uncompressed
    tar archive, read in place) or a Hugging Face split (:class:`~lpconvert.data.hfds.HubSplit`, labels in its
    ClassLabel order). The label mapping is computed from the training classes (the validation classes when there is
    no training set) and reused for validation, whose classes must be among them. ``train_subset`` / ``val_subset``
    keep that many samples, stratified: each class keeps its share (largest remainder), drawn at random with
    ``seed``, in file order; the result keeps its type (``samples``/``targets`` trimmed). ``None`` for a missing
    source. A class map names the training classes (:func:`class_to_index` with ``complete``).
    """
    return _labelled_sets(train_dir, val_dir, None, data_config=data_config, num_classes=num_classes,
                          class_map=class_map, train_subset=train_subset, val_subset=val_subset, seed=seed,
                          train_transform=train_transform)[:2]


def _labelled_sets(
    train_dir: str | os.PathLike | Source | None, val_dir: str | os.PathLike | Source | None, test_dir: Source | None,
    *, data_config: Mapping[str, Any], num_classes: int | None, class_map: str | os.PathLike | Sequence[str],
    train_subset: int | None, val_subset: int | None, seed: int, train_transform: str,
) -> tuple[LabelledImages | None, LabelledImages | None, LabelledImages | None]:
    """:func:`build_datasets`'s training and validation sets, and a test set (whole, evaluation transform) with the
    same labels."""
    train_root, val_root = (Path(d) if isinstance(d, (str, os.PathLike)) else d for d in (train_dir, val_dir))
    mapping_root = train_root or val_root
    if mapping_root is None:
        raise LatePhaseError("no data folder given; pass --data, --train-dir or --val-dir")
    mapping = class_to_index(_class_names(mapping_root), num_classes, class_map,
                             ordered=isinstance(mapping_root, HubSplit), complete=train_root is not None)

    def make(root: Source | None, train: bool, subset: int | None) -> LabelledImages | None:
        if root is None:
            return None
        if root is not mapping_root:
            extra = sorted(set(_class_names(root)) - set(mapping))
            if extra:
                raise LatePhaseError(
                    f"class folder {extra[0]!r} in {root} has no training counterpart in {mapping_root}; "
                    "use train and validation sets with the same classes"
                )
        transform = build_transform(data_config, train=train, train_transform=train_transform)
        try:
            dataset = _labelled_images(root, mapping, transform)
        except (FileNotFoundError, PermissionError) as exc:
            raise LatePhaseError(f"cannot use data folder {root}: {exc}") from exc
        if subset is not None:
            _keep(dataset, stratified_indices(dataset.targets, subset, seed))
        return dataset

    return make(train_root, True, train_subset), make(val_root, False, val_subset), make(test_dir, False, None)


def _labelled_images(source: Source, mapping: Mapping[str, int], transform: Any) -> LabelledImages:
    if isinstance(source, HubSplit):
        return HubImages(source, mapping, transform)
    if isinstance(source, TarPath):
        return _MappedTarFolder(source, mapping, transform)
    return _MappedImageFolder(source, mapping, transform)


def stratified_indices(targets: Sequence[int], size: int, seed: int = 0) -> list[int]:
    """``size`` sorted indices, each class keeping its share of ``targets`` (largest remainder), seeded random."""
    if size <= 0:
        raise LatePhaseError(f"subset size must be positive, got {size}")
    labels = np.asarray(targets)
    if size >= len(labels):
        return list(range(len(labels)))
    classes, counts = np.unique(labels, return_counts=True)
    take = _class_shares(counts, size)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in zip(classes, take)]
    return sorted(int(i) for i in np.concatenate(chosen))


def _class_shares(counts: np.ndarray, size: int) -> np.ndarray:
    """How many images of each class (of `counts` images each) a stratified subset of `size` takes: each class its
    share, the remainder to the largest fractional parts (ties to the earlier class)."""
    quotas = counts * size / int(counts.sum())
    take = np.floor(quotas).astype(int)
    order = np.lexsort((np.arange(len(counts)), -(quotas - take)))
    take[order[: size - int(take.sum())]] += 1
    return take


def check_every_class(targets: Sequence[int], fraction: float, *, flag: str, images: str, part: str,
                      otherwise: str) -> None:
    """Refuse ``flag fraction`` when the stratified part of ``round(fraction · N)`` images it takes of the labelled
    `targets` (:func:`stratified_indices`) has no image of some class: one line naming the images and classes, the
    smallest ``flag`` value that gives every class an image, or `otherwise` (the fix when none does). `images` names
    the N images (``"training images"``), `part` what the part is for (``"validation"``)."""
    counts = np.unique(np.asarray(targets), return_counts=True)[1]
    size, total = round(fraction * len(targets)), len(targets)
    missing = int((_class_shares(counts, size) == 0).sum())
    if not missing:
        return
    problem = (f"{flag} {fraction:g} holds out {size} of the {total} {images} for {len(counts)} classes, so {missing} "
               f"class{'es get' if missing > 1 else ' gets'} no {part} image")
    for needed in range(max(size + 1, len(counts)), min(total, size + 10_000)):
        digits = max(0, -math.floor(math.log10(needed / total))) + 1
        suggested = math.ceil(needed / total * 10**digits) / 10**digits
        taken = round(suggested * total)
        if taken < total and suggested < 1 and (_class_shares(counts, taken) > 0).all():
            raise LatePhaseError(f"{problem}; use {flag} {suggested:g} or more, which gives every class at least one")
    raise LatePhaseError(f"{problem}, and no {flag} gives every class one; {otherwise}")


def _keep(dataset: LabelledImages, indices: Sequence[int]) -> None:
    dataset.samples = [dataset.samples[i] for i in indices]
    dataset.targets = [target for _, target in dataset.samples]
    if isinstance(dataset, ImageFolder):
        dataset.imgs = dataset.samples


def digits_datasets(seed: int = 0, test_size: int = 597) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 handwritten 8x8 digits as (train, test) TensorDatasets: 1,200 / 597 by default.

    Images are (N, 1, 8, 8) float32, pixels scaled to [0, 1] and normalized with :data:`DIGITS_MEAN` /
    :data:`DIGITS_STD`; labels are int64 in 0..9. The split is stratified and fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0 - DIGITS_MEAN) / DIGITS_STD
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_size, stratify=digits.target, random_state=seed
    )

    def to_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long())

    return to_dataset(x_train, y_train), to_dataset(x_test, y_test)


# ----------------------------------------------------------------------------------------------- the pipeline


@dataclass
class Data:
    """The fine-tuner's data: training samples (seeded augmentation), the validation set every epoch is measured on
    (and ``--select best`` chooses on), the test set evaluated once at the end — the data's test split when
    validation was held out of the training images or is a split of its own beside it — and their fingerprint.
    `val_role` says what the validation set is: ``"validation"`` (the data's validation split), ``"held-out"``
    (``--val-split`` of the training images) or ``"test"`` (the data's test split, nothing held out: measured, never
    selected on). With a test set, ``fingerprint["val"]["held_out"]`` says whether validation was held out."""

    train: SeededSamples
    val: Dataset
    fingerprint: dict[str, Any]
    label_names: list[str] | None = None
    test: Dataset | None = None
    val_role: str = "validation"


def build_data(config: DataSettings, model: nn.Module, sources: tuple[Source, Source] | None = None, *,
               labels: bool = True, evaluation: str = "validation", quiet: bool = False) -> Data:
    """Training, validation and test sets of the data section `config` with `model`'s own preprocessing (its timm data config, as
    ``--input-size`` / ``--img-size`` / ``--crop-pct`` override it: :func:`~lpconvert.data.transforms.data_config`).

    The sources are ``config.dataset`` (:func:`~lpconvert.data.hfds.hub_sources`) or ``config.data`` /
    ``train_dir`` / ``val_dir`` (:func:`~lpconvert.data.archives.data_splits`), unless `sources` gives the
    (training, validation) pair itself (`evaluation` says what its second is). When the evaluation split is a test
    set (``test/``, a dataset's ``test`` split, the digits' test images), ``config.val_split`` of the training images
    are held out, stratified with ``config.subset_seed``, as the validation set (:func:`hold_out`), and the test set
    is returned apart. When the evaluation split is a validation set and the data also has a test split (``test/``
    beside ``val/``, a dataset's ``test`` split beside ``validation``), validation chooses and that test set is
    returned apart (whole: ``val_subset`` is the validation set's). Labels follow ``config.class_map`` (default:
    :func:`class_to_index`'s ``"auto"``); ``label_names`` name every output (:func:`output_names`). Subsets are
    drawn with ``config.subset_seed``; the training augmentation is seeded per (``config.seed``, epoch, sample) by
    :class:`~lpconvert.data.sampler.SeededSamples`. Images are decoded into memory and augmented batch-wise
    (:func:`~lpconvert.data.memory.memory_data`) as ``config.data_in_memory`` says. ``labels=False`` (BatchNorm
    recalibration, which reads no labels): the classes are not matched to the model's head, they are numbered in
    folder order. ``quiet``: no progress bars while archives are indexed or extracted and datasets prepared."""
    if sources is None and config.data == DIGITS:
        train, test = digits_datasets()  # one split for every seed: the T0 model never sees a test digit
        names = [str(d) for d in range(10)]
        if config.val_split == 0:
            return Data(SeededSamples(train, config.seed), test, digits_fingerprint(train, test, val_role="test"),
                        names, val_role="test")
        train, val = hold_out(train, test, config.val_split, config.subset_seed)
        return Data(SeededSamples(train, config.seed), val, digits_fingerprint(train, val, test), names, test,
                    "held-out")
    test_source: Source | None = None
    if sources is None and config.dataset is not None:
        train_source, val_source, test_source = hub_sources(config.dataset, quiet=quiet)
        if train_source is None or val_source is None:
            raise LatePhaseError(f"fine-tuning needs a training and a validation set; {config.dataset} has no "
                                 f"{'train' if train_source is None else 'val, validation or test'} split")
        split = "test" if val_source.split == "test" else "validation"
    elif sources is None:
        found = data_splits(config.data, config.train_dir, config.val_dir, quiet=quiet)
        train_source, val_source, test_source, split = found.train, found.val, found.test, found.evaluation
    else:
        (train_source, val_source), split = sources, evaluation
    if train_source is None or val_source is None:
        raise LatePhaseError("fine-tuning needs a training and a validation set; pass --data ROOT or "
                             "--train-dir/--val-dir")
    train, val, test = _labelled_sets(
        train_source, val_source, test_source, data_config=data_config(model, config),
        num_classes=_num_classes(model) if labels else None,
        class_map=config.labels if labels else "folder", train_subset=config.train_subset,
        val_subset=config.val_subset, seed=config.subset_seed, train_transform=config.train_transform,
    )
    if len(train.class_to_idx) < 2:
        raise LatePhaseError(f"the training set {train_source} has {len(train.class_to_idx)} class; a classifier "
                             "needs at least 2")
    names = output_names(train.class_to_idx, _num_classes(model) if labels else None)
    role = split
    if split == "test" and config.val_split > 0:
        test, role = val, "held-out"
        train, val = hold_out(train, test, config.val_split, config.subset_seed)
    fingerprint = {"train": data_fingerprint(train), "val": data_fingerprint(val)}
    if test is not None:
        fingerprint["val"]["held_out"] = role == "held-out"
        fingerprint["test"] = data_fingerprint(test)
    decoded = memory_data(train, val, *([test] if test is not None else []), mode=config.data_in_memory,
                          seed=config.seed, workers=config.workers)
    if decoded is None:
        return Data(SeededSamples(train, config.seed), val, fingerprint, names, test, role)
    return Data(decoded[0], decoded[1], fingerprint, names, decoded[2] if test is not None else None, role)


def hold_out(train: LabelledImages | TensorDataset, evaluation: Dataset, fraction: float,
             seed: int) -> tuple[LabelledImages | TensorDataset, LabelledImages | TensorDataset]:
    """(the rest of `train`, ``round(fraction · len(train))`` of its images held out as a validation set): stratified
    by label, drawn with `seed` (:func:`stratified_indices`); the held-out images get `evaluation`'s transform (no
    augmentation). Neither set is shared with the other."""
    targets = [int(t) for t in (train.tensors[1] if isinstance(train, TensorDataset) else train.targets)]
    size = round(fraction * len(targets))
    if not 1 <= size < len(targets):
        raise LatePhaseError(f"--val-split {fraction:g} of {len(targets)} training images holds out {size}; choose a "
                             "fraction that leaves images on both sides")
    check_every_class(targets, fraction, flag="--val-split", images="training images", part="validation",
                      otherwise="pass a validation set of every class (--val-dir) instead")
    held = set(stratified_indices(targets, size, seed))
    rest = [i for i in range(len(targets)) if i not in held]
    if isinstance(train, TensorDataset):
        return (TensorDataset(*(t[rest] for t in train.tensors)),
                TensorDataset(*(t[sorted(held)] for t in train.tensors)))
    validation = copy.copy(train)
    validation.transform = evaluation.transform
    _keep(validation, sorted(held))
    _keep(train, rest)
    return train, validation


def _num_classes(model: nn.Module) -> int | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return getattr(head, "out_features", None) or getattr(model, "num_classes", None)
