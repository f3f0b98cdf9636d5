"""Locating data on disk: a root with train/ and val/ (or validation/, test/), ImageFolder trees, and tar archives.

An uncompressed ``.tar`` is read in place (:class:`TarPath`: its headers indexed once, its files read by offset); a
compressed archive is extracted safely, once, into the cache folder — ``LPCONVERT_CACHE``, else
``$XDG_CACHE_HOME/lpconvert`` or ``~/.cache/lpconvert`` (``extracted/<hash>/``)::

    train_dir, val_dir = resolve_data_dirs(data="~/data/cifar10")      # train/ + val/, dirs or archives
    splits = data_splits(data="~/data/imagenet")                        # + what val is, and test/ beside val/

Read in place, an archive gives what its extracted tree gives: a hard link is the file it links to, a symbolic link
to a file inside the tree is that file, a ``.tar`` inside it is a folder (ImageNet's per-class archives) that is a
class only where no real folders are, and a damaged archive inside it is named.
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

__all__ = ["ARCHIVE_SUFFIXES", "VAL_SPLITS", "DataSplits", "TarPath", "data_splits", "resolve_data_dirs"]

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
    quiet: bool = False,
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
    folders (``train/<class>/...``) is stepped into. ``quiet``: no progress bar while indexing or extracting.

    Example: ``resolve_data_dirs(data="cifar10")`` with ``cifar10/train.tar.gz`` and ``cifar10/test.tar.gz``.
    """
    splits = _locate(data, train_dir, val_dir, cache_dir, quiet, with_test=False)
    return splits.train, splits.val


@dataclass(frozen=True)
class DataSplits:
    """The ImageFolder roots of a data path (:func:`data_splits`): ``train``, ``val`` — the evaluation split, which
    ``evaluation`` says is a ``"validation"`` set (``val/``, ``validation/``) or a ``"test"`` set (``test/``: nothing
    may be chosen on it) — and ``test``, a test set apart (``test/`` beside ``val/`` or ``validation/``)."""

    train: Path | TarPath | None
    val: Path | TarPath | None
    evaluation: str = "validation"
    test: Path | TarPath | None = None


def data_splits(
    data: str | os.PathLike | None = None,
    train_dir: str | os.PathLike | None = None,
    val_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    quiet: bool = False,
) -> DataSplits:
    """:func:`resolve_data_dirs`'s training and evaluation roots, what the evaluation split is, and the test set
    apart from it. The evaluation split is a test set when it is ``test/`` under ``data`` (no ``val/`` or
    ``validation/`` beside it, CIFAR-10's layout) or when ``val_dir`` is a folder or archive named ``test`` (selecting
    on it would select on the test set). When it is a validation set and ``data`` also has ``test/``, that is the
    test set apart: validation chooses, the test set is measured once."""
    return _locate(data, train_dir, val_dir, cache_dir, quiet, with_test=True)


def _locate(data: str | os.PathLike | None, train_dir: str | os.PathLike | None, val_dir: str | os.PathLike | None,
            cache_dir: str | os.PathLike | None, quiet: bool, *, with_test: bool) -> DataSplits:
    """The splits of :func:`data_splits`; the test set apart only `with_test` (finding it may extract it)."""
    if data is None and train_dir is None and val_dir is None:
        raise LatePhaseError("no data given; pass --data ROOT (with train/ and val/) or --train-dir / --val-dir")
    train = _resolve_tree(train_dir, cache_dir, quiet=quiet) if train_dir is not None else None
    val = _resolve_tree(val_dir, cache_dir, quiet=quiet) if val_dir is not None else None
    evaluation = "test" if val_dir is not None and _split_name(Path(val_dir)) == "test" else "validation"
    test = None
    if data is not None:
        root = _resolve_tree(data, cache_dir, stop_at=_SPLITS, quiet=quiet)
        if train is None:
            train = _find_split(root, ("train",), cache_dir, quiet)
        if val is None:
            name = next((name for name in VAL_SPLITS if _has_split(root, name)), None)
            val = _find_split(root, VAL_SPLITS, cache_dir, quiet)
            evaluation = "test" if name == "test" else "validation"
        if train is None and val is None and train_dir is None and val_dir is None:
            raise LatePhaseError(
                f"found neither train/ nor val/ (or validation/, test/) in {data}; pass --train-dir / --val-dir for a "
                "single ImageFolder tree"
            )
        if with_test and evaluation == "validation" and _has_split(root, "test"):
            test = _find_split(root, ("test",), cache_dir, quiet)
    return DataSplits(train, val, evaluation, test)


def _split_name(path: Path) -> str:
    """The split a folder or archive is named after, lowercase, without an archive suffix."""
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.lower()


def _has_split(root: Path | TarPath, name: str) -> bool:
    return any(candidate.exists() for candidate in _split_paths(root, name))


