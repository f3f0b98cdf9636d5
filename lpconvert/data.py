"""Data for fine-tuning and evaluation: ImageFolder trees (or tar archives of them), transforms, subsets, loaders.

The fine-tuner's whole pipeline is :func:`build_data` (datasets with the model's preprocessing) and the three
loaders :func:`train_loader`, :func:`eval_loader`, :func:`recalibration_loader`. The parts::

    train_dir, val_dir = resolve_data_dirs(data="~/data/cifar10")      # train/ + val/ (or test/), dirs or archives
    cfg = timm.data.resolve_data_config(model=model)
    train_ds, val_ds = build_datasets(train_dir, val_dir, data_config=cfg, num_classes=model.num_classes)

Labels follow the alphabetical order of the class folders, except that folders named by ImageNet WordNet IDs are
mapped to the model's ImageNet class indices (``class_map="auto"``). The scikit-learn handwritten digits
(:func:`digits_datasets`, ``--data sklearn-digits``) serve as a small real data set that needs no download.
Archives are extracted once into the cache folder: ``LPCONVERT_CACHE``, else ``~/.cache/lpconvert``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from lpconvert.errors import LatePhaseError, one_line
from lpconvert.sampler import EpochBatchSampler, SeededSamples

if TYPE_CHECKING:
    from lpconvert.config import FinetuneConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHIVE_SUFFIXES",
    "DIGITS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "Data",
    "build_data",
    "build_datasets",
    "build_transform",
    "class_to_index",
    "data_fingerprint",
    "digits_datasets",
    "eval_loader",
    "recalibration_loader",
    "resolve_data_dirs",
    "stratified_indices",
    "train_loader",
]

DIGITS = "sklearn-digits"  # --data value of the built-in real data set (the offline demo)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# Mean and std of all 1,797 scikit-learn digit images after scaling the pixels (0..16) to [0, 1].
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760
_SMALL_INPUT = 64  # inputs up to this many pixels a side get the CIFAR training augmentation by default
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_SPLITS = ("train", "val", "test")
_FILTER_ERRORS = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()


# ---------------------------------------------------------------------------------------------------- locating data


def resolve_data_dirs(
    data: str | os.PathLike | None = None,
    train_dir: str | os.PathLike | None = None,
    val_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Path | None, Path | None]:
    """Find the training and validation ImageFolder roots, extracting archives once into a cache.

    ``data`` is a root with the ImageNet layout: ``train`` plus ``val`` (or ``test`` when there is no ``val``), each a
    folder or an archive (``train.tar.gz`` ...); ``data`` may itself be an archive of such a root. ``train_dir`` /
    ``val_dir`` name one ImageFolder tree (or archive) each and take precedence. A part that is not found is returned
    as ``None``; callers decide which they need.

    Archives (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) are extracted safely and atomically to
    ``<cache>/extracted/<hash of path, size and mtime>``, where ``<cache>`` is ``cache_dir``, else the environment
    variable ``LPCONVERT_CACHE``, else ``~/.cache/lpconvert``; a single top-level folder that holds only folders
    (``train/<class>/...``) is stepped into.

    Example: ``resolve_data_dirs(data="cifar10")`` with ``cifar10/train.tar.gz`` and ``cifar10/test.tar.gz``.
    """
    if data is None and train_dir is None and val_dir is None:
        raise LatePhaseError("no data given; pass --data ROOT (with train/ and val/) or --train-dir / --val-dir")
    train = _resolve_tree(train_dir, cache_dir) if train_dir is not None else None
    val = _resolve_tree(val_dir, cache_dir) if val_dir is not None else None
    if data is not None:
        root = _resolve_tree(data, cache_dir, stop_at=_SPLITS)
        if train is None:
            train = _find_split(root, ("train",), cache_dir)
        if val is None:
            val = _find_split(root, ("val", "test"), cache_dir)
        if train is None and val is None and train_dir is None and val_dir is None:
            raise LatePhaseError(
                f"found neither train/ nor val/ (or test/) in {data}; pass --train-dir / --val-dir for a single "
                "ImageFolder tree"
            )
    return train, val


def _find_split(root: Path, names: Sequence[str], cache_dir: str | os.PathLike | None) -> Path | None:
    for name in names:
        for candidate in [root / name, *(root / f"{name}{suffix}" for suffix in ARCHIVE_SUFFIXES)]:
            if candidate.exists():
                return _resolve_tree(candidate, cache_dir)
    return None


def _resolve_tree(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None, stop_at: Sequence[str] = ()
) -> Path:
    """A folder as it is; an archive extracted into the cache, stepping into a single top folder unless it holds
    one of ``stop_at`` (folder or archive names)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path
    if not path.exists():
        raise LatePhaseError(
            f"data path {path} does not exist; pass an ImageFolder directory or a .tar/.tar.gz/.tgz archive of one"
        )
    try:
        is_archive = tarfile.is_tarfile(path)
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise LatePhaseError(f"cannot read data path {path}: {exc}; check that the archive is complete") from exc
    if not is_archive:
        raise LatePhaseError(f"data path {path} is neither a directory nor a tar archive; pass an ImageFolder tree")
    return _step_into_single_folder(_extract_cached(path, cache_dir), stop_at)


