"""Locating data on disk: a root with train/ and val/ (or test/), ImageFolder trees, and tar archives of them.

Archives are extracted safely, once, into the cache folder — ``LPCONVERT_CACHE``, else ``~/.cache/lpconvert``
(``extracted/<hash>/``)::

    train_dir, val_dir = resolve_data_dirs(data="~/data/cifar10")      # train/ + val/ (or test/), dirs or archives
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from lpconvert.errors import LatePhaseError

logger = logging.getLogger(__name__)

__all__ = ["ARCHIVE_SUFFIXES", "resolve_data_dirs"]

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_SPLITS = ("train", "val", "test")
_FILTER_ERRORS = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()


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