def _find_split(root: Path | TarPath, names: Sequence[str], cache_dir: str | os.PathLike | None,
                quiet: bool) -> Path | TarPath | None:
    for name in names:
        for candidate in _split_paths(root, name):
            if candidate.exists():
                return _resolve_tree(candidate, cache_dir, quiet=quiet)
    return None


def _split_paths(root: Path | TarPath, name: str) -> list[Path | TarPath]:
    """Where split `name` may lie under `root`: a folder or an archive of that name."""
    return [root / name, *(root / f"{name}{suffix}" for suffix in ARCHIVE_SUFFIXES)]


def _resolve_tree(
    path: str | os.PathLike | TarPath, cache_dir: str | os.PathLike | None, stop_at: Sequence[str] = (), *,
    quiet: bool = False,
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
    index = _TarIndex.scan(path, quiet)
    return _step_into_single_folder(TarPath(index) if index else _extract_cached(path, cache_dir, quiet), stop_at)


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
    """Where the files of an uncompressed tar archive lie: POSIX path inside it → (offset, size) of its bytes, its
    folders, and its symbolic links. A ``.tar`` inside it (ImageNet's training archive holds one per class) is
    indexed as the folder of its name without ``.tar`` (and listed in ``archives``); a hard link as the file it links
    to, as extraction makes it; special files are left out."""

    #: Symbolic links followed in a row before a chain counts as a loop (as Linux's ELOOP).
    MAX_LINK_HOPS = 40

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.files: dict[str, tuple[int, int]] = {}
        self.folders: set[str] = {""}
        self.archives: set[str] = set()  # the folders that are .tar files inside the archive
        self.links: dict[str, str | None] = {}  # symbolic link → the path it names (None: outside the archive)

    @classmethod
    def scan(cls, archive: Path, quiet: bool = False) -> _TarIndex | None:
        """The index of `archive`, or None when it is compressed (it cannot be read in place). ``quiet``: no
        progress bar."""
        try:
            tar = tarfile.open(archive, "r:")
        except tarfile.ReadError:
            return None
        index = cls(archive)
        try:
            with tar:
                index._add(tar, 0, "", _progress(iter(tar), f"indexing {archive.name}", quiet))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise LatePhaseError(f"cannot read {archive}: {exc}; check that the archive is complete") from exc
        return index

    def _add(self, tar: tarfile.TarFile, offset: int, folder: str, members: Iterator[tarfile.TarInfo]) -> None:
        """Index `members` of `tar` (which starts at `offset` in the archive) as the contents of `folder`."""
        where = f"{self.archive}/{folder}.tar" if folder else str(self.archive)
        for member in members:
            name = _checked_name(member.name, where, "read")
            path = _joined(folder, name)
            if member.isdir():
                self._add_folder(path)
            elif member.isreg() and not member.issparse():
                self._add_folder(posixpath.dirname(path))
                if path.endswith(".tar"):
                    self._add_archive(tar, member, offset, path)
                else:
                    self.files[path] = (offset + member.offset_data, member.size)
            elif member.islnk():
                target = _joined(folder, _checked_name(member.linkname, where, "read"))
                if target not in self.files:
                    raise _dangling_hard_link(member, where, "read")
                self._add_folder(posixpath.dirname(path))
                self.files[path] = self.files[target]
            elif member.issym():
                self._add_folder(posixpath.dirname(path))
                target = _symlink_target(name, member.linkname)
                self.links[path] = None if target is None else _joined(folder, target)

    def _add_archive(self, tar: tarfile.TarFile, member: tarfile.TarInfo, offset: int, path: str) -> None:
        """Index the ``.tar`` `member` (at `path`) as the folder of its name without ``.tar``; name it if damaged."""
        if offset + member.offset_data + member.size > self.archive.stat().st_size:
            raise LatePhaseError(f"cannot read {self.archive}: it ends inside {path}; check that the archive is "
                                 "complete")
        folder = path.removesuffix(".tar")
        try:
            with tarfile.open(fileobj=tar.extractfile(member), mode="r:") as inner:
                self._add(inner, offset + member.offset_data, folder, iter(inner))
        except (tarfile.TarError, EOFError) as exc:
            raise LatePhaseError(f"cannot read {self.archive}/{path}, a tar archive inside {self.archive.name}: {exc}; "
                                 "replace it with a complete tar archive or remove it") from exc
        self._add_folder(folder)
        self.archives.add(folder)

    def _add_folder(self, path: str) -> None:
        while path not in self.folders:  # "" (the top) is always there
            self.folders.add(path)
            path = posixpath.dirname(path)

    def followed(self, link: str) -> str | None:
        """The file the symbolic link `link` leads to (through other links), or None: a folder, nowhere, outside the
        archive, a loop."""
        target = self.links[link]
        for _ in range(self.MAX_LINK_HOPS):
            if target is None or target in self.files:
                return target
            if target not in self.links:
                return None
            target = self.links[target]
        return None


def _joined(folder: str, path: str) -> str:
    return f"{folder}/{path}" if folder and path else folder or path


def _symlink_target(name: str, linkname: str) -> str | None:
    """Where the symbolic link member `name` (a checked relative path) leads, relative to the top of its archive;
    None for an absolute target or one that leaves the archive."""
    target = posixpath.normpath(posixpath.join(posixpath.dirname(name), linkname.replace("\\", "/")))
    if linkname.startswith(("/", "\\")) or target == ".." or target.startswith("../"):
        return None
    return "" if target == "." else target


@dataclass(frozen=True)
class TarPath:
    """A path inside an uncompressed tar archive read in place (like :class:`zipfile.Path`): what the data code asks
    of a :class:`~pathlib.Path` — ``name``, ``exists()``, ``is_dir()``, ``iterdir()``, ``/`` — plus :meth:`files`,
    :meth:`skipped_links` and :meth:`is_archive`. ``str()`` is the archive's path followed by the path inside it
    (``/data/imagenet.tar/train``)."""

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

    def is_archive(self) -> bool:
        """True for the folder of a ``.tar`` file inside the archive (ImageNet's per-class archives)."""
        return self.at in self.index.archives

    def exists(self) -> bool:
        return self.is_dir() or self.at in self.index.files

    def iterdir(self) -> Iterator[TarPath]:
        """The files and folders right inside this folder, in no particular order."""
        prefix = self._prefix
        names = {path[len(prefix):].split("/", 1)[0] for paths in (self.index.folders, self.index.files)
                 for path in paths if path.startswith(prefix) and len(path) > len(prefix)}
        return (self / name for name in names)

    def files(self) -> Iterator[tuple[str, tuple[int, int]]]:
        """(path relative to this folder, (offset, size) in the archive) of every file below it — a symbolic link
        to a file below this folder included, as the file it leads to (what an extracted tree gives)."""
        prefix = self._prefix
        yield from ((path[len(prefix):], place) for path, place in self.index.files.items()
                    if path.startswith(prefix))
        for link, target in self._links():
            if target is not None:
                yield link, self.index.files[target]

    def skipped_links(self) -> list[str]:
        """The symbolic links below this folder that :meth:`files` does not follow (to a folder, outside this
        folder, nowhere, into a loop), relative to it."""
        return sorted(link for link, target in self._links() if target is None)

    def _links(self) -> Iterator[tuple[str, str | None]]:
        """(path relative to this folder, the file below this folder it leads to, else None) of the symbolic links
        below it."""
        prefix = self._prefix
        for link in self.index.links:
            if link.startswith(prefix):
                target = self.index.followed(link)
                yield link[len(prefix):], target if target is not None and target.startswith(prefix) else None

    @property
    def _prefix(self) -> str:
        return f"{self.at}/" if self.at else ""


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


def _extract_cached(archive: Path, cache_dir: str | os.PathLike | None, quiet: bool = False) -> Path:
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
            members = _progress(_checked_members(tar, archive), f"extracting {archive.name}", quiet)
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


def _progress(items: Iterator[Any], description: str, quiet: bool) -> Iterator[Any]:
    """A progress bar on a terminal (stderr) unless `quiet`, nothing otherwise."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit=" files", disable=True if quiet else None, leave=False)


def _checked_members(tar: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    """Yield the members, refusing absolute paths and ``..`` in names, symbolic links that lead out of the archive,
    hard links to no earlier file, and device files."""
    seen: set[str] = set()
    for member in tar:
        name = _checked_name(member.name, archive, "extract")
        if member.issym() and _symlink_target(name, member.linkname) is None:
            raise LatePhaseError(f"refusing to extract {archive}: member {member.name!r} links to "
                                 f"{member.linkname!r}, outside the archive; repack it without that link")
        if member.islnk() and _checked_name(member.linkname, archive, "extract") not in seen:
            raise _dangling_hard_link(member, archive, "extract")
        if member.isdev():
            raise LatePhaseError(f"refusing to extract {archive}: member {member.name!r} is a device file")
        seen.add(name)
        yield member


def _dangling_hard_link(member: tarfile.TarInfo, archive: str | os.PathLike, action: str) -> LatePhaseError:
    """The error for a hard link whose target is no earlier file of the archive (extraction has nothing to link)."""
    return LatePhaseError(f"refusing to {action} {archive}: member {member.name!r} is a hard link to "
                          f"{member.linkname!r}, which is no file before it in the archive; repack the archive")


def _checked_name(name: str, archive: str | os.PathLike, action: str) -> str:
    """A member name as a relative POSIX path without ``.`` parts ("" for the top); absolute paths and ``..`` are
    refused."""
    posix = name.replace("\\", "/")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if posix.startswith("/") or ".." in parts:
        raise LatePhaseError(f"refusing to {action} {archive}: member {name!r} has an absolute path or '..'; "
                             "repack it with relative paths")
    return "/".join(parts)