def _step_into_single_folder(root: Path, stop_at: Sequence[str]) -> Path:
    """Descend while the tree is one folder that holds only folders (``train/<class>/...``), ignoring dot files."""
    while True:
        entries = [e for e in root.iterdir() if not e.name.startswith(".")]
        if any(e.name.split(".")[0] in stop_at for e in entries):
            return root
        if len(entries) != 1 or not entries[0].is_dir():
            return root
        inner = [e for e in entries[0].iterdir() if not e.name.startswith(".")]
        if not inner or not all(e.is_dir() for e in inner):
            return root
        root = entries[0]


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    if os.environ.get("LPCONVERT_CACHE"):
        return Path(os.environ["LPCONVERT_CACHE"]).expanduser().absolute()
    return Path.home() / ".cache" / "lpconvert"


def _extract_cached(archive: Path, cache_dir: str | os.PathLike | None) -> Path:
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    parent = _cache_root(cache_dir) / "extracted"
    target = parent / key
    if target.is_dir():
        return target
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=parent))
    except OSError as exc:
        raise LatePhaseError(f"cannot create the extraction cache in {parent}: {exc}; set LPCONVERT_CACHE") from exc
    logger.info("extracting %s into the cache %s (once; LPCONVERT_CACHE sets the folder)", archive.name, parent)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _progress(_checked_members(tar, archive), f"extracting {archive.name}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:  # Python without extraction filters: the member checks alone guard the paths
                tar.extractall(tmp, members=members)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not a concurrent extraction that finished first
                raise
    except _FILTER_ERRORS as exc:
        raise LatePhaseError(f"refusing to extract {archive}: {exc}; repack it without links or special files") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise LatePhaseError(f"cannot extract {archive}: {exc}; check that the archive is complete") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _progress(items: Iterator[Any], description: str) -> Iterator[Any]:
    """A progress bar on a terminal (stderr), nothing otherwise."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit=" files", disable=None, leave=False)


def _checked_members(tar: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    """Yield the members, refusing absolute paths and ``..`` (in names and link targets) and device files."""
    for member in tar:
        names = [member.name] + ([member.linkname] if member.issym() or member.islnk() else [])
        for name in names:
            pure = PurePosixPath(name.replace("\\", "/"))
            if pure.is_absolute() or ".." in pure.parts:
                raise LatePhaseError(
                    f"refusing to extract {archive}: member {name!r} has an absolute path or '..'; "
                    "repack it with relative paths"
                )
        if member.isdev():
            raise LatePhaseError(f"refusing to extract {archive}: member {member.name!r} is a device file")
        yield member


# --------------------------------------------------------------------------------------------------------- labels


def class_to_index(
    classes: Sequence[str], num_classes: int | None, class_map: str | os.PathLike = "auto"
) -> dict[str, int]:
    """Map class folder names to the model's label indices.

    ``class_map``: ``"folder"`` — alphabetical order of the folders, which must number ``num_classes``;
    ``"imagenet"`` — folders are WordNet IDs (``n01440764``) mapped to their index in the ImageNet label set that
    timm infers from ``num_classes`` (1000: ImageNet-1k; also 21k/12k/22k variants), a subset of classes is fine;
    ``"auto"`` — ``"imagenet"`` when every folder is a WordNet ID of that label set, else ``"folder"``;
    any other value — a text file with one folder name per line, line ``i`` being label ``i`` (timm's class map).

    Example: ``class_to_index(["n01443537", "n01440764"], 1000)`` gives ``{"n01440764": 0, "n01443537": 1}``.
    """
    classes = sorted(classes)
    if class_map in ("auto", "imagenet"):
        synsets = _imagenet_synsets(num_classes)
        unknown = sorted(set(classes) - set(synsets)) if synsets else classes
        if not unknown:
            index = {name: i for i, name in enumerate(synsets)}
            return {name: index[name] for name in classes}
        if class_map == "imagenet":
            if not synsets:
                raise LatePhaseError(
                    f"class_map 'imagenet' needs an ImageNet head (1000 classes or an ImageNet-21k/12k/22k size), "
                    f"but the model head has {num_classes}; use class_map 'folder'"
                )
            raise LatePhaseError(
                f"class folder {unknown[0]!r} is not an ImageNet class ID (WordNet ID like n01440764); "
                "use class_map 'folder'"
            )
    elif class_map != "folder":
        return _class_map_file(Path(class_map), classes, num_classes)
    if num_classes is not None and len(classes) != num_classes:
        raise LatePhaseError(
            f"the data has {len(classes)} classes but the model head has {num_classes}; "
            f"pass --num-classes {len(classes)} to train a new head"
        )
    return {name: i for i, name in enumerate(classes)}


def _imagenet_synsets(num_classes: int | None) -> list[str]:
    subset = infer_imagenet_subset({"num_classes": num_classes}) if num_classes else None
    return list(ImageNetInfo(subset).label_names()) if subset else []


def _class_map_file(path: Path, classes: Sequence[str], num_classes: int | None) -> dict[str, int]:
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise LatePhaseError(
            f"cannot read class map {path}: {exc.strerror or exc}; use 'auto', 'folder', 'imagenet' or a text file"
        ) from exc
    index = {name: i for i, name in enumerate(names)}
    missing = [name for name in classes if name not in index]
    if missing:
        raise LatePhaseError(f"class folder {missing[0]!r} is not listed in the class map {path}; add it")
    if num_classes is not None and max((index[name] for name in classes), default=-1) >= num_classes:
        raise LatePhaseError(
            f"the class map {path} lists {len(names)} classes but the model head has {num_classes}; "
            f"pass --num-classes {len(names)} to train a new head"
        )
    return {name: index[name] for name in classes}


# ------------------------------------------------------------------------------------------------------- datasets


class _MappedImageFolder(ImageFolder):
    """ImageFolder whose labels come from a given folder-name → index mapping."""

    def __init__(self, root: Path, class_to_idx: Mapping[str, int], transform: Any) -> None:
        self._mapping = dict(class_to_idx)
        super().__init__(str(root), transform=transform)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = {name: i for name, i in self._mapping.items() if (Path(directory) / name).is_dir()}
        return sorted(present, key=present.get), present

    def __getitem__(self, index: int) -> tuple[Any, int]:
        try:
            return super().__getitem__(index)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError… for corrupt or truncated files
            raise LatePhaseError(
                f"cannot read image {self.samples[index][0]}: {one_line(err)}; remove or replace that file"
            ) from err


def _class_folders(root: Path) -> list[str]:
    try:
        names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except FileNotFoundError as exc:
        raise LatePhaseError(f"data folder {root} does not exist; check the path") from exc
    except OSError as exc:
        raise LatePhaseError(f"cannot read data folder {root}: {exc.strerror or exc}") from exc
    if not names:
        raise LatePhaseError(f"data folder {root} has no class folders; expected ImageFolder layout root/<class>/<img>")
    return names


def build_transform(data_config: Mapping[str, Any], *, train: bool, train_transform: str = "auto") -> Any:
    """The model's preprocessing from its timm data config (``timm.data.resolve_data_config(model=model)``).

    Evaluation: timm's resize + center crop + normalize. Training: ``"timm"`` — RandomResizedCrop + horizontal
    flip (timm's ImageNet recipe, colour jitter off); ``"cifar"`` — resize to the input size, RandomCrop with 4 px
    zero padding + horizontal flip, the standard CIFAR augmentation; ``"auto"`` — ``"cifar"`` when the input is at
    most 64 px a side, else ``"timm"``. All end with ToTensor and Normalize(mean, std) of the config.
    """
    cfg = {key: data_config[key] for key in _TRANSFORM_KEYS if key in data_config}
    if "input_size" not in cfg:
        raise LatePhaseError("the data config has no input_size; build it with timm.data.resolve_data_config(model=m)")
    if train_transform not in ("auto", "timm", "cifar"):
        raise LatePhaseError(f"unknown train transform {train_transform!r}; use 'auto', 'timm' or 'cifar'")
    height, width = cfg["input_size"][-2:]
    if train_transform == "auto":
        train_transform = "cifar" if max(height, width) <= _SMALL_INPUT else "timm"
    if not train:
        return create_transform(**cfg, is_training=False)
    if train_transform == "timm":
        return create_transform(**cfg, is_training=True, color_jitter=None)
    interpolation = transforms.InterpolationMode(cfg.get("interpolation", "bilinear"))
    return transforms.Compose(
        [
            transforms.Resize((height, width), interpolation=interpolation),
            transforms.RandomCrop((height, width), padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ]
    )


def build_datasets(
    train_dir: str | os.PathLike | None,
    val_dir: str | os.PathLike | None,
    *,
    data_config: Mapping[str, Any],
    num_classes: int | None,
    class_map: str | os.PathLike = "auto",
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    train_transform: str = "auto",
) -> tuple[ImageFolder | None, ImageFolder | None]:
    """ImageFolder datasets with the model's transforms (:func:`build_transform`) and labels (:func:`class_to_index`).

    The label mapping is computed from the training folders (the validation folders when there is no training set)
    and reused for validation, whose classes must be among them. ``train_subset`` / ``val_subset`` keep that many
    samples, stratified: each class keeps its share (largest remainder), drawn at random with ``seed``, in file
    order; the result is still an ImageFolder (``samples``/``targets`` trimmed). ``None`` for a missing directory.
    """
    train_root = Path(train_dir) if train_dir is not None else None
    val_root = Path(val_dir) if val_dir is not None else None
    mapping_root = train_root or val_root
    if mapping_root is None:
        raise LatePhaseError("no data folder given; pass --data, --train-dir or --val-dir")
    mapping = class_to_index(_class_folders(mapping_root), num_classes, class_map)

    def make(root: Path | None, train: bool, subset: int | None) -> ImageFolder | None:
        if root is None:
            return None
        if root is not mapping_root:
            extra = sorted(set(_class_folders(root)) - set(mapping))
            if extra:
                raise LatePhaseError(
                    f"class folder {extra[0]!r} in {root} has no training counterpart in {mapping_root}; "
                    "use train and validation sets with the same classes"
                )
        transform = build_transform(data_config, train=train, train_transform=train_transform)
        try:
            dataset = _MappedImageFolder(root, mapping, transform)
        except (FileNotFoundError, PermissionError) as exc:
            raise LatePhaseError(f"cannot use data folder {root}: {exc}") from exc
        if subset is not None:
            _keep(dataset, stratified_indices(dataset.targets, subset, seed))
        return dataset

    return make(train_root, True, train_subset), make(val_root, False, val_subset)


def stratified_indices(targets: Sequence[int], size: int, seed: int = 0) -> list[int]:
    """``size`` sorted indices, each class keeping its share of ``targets`` (largest remainder), seeded random."""
    if size <= 0:
        raise LatePhaseError(f"subset size must be positive, got {size}")
    labels = np.asarray(targets)
    if size >= len(labels):
        return list(range(len(labels)))
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * size / len(labels)
    take = np.floor(quotas).astype(int)
    order = sorted(range(len(classes)), key=lambda i: (-(quotas[i] - take[i]), i))
    for i in order[: size - int(take.sum())]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in zip(classes, take)]
    return sorted(int(i) for i in np.concatenate(chosen))


def _keep(dataset: ImageFolder, indices: Sequence[int]) -> None:
    dataset.samples = [dataset.samples[i] for i in indices]
    dataset.imgs = dataset.samples
    dataset.targets = [target for _, target in dataset.samples]


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
    """The fine-tuner's data: training samples (seeded augmentation), validation set, their fingerprint."""

    train: SeededSamples
    val: Dataset
    fingerprint: dict[str, Any]
    label_names: list[str] | None = None


def build_data(config: FinetuneConfig, model: nn.Module) -> Data:
    """Training and validation sets of `config` with `model`'s own preprocessing (its timm data config).

    Subsets are drawn with ``config.subset_seed``; the training augmentation is seeded per (``config.seed``, epoch,
    sample) by :class:`~lpconvert.sampler.SeededSamples`."""
    if config.data == DIGITS:
        train, val = digits_datasets()  # one split for every seed: the T0 model never sees a test digit
        return Data(SeededSamples(train, config.seed), val, {"dataset": DIGITS, "num_files": len(train) + len(val)},
                    [str(d) for d in range(10)])
    import timm.data

    train_dir, val_dir = resolve_data_dirs(config.data, config.train_dir, config.val_dir)
    if train_dir is None or val_dir is None:
        raise LatePhaseError("fine-tuning needs a training and a validation set; pass --data ROOT or --train-dir/--val-dir")
    train, val = build_datasets(
        train_dir, val_dir, data_config=timm.data.resolve_data_config(model=model), num_classes=_num_classes(model),
        train_subset=config.train_subset, val_subset=config.val_subset, seed=config.subset_seed,
        train_transform=config.train_transform,
    )
    if len(train.class_to_idx) < 2:
        raise LatePhaseError(f"the training set {train_dir} has {len(train.class_to_idx)} class folder; a classifier "
                             "needs at least 2")
    fingerprint = {"train": data_fingerprint(train), "val": data_fingerprint(val)}
    names = sorted(train.class_to_idx, key=train.class_to_idx.get)
    return Data(SeededSamples(train, config.seed), val, fingerprint, names)


def _num_classes(model: nn.Module) -> int | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return getattr(head, "out_features", None) or getattr(model, "num_classes", None)


def train_loader(samples: SeededSamples, batch_size: int, *, seed: int, workers: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """Global batches in a (seed, epoch)-determined order, split across ranks; its position is settable
    (``loader.batch_sampler.set_position(epoch, batch)``) for resuming."""
    if len(samples) < batch_size:
        raise LatePhaseError(
            f"the training set has {len(samples)} images, fewer than one batch of {batch_size}; lower --batch-size"
        )
    sampler = EpochBatchSampler(len(samples), batch_size, seed=seed, rank=rank, world_size=world_size)
    return DataLoader(samples, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0)


def eval_loader(dataset: Dataset, batch_size: int, *, workers: int, pin_memory: bool = False) -> DataLoader:
    """The validation set in file order."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)


def recalibration_loader(samples: SeededSamples, batch_size: int, *, seed: int, workers: int = 0,
                         pin_memory: bool = False) -> DataLoader:
    """What BatchNorm statistics are re-estimated on — by the fine-tuner (``--bn-stats recalibrate``, SWA),
    ``lpconvert collapse`` and ``lpconvert evaluate`` alike: the training images with their training augmentation
    (statistics of un-augmented images cost the shared CIFAR-10 ResNet-20 3 points), whole batches of the run's size
    in epoch 0's order of its seed. Callers take the first ``--recalibrate-batches`` (default 100)."""
    return train_loader(samples, batch_size, seed=seed, workers=workers, pin_memory=pin_memory)


# ---------------------------------------------------------------------------------------------------- provenance


def data_fingerprint(dataset_or_dir: ImageFolder | str | os.PathLike) -> dict[str, Any]:
    """``{"root", "num_files", "sha256"}``: the files of a folder, or the samples of an ImageFolder (subset
    included), and the SHA-256 of their sorted relative POSIX paths, one per line. File contents are not read."""
    if isinstance(dataset_or_dir, ImageFolder):
        root = Path(dataset_or_dir.root)
        files = [Path(path).relative_to(root).as_posix() for path, _ in dataset_or_dir.samples]
    elif isinstance(dataset_or_dir, (str, os.PathLike)):
        root = Path(dataset_or_dir)
        if not root.is_dir():
            raise LatePhaseError(f"cannot fingerprint {root}: not a directory")
        files = [
            (Path(folder) / name).relative_to(root).as_posix()
            for folder, _, names in os.walk(root)
            for name in names
        ]
    else:
        raise LatePhaseError(
            f"cannot fingerprint a {type(dataset_or_dir).__name__}; pass a directory or an ImageFolder dataset"
        )
    digest = hashlib.sha256("".join(f"{name}\n" for name in sorted(files)).encode()).hexdigest()
    return {"root": str(root), "num_files": len(files), "sha256": digest}
