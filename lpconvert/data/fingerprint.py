"""Provenance of a run's data: the fingerprint of each split (which files or rows, never their contents) and what
it says about how the run validated."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import TensorDataset
from torchvision.datasets import ImageFolder

from lpconvert.data.hfds import HubImages
from lpconvert.data.settings import DIGITS
from lpconvert.errors import LatePhaseError

__all__ = ["data_fingerprint", "digits_fingerprint", "validated_on_held_out"]


def validated_on_held_out(fingerprint: Mapping[str, Any] | None) -> bool:
    """Whether the run with this data fingerprint validated on images held out of its training split (``--val-split``):
    recorded as ``val.held_out`` since runs may have a test set beside a validation split; before, a test set in the
    fingerprint meant a hold-out."""
    fingerprint = fingerprint or {}
    return bool((fingerprint.get("val") or {}).get("held_out", "test" in fingerprint))


def data_fingerprint(dataset_or_dir: ImageFolder | HubImages | str | os.PathLike) -> dict[str, Any]:
    """``{"root", "num_files", "sha256"}``: the files of a folder, or the samples of an ImageFolder (subset
    included; a tree inside a tar archive gives the same as the extracted tree), and the SHA-256 of their sorted
    relative POSIX paths, one per line. File contents are not read. A Hugging Face split (:class:`HubImages`) gives
    ``{"root": "hfds/NAME", "split", "num_files", "sha256"}``, the SHA-256 of its data's version (the datasets
    library's fingerprint) and the rows used."""
    if isinstance(dataset_or_dir, HubImages):
        split, rows = dataset_or_dir.split, [str(row) for row, _ in dataset_or_dir.samples]
        return {"root": split.dataset, "split": split.split, "num_files": len(rows),
                "sha256": _sha256_lines([split.version, *rows])}
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
            f"cannot fingerprint a {type(dataset_or_dir).__name__}; pass a directory or a dataset of build_datasets"
        )
    return {"root": str(root), "num_files": len(files), "sha256": _sha256_lines(sorted(files))}


def _sha256_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


def digits_fingerprint(train: TensorDataset, val: TensorDataset, test: TensorDataset | None = None, *,
                        val_role: str = "held-out") -> dict[str, Any]:
    """The digits' sizes, in all and per split (the model card names each figure's image count)."""
    parts = {"train": train, "val": val, **({"test": test} if test is not None else {})}
    splits: dict[str, dict[str, Any]] = {name: {"num_files": len(part)} for name, part in parts.items()}
    if val_role == "test":
        splits["val"]["split"] = "test"
    if test is not None:
        splits["val"]["held_out"] = True
    return {"dataset": DIGITS, "num_files": sum(len(part) for part in parts.values()), **splits}
