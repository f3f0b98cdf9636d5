"""Locating data on disk: a root with train/ and val/ (or validation/, test/), ImageFolder trees, and tar archives.

An uncompressed ``.tar`` is read in place (:class:`TarPath`: its headers indexed once, its files read by offset); a
compressed archive is extracted safely, once, into the cache folder — ``LPCONVERT_CACHE``, else
``$XDG_CACHE_HOME/lpconvert`` or ``~/.cache/lpconvert`` (``extracted/<hash>/``)::

    train_dir, val_dir = resolve_data_dirs(data="~/data/cifar10")      # train/ + val/, dirs or archives
"""

from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import posixpath
import shutil
import socket
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpconvert.errors import LatePhaseError

logger = logging.getLogger(__name__)

__all__ = ["ARCHIVE_SUFFIXES", "VAL_SPLITS", "TarPath", "evaluation_split", "resolve_data_dirs"]

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
VAL_SPLITS = ("val", "validation", "test")  # the validation split's names, in order of preference
_SPLITS = ("train", *VAL_SPLITS)
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no space left, disk quota exceeded
_FILTER_ERRORS = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()


def resolve_data_dirs(
    data: str | os.PathLike | None = None,
    train_dir: str | os.PathLike | None = None,
    val_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Path | TarPath | None, Path | TarPath | None]:
    """Find the training and validation ImageFolder roots: folders, trees inside uncompressed tar archives (read in
    place), or compressed archives extracted once into a cache.

    ``data`` is a root with the ImageNet layout: ``train`` plus the first of ``val``, ``validation``, ``test``
    (:data:`VAL_SPLITS`), each a folder or an archive (``train.tar``, ``val.tar.gz`` ...); ``data`` may itself be an
    archive of such a root. ``train_dir`` / ``val_dir`` name one ImageFolder tree (or archive) each and take
    precedence. A part that is not found is returned as ``None``; callers decide which they need.

    An uncompressed ``.tar`` is read in place: a :class:`TarPath` into it is returned, nothing is written. Compressed
    archives (``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) are extracted safely and atomically to
    ``<cache>/extracted/<hash of path, size and mtime>``, where ``<cache>`` is ``cache_dir``, else the environment
    variable ``LPCONVERT_CACHE``, else ``$XDG_CACHE_HOME/lpconvert`` or ``~/.cache/lpconvert`` (:func:`cache_root`).
    In both, a single top-level folder that holds only
    folders (``train/<class>/...``) is stepped into.

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
            val = _find_split(root, VAL_SPLITS, cache_dir)
        if train is None and val is None and train_dir is None and val_dir is None:
            raise LatePhaseError(
                f"found neither train/ nor val/ (or validation/, test/) in {data}; pass --train-dir / --val-dir for a "
                "single ImageFolder tree"
            )
    return train, val


def evaluation_split(data: str | os.PathLike | None, val_dir: str | os.PathLike | None = None, *,
                     cache_dir: str | os.PathLike | None = None) -> str:
    """``"validation"`` or ``"test"``: what the evaluation images :func:`resolve_data_dirs` finds are, by the split's
    name: ``val/`` and ``validation/`` are validation sets, ``test/`` is a test set (CIFAR-10's layout) — under
    ``--data``, or as ``--val-dir`` itself (a folder or archive named ``test``: selecting on it would select on the
    test set)."""
    if val_dir is not None:
        name = Path(val_dir).name
        for suffix in ARCHIVE_SUFFIXES:
            name = name.removesuffix(suffix)
        return "test" if name.lower() == "test" else "validation"
    if data is None:
        return "validation"
    root = _resolve_tree(data, cache_dir, stop_at=_SPLITS)
    for name in VAL_SPLITS:
        if any(candidate.exists() for candidate in _split_paths(root, name)):
            return "test" if name == "test" else "validation"
    return "validation"


def _find_split(root: Path | TarPath, names: Sequence[str],
                cache_dir: str | os.PathLike | None) -> Path | TarPath | None:
    for name in names:
        for candidate in _split_paths(root, name):
            if candidate.exists():
                return _resolve_tree(candidate, cache_dir)
    return None


def _split_paths(root: Path | TarPath, name: str) -> list[Path | TarPath]:
    """Where split `name` may lie under `root`: a folder or an archive of that name."""
    return [root / name, *(root / f"{name}{suffix}" for suffix in ARCHIVE_SUFFIXES)]


def _resolve_tree(
    path: str | os.PathLike | TarPath, cache_dir: str | os.PathLike | None, stop_at: Sequence[str] = ()
) -> Path | TarPath:
    """A folder as it is; an uncompressed tar archive read in place, a compressed one extracted into the cache —
    stepping into a single top folder unless it holds one of ``stop_at`` (folder or archive names)."""
    if isinstance(path, TarPath):
        if not path.is_dir():
            raise LatePhaseError(f"{path} is an archive inside the uncompressed archive {path.index.archive}; only "
                                 "folders and .tar files inside it are read in place: extract it and pass the folder")
        return path
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
    index = _TarIndex.scan(path)
    return _step_into_single_folder(TarPath(index) if index else _extract_cached(path, cache_dir), stop_at)


def _step_into_single_folder(root: Path | TarPath, stop_at: Sequence[str]) -> Path | TarPath:
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


# ------------------------------------------------------------------------------------- uncompressed tar, in place


class _TarIndex:
    """Where the files of an uncompressed tar archive lie: POSIX path inside it → (offset, size) of its bytes, and
    its folders. A ``.tar`` inside it (ImageNet's training archive holds one per class) is indexed as the folder of
    its name without ``.tar``; links and special files are left out."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.files: dict[str, tuple[int, int]] = {}
        self.folders: set[str] = {""}

    @classmethod
    def scan(cls, archive: Path) -> _TarIndex | None:
        """The index of `archive`, or None when it is compressed (it cannot be read in place)."""
        try:
            tar = tarfile.open(archive, "r:")
        except tarfile.ReadError:
            return None
        index = cls(archive)
        try:
            with tar:
                index._add(tar, 0, "", _progress(iter(tar), f"indexing {archive.name}"))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise LatePhaseError(f"cannot read {archive}: {exc}; check that the archive is complete") from exc
        return index

    def _add(self, tar: tarfile.TarFile, offset: int, folder: str, members: Iterator[tarfile.TarInfo]) -> None:
        """Index `members` of `tar` (which starts at `offset` in the archive) as the contents of `folder`."""
        for member in members:
            path = "/".join(part for part in (folder, _checked_name(member.name, self.archive, "read")) if part)
            if member.isdir():
                self._add_folder(path)
            elif member.isreg() and not member.issparse():
                self._add_folder(posixpath.dirname(path))
                if path.endswith(".tar"):
                    with tarfile.open(fileobj=tar.extractfile(member), mode="r:") as inner:
                        self._add(inner, offset + member.offset_data, path.removesuffix(".tar"), iter(inner))
                else:
                    self.files[path] = (offset + member.offset_data, member.size)

    def _add_folder(self, path: str) -> None:
        while path not in self.folders:  # "" (the top) is always there
            self.folders.add(path)
            path = posixpath.dirname(path)


@dataclass(frozen=True)
class TarPath:
    """A path inside an uncompressed tar archive read in place (like :class:`zipfile.Path`): what the data code asks
    of a :class:`~pathlib.Path` — ``name``, ``exists()``, ``is_dir()``, ``iterdir()``, ``/`` — plus :meth:`files`.
    ``str()`` is the archive's path followed by the path inside it (``/data/imagenet.tar/train``)."""

    index: _TarIndex = field(repr=False)
    at: str = ""  # POSIX path inside the archive; "" is its top

    @property
    def name(self) -> str:
        return posixpath.basename(self.at) if self.at else self.index.archive.name

    def __truediv__(self, name: str) -> TarPath:
        return TarPath(self.index, f"{self.at}/{name}" if self.at else name)

    def __str__(self) -> str:
        return f"{self.index.archive}/{self.at}" if self.at else str(self.index.archive)

    def __repr__(self) -> str:
        return f"TarPath({str(self)!r})"

    def is_dir(self) -> bool:
        return self.at in self.index.folders

    def exists(self) -> bool:
        return self.is_dir() or self.at in self.index.files

    def iterdir(self) -> Iterator[TarPath]:
        """The files and folders right inside this folder, in no particular order."""
        prefix = f"{self.at}/" if self.at else ""
        names = {path[len(prefix):].split("/", 1)[0] for paths in (self.index.folders, self.index.files)
                 for path in paths if path.startswith(prefix) and len(path) > len(prefix)}
        return (self / name for name in names)

    def files(self) -> Iterator[tuple[str, tuple[int, int]]]:
        """(path relative to this folder, (offset, size) in the archive) of every file below it."""
        prefix = f"{self.at}/" if self.at else ""
        return ((path[len(prefix):], place) for path, place in self.index.files.items() if path.startswith(prefix))


# ------------------------------------------------------------------------------------ compressed tar, extracted


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """lpconvert's cache folder: `cache_dir`, else ``LPCONVERT_CACHE``, else ``$XDG_CACHE_HOME/lpconvert``, else
    ``~/.cache/lpconvert``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    if os.environ.get("LPCONVERT_CACHE"):
        return Path(os.environ["LPCONVERT_CACHE"]).expanduser().absolute()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser().absolute() / "lpconvert"
    return Path.home() / ".cache" / "lpconvert"


def _extract_cached(archive: Path, cache_dir: str | os.PathLike | None) -> Path:
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    parent = cache_root(cache_dir) / "extracted"
    target = parent / key
    prefix = f".{key}-{socket.gethostname()}-"  # + pid: an extraction in progress is ".<key>-<host>-<pid>-XXXX"
    _remove_abandoned(parent, prefix)
    if target.is_dir():
        return target
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
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
    except OSError as exc:
        if exc.errno in _DISK_FULL:  # the cache's disk, not the archive
            raise LatePhaseError(
                f"cannot extract {archive.name}: the disk of the cache folder {parent} is full "
                f"({os.strerror(exc.errno)}); free space there or set LPCONVERT_CACHE to a folder on a larger disk"
            ) from exc
        raise LatePhaseError(f"cannot extract {archive}: {exc}; check that the archive is complete") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise LatePhaseError(f"cannot extract {archive}: {exc}; check that the archive is complete") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove the partial extractions ``<prefix><pid>-XXXX`` in `parent` whose process is gone (killed mid-way)."""
    for partial in parent.glob(f"{glob.escape(prefix)}*-*"):
        pid = partial.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            logger.info("removing %s, an extraction that was interrupted", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _progress(items: Iterator[Any], description: str) -> Iterator[Any]:
    """A progress bar on a terminal (stderr), nothing otherwise."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit=" files", disable=None, leave=False)


def _checked_members(tar: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    """Yield the members, refusing absolute paths and ``..`` (in names and link targets) and device files."""
    for member in tar:
        _checked_name(member.name, archive, "extract")
        if member.issym() or member.islnk():
            _checked_name(member.linkname, archive, "extract")
        if member.isdev():
            raise LatePhaseError(f"refusing to extract {archive}: member {member.name!r} is a device file")
        yield member


def _checked_name(name: str, archive: Path, action: str) -> str:
    """A member name as a relative POSIX path without ``.`` parts ("" for the top); absolute paths and ``..`` are
    refused."""
    posix = name.replace("\\", "/")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if posix.startswith("/") or ".." in parts:
        raise LatePhaseError(f"refusing to {action} {archive}: member {name!r} has an absolute path or '..'; "
                             "repack it with relative paths")
    return "/".join(parts)
