"""The data section of a run's settings: everything :func:`~lpconvert.data.build_data` reads, and nothing else.

A run's full settings (:class:`lpconvert.config.FinetuneConfig`) keep these under their flag names (``--data``,
``--img-size``, …); :attr:`~lpconvert.config.FinetuneConfig.data_settings` is this section of them, so the data
package never sees the fine-tuning settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DIGITS", "DataSettings"]

#: ``--data`` value of the built-in real data set: scikit-learn's handwritten digits (the offline demo).
DIGITS = "sklearn-digits"


@dataclass(frozen=True)
class DataSettings:
    """Where the images come from and how they are read, split and preprocessed.

    Sources: ``data`` (a root with train/ and val/, validation/ or test/; folders or archives; or
    ``sklearn-digits``), ``train_dir`` / ``val_dir``, or ``dataset`` (``hfds/NAME``). Labels follow ``class_map``
    (None: ``"auto"``; a text file; or the class names in label order, as a published model records them).
    ``val_split`` of the training images are held out (stratified with ``subset_seed``) when the evaluation split is
    a test set; ``train_subset`` / ``val_subset`` stratified subsets. The model's preprocessing is overridden by
    ``input_size`` (C H W) or ``img_size`` and ``crop_pct``; ``train_transform`` picks the augmentation, seeded per
    (``seed``, epoch, sample). ``data_in_memory`` and ``workers`` say how images are decoded."""

    data: str | None = None
    train_dir: str | None = None
    val_dir: str | None = None
    dataset: str | None = None
    class_map: str | tuple[str, ...] | None = None
    train_subset: int | None = None
    val_subset: int | None = None
    val_split: float = 0.1
    subset_seed: int = 0
    input_size: tuple[int, ...] = ()
    img_size: int | None = None
    crop_pct: float | None = None
    train_transform: str = "auto"
    data_in_memory: str = "auto"
    workers: int = 4
    seed: int = 0

    @classmethod
    def of(cls, settings: Any) -> DataSettings:
        """The data section of any settings object that has these fields by name (a run's configuration)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    def on(self, source: str) -> DataSettings:
        """The same settings read from another place: `source` is a data root, one tree or archive, or
        ``hfds/NAME`` (the run's own ``--train-dir`` / ``--val-dir`` are dropped)."""
        hub = str(source).startswith("hfds/")
        return dataclasses.replace(self, data=None if hub else str(source), dataset=str(source) if hub else None,
                                   train_dir=None, val_dir=None)

    def replace(self, **changes: Any) -> DataSettings:
        """A copy with `changes` (e.g. ``workers=0``)."""
        return dataclasses.replace(self, **changes)

    @property
    def labels(self) -> str | Sequence[str]:
        """The class map :func:`~lpconvert.data.labels.class_to_index` takes (``"auto"`` when none was given)."""
        return self.class_map or "auto"
