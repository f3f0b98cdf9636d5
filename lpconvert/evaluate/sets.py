"""The sets ``lpconvert evaluate`` measures on: the evaluation split of the data, named OOD sets, corrupted copies of
the evaluation images (generated or published) and the held-out images a temperature is fitted on; and the defaults
behind its options (data-loading workers, OOD set names)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Subset

from lpconvert.data import (
    ARCHIVE_SUFFIXES,
    DIGITS,
    VAL_SPLITS,
    Source,
    build_datasets,
    build_transform,
    digits_datasets,
    resolve_data_dirs,
    stratified_indices,
)
from lpconvert.data.archives import data_splits
from lpconvert.data.hfds import hub_sources
from lpconvert.data.settings import DataSettings
from lpconvert.data.transforms import data_config
from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.corruptions import CorruptedSet, check_names, directory_sets, generated_sets
from lpconvert.train.distributed import local_main_first
from lpconvert.train.runtime import Runtime

__all__ = ["Extras", "Sets", "default_workers", "eval_set", "ood_names", "splits"]

logger = logging.getLogger("lpconvert.evaluate.command")


def splits(data: str | None, dataset: str | None) -> tuple[Source | None, Source]:
    """The (training, evaluation) splits of ``--dataset hfds/NAME`` or of a data root — the evaluation split being
    the test set when the data has one (``test/`` or a ``test`` split, beside a validation split or alone), else the
    first of val, validation — both `data` itself when it is one ImageFolder tree (a folder or a tar archive)."""
    if data == DIGITS:  # scikit-learn's digits, as `lpconvert finetune --data sklearn-digits` splits them
        return DIGITS, DIGITS
    if dataset is not None:
        train, val, test = hub_sources(dataset)
    else:
        try:
            found = data_splits(data=data)
        except LatePhaseError:  # not a root with train/ and val/: a single tree (or an archive of one)
            tree = resolve_data_dirs(val_dir=data)[1]
            return tree, tree
        train, val, test = found.train, found.val, found.test
    val = test or val
    if val is None:
        raise LatePhaseError(f"no val, validation or test split in {dataset or data}; pass data with one")
    return train, val


def eval_set(model: nn.Module, data: str | Source, *, subset: int | None, batch_size: int, workers: int,
             num_classes: int | None, settings: DataSettings | None = None) -> DataLoader:
    """Evaluation-transform loader over a split, or over the validation split of the data path `data`: the model's
    timm data config with the input size and crop of `settings` (a run's, :attr:`~lpconvert.run.saved.SavedRun.data`;
    default the model's own), labels by its class map (default ``"auto"``) — not matched to a head without
    `num_classes` (an OOD set)."""
    if data == DIGITS:  # the test split that `lpconvert finetune --data sklearn-digits` validates on
        digits = digits_datasets()[1]
        if subset is not None:
            digits = Subset(digits, stratified_indices(digits.tensors[1].tolist(), subset, 0))
        return DataLoader(digits, batch_size=batch_size, shuffle=False, num_workers=workers)
    settings = settings or DataSettings()
    source = splits(data, None)[1] if isinstance(data, str) else data
    _, dataset = build_datasets(None, source, data_config=data_config(model, settings), num_classes=num_classes,
                                class_map=settings.labels if num_classes else "auto", val_subset=subset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)




# ------------------------------------------------------------------------------------------------------- options


def default_workers(processes_on_node: int = 1) -> int:
    """Data-loading worker processes when ``--workers`` is not given: one less than this process's share of the CPUs
    it may use (``os.sched_getaffinity``; the main process runs the model), at most 4 — so never more than torch's
    suggested maximum, and its "… worker processes … suggested max number of worker" warning never shows."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, available // max(processes_on_node, 1) - 1))


def _default_name(path: str) -> str:
    """An OOD set's name from its path: the file or folder name without archive suffixes, or the folder above it when
    that is a split's name (``data/cifar100/test.tar.gz`` → ``cifar100``)."""
    full = Path(os.path.abspath(os.path.expanduser(path)))
    name = full.name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.lower() in ("train", *VAL_SPLITS) and full.parent.name:
        name = full.parent.name
    return name or path


def ood_names(specs: Sequence[str]) -> dict[str, str]:
    """{name: path} of ``--ood`` values, each ``NAME=PATH`` or ``PATH``, in the order given. A path's default name is
    its file or folder name without archive suffixes or, when that is a split's name (train, val, validation, test),
    the name of the folder holding it (``../data/cifar100/test.tar.gz`` → ``cifar100``); default names that collide
    get ``-2``, ``-3``, …; a NAME given twice is refused."""
    parsed: list[tuple[str | None, str]] = []
    for spec in map(str, specs):
        name, _, path = spec.partition("=")
        explicit = bool(path and name) and "/" not in name and os.sep not in name and not Path(spec).exists()
        parsed.append((name, path) if explicit else (None, spec))
    given = [name for name, _ in parsed if name is not None]
    for name in given:
        if given.count(name) > 1 or name == "mean":
            reason = "is given twice" if name != "mean" else "is reserved for the mean over the sets"
            raise LatePhaseError(f"--ood name {name!r} {reason}; give each OOD set its own NAME=PATH")
    named: dict[str, str] = {}
    for name, path in parsed:
        if name is None:
            base = _default_name(path)
            name, n = base, 1
            while name in named or name in given or name == "mean":
                n += 1
                name = f"{base}-{n}"
        named[name] = path
    return named




@dataclass
class Extras:
    """What ensembles are for: corruptions (generated or published) and temperature scaling on held-out images."""

    corruptions: bool = False
    corruption_dir: str | None = None
    corruption_types: Sequence[str] | None = None
    severities: Sequence[int] | None = None
    reference: str | None = None
    reference_weights: str | None = None
    calibration_split: float | None = None
    calibration_data: str | None = None
    calibration_on_train: bool = False

    def __post_init__(self) -> None:
        corrupted = self.corruptions or self.corruption_dir is not None
        problems = [
            (not (self.corruptions and self.corruption_dir is not None),
             "pass --corruptions (generate them) or --corruption-dir DIR (published sets), not both"),
            (corrupted or not (self.corruption_types or self.severities or self.reference),
             "--corruption-types, --severities and --reference need --corruptions or --corruption-dir"),
            (self.reference_weights is None or self.reference is not None, "--reference-weights needs --reference"),
            (self.calibration_split is None or self.calibration_data is None,
             "pass --calibration-split F (fit on part of the evaluation set) or --calibration-data PATH, not both"),
            (self.calibration_split is None or 0 < self.calibration_split < 1,
             f"--calibration-split is the fraction of the evaluation images that fit the temperature, in (0, 1), "
             f"got {self.calibration_split}"),
            (not self.calibration_on_train or self.calibration_data is not None,
             "--calibration-on-train goes with --calibration-data train"),
        ]
        for ok, message in problems:
            if not ok:
                raise LatePhaseError(message)
        if corrupted:
            self.corruption_types, self.severities = check_names(self.corruption_types, self.severities)

    @property
    def corrupted(self) -> bool:
        return self.corruptions or self.corruption_dir is not None

    @property
    def calibrated(self) -> bool:
        return self.calibration_split is not None or self.calibration_data is not None




# ------------------------------------------------------------------------------------------------------ the sets


class Sets:
    """The evaluation sets of one run of the command, built once per preprocessing (a reference model may have its
    own) and, under torchrun, prepared by each node's local rank 0 first."""

    def __init__(self, runtime: Runtime, val_split: Any, train: Any, data: str | None, extras: Extras, *,
                 subset: int | None, batch_size: int, workers: int, settings: DataSettings) -> None:
        self.runtime, self.val_split, self.train, self.data, self.extras = runtime, val_split, train, data, extras
        self.subset, self.batch_size, self.workers, self.settings = subset, batch_size, workers, settings
        self._corrupted: dict[str, list[CorruptedSet]] = {}

    def loader(self, model: nn.Module, split: Any, subset: int | None, num_classes: int | None = None, *,
               own: bool = True) -> DataLoader:
        """`split` read for `model`: as the evaluated source reads images, or (not `own`: a reference model) at the
        model's own input size and crop, with the source's labels."""
        settings = self.settings if own else DataSettings(class_map=self.settings.class_map)
        with local_main_first(self.runtime):
            return eval_set(model, split, subset=subset, batch_size=self.batch_size, workers=self.workers,
                            num_classes=num_classes, settings=settings)

    def corrupted(self, model: nn.Module, val: DataLoader, *, own: bool = True) -> list[CorruptedSet]:
        """The corrupted sets for `model`'s preprocessing (`val`: its clean evaluation loader; `own` as in
        :meth:`loader`)."""
        config = data_config(model, self.settings if own else DataSettings())
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in self._corrupted:
            extras = self.extras
            with local_main_first(self.runtime):
                if extras.corruptions:
                    sets, info = generated_sets(val.dataset, getattr(val.dataset, "transform", None),
                                                types=extras.corruption_types, severities=extras.severities,
                                                workers=self.workers, batch_size=self.batch_size)
                    if info["seconds"]:
                        logger.info("corrupted %d image(s) %d way(s) in %.0f s (%s)", info["images"], len(sets),
                                    info["seconds"], info["cache"])
                else:
                    sets = directory_sets(extras.corruption_dir, build_transform(config, train=False),
                                          data_config=config, num_classes=getattr(model, "num_classes", None),
                                          class_map=self.settings.labels, types=extras.corruption_types,
                                          severities=extras.severities, subset=self.subset)
            self._corrupted[key] = sets
        return self._corrupted[key]

    def calibration(self, model: nn.Module, val: DataLoader) -> DataLoader | None:
        """The images ``--calibration-data`` fits the temperature on (None with ``--calibration-split``)."""
        path = self.extras.calibration_data
        if path is None:
            return None
        num_classes = getattr(model, "num_classes", None)
        if path != "train" and self.data != DIGITS and _same(path, self.val_split):
            raise LatePhaseError(f"--calibration-data {path} is the evaluation split itself; fitting and reporting on "
                                 "the same images flatters the temperature: use --calibration-split F instead")
        train = self.train if self.train == DIGITS or self.train is not self.val_split else None  # not one tree
        if path == "train" or (train not in (None, DIGITS) and _same(path, train)):
            if not self.extras.calibration_on_train:
                raise LatePhaseError(
                    f"--calibration-data {path} is the training split: a temperature fitted on images the model "
                    "trained on comes out too low (it learns how well they were memorised, not the test error); fit "
                    "on held-out images (--calibration-split F of the evaluation set) or add --calibration-on-train "
                    "to do it anyway")
            if train is None:
                raise LatePhaseError(f"--calibration-data train: {self.data} has no train split")
            size = len(val.dataset)
            if train == DIGITS:
                digits = digits_datasets()[0]
                digits = Subset(digits, stratified_indices(digits.tensors[1].tolist(), size, 0))
                return DataLoader(digits, batch_size=self.batch_size, shuffle=False, num_workers=self.workers)
            return self.loader(model, train, size, num_classes)
        return self.loader(model, path, self.subset, num_classes)


def _same(path: str, split: Any) -> bool:
    """Whether `path` (a tree, an archive or a root) resolves to the split `split`."""
    try:
        return str(splits(path, None)[1]) == str(split)
    except LatePhaseError:
        return False


