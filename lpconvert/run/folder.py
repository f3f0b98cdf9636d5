"""The run directory (``lpconvert finetune --output RUN``): its layout, its lock, its creation and completion.

::

    RUN/.lpconvert-run         marker: lpconvert made this folder, what it replaces, the manifest of its files
    RUN/.lock                  held (flock) by the one process writing the run; pid and host inside
    RUN/config.json            every setting
    RUN/metrics.jsonl          epoch 0 = the start, then one row per epoch
    RUN/checkpoints/last.pt    RunCheckpoint: all K members, optimizer states, position, history (best.pt alike)
    RUN/model/                 the collapsed model (lpconvert.publish.model_folder.save_pretrained)
    RUN/report.json, RUN/curves.png

Rules (besides :mod:`lpconvert.run.ownership`'s, which every output folder follows):

* **One writer.** A run is written by the process holding its lock; a second one is refused with the holder's pid
  and host. The lock dies with its process, so a crash never blocks ``--resume``.
* **Validate, then create.** The fine-tuner calls :func:`create_run` only after the settings, model, weights, data,
  conversion, device and Hub target were checked: a failure before leaves the disk as it was.
* **Replace after success.** A replacement run is built at ``RUN.replacing`` and swapped in by :meth:`RunDir.finish`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from lpconvert.errors import LatePhaseError
from lpconvert.files import atomic_write_bytes, atomic_write_json
from lpconvert.run.ownership import (
    LOCK,
    MARKER,
    REPLACING,
    check_replaceable,
    first_foreign,
    manifest_of,
    recognise,
    swap_into_place,
)
from lpconvert.train.state import RunCheckpoint

# ---------------------------------------------------------------------------------------------------------------------
# One writer per run


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock``, released when the process ends (or :meth:`release`); the holder's pid
    and host are written inside, for the refusal of a second writer. Where there is no ``fcntl`` (Windows) the lock is
    the ``filelock`` package's — whose every attempt truncates the file, so it cannot carry the holder's name."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self._fd: int | None = None
        self._portable: Any = None

    def acquire(self, flag: str = "--output") -> RunLock:
        try:
            import fcntl
        except ImportError:  # Windows
            import filelock

            self._portable = filelock.FileLock(self.path)
            try:
                self._portable.acquire(timeout=0)
            except filelock.Timeout:
                raise LatePhaseError(f"{self.path.parent} is being written by another process; wait for it to "
                                     f"finish, or choose another {flag}") from None
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise LatePhaseError(
                    f"{self.path.parent} is being written by {holder}; wait for it to finish, or choose another {flag}"
                ) from None
            try:  # the holder removed the lock file (or its folder was swapped) as we opened it: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Drop the lock; with `remove`, also delete the lock file if it is still this lock's."""
        if self._portable is not None:
            self._portable.release()
            self._portable = None
        if self._fd is not None:
            if remove:
                with contextlib.suppress(OSError):
                    if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                        os.unlink(self.path)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


# ---------------------------------------------------------------------------------------------------------------------
# The run directory


@dataclass
class RunDir:
    """An open run directory: its paths, its writers, and the lock this process holds on it."""

    path: Path
    replaces: Path | None = None
    lock: RunLock | None = None

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def report_path(self) -> Path:
        return self.path / "report.json"

    @property
    def curves_path(self) -> Path:
        return self.path / "curves.png"

    def checkpoint_path(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    @property
    def final_path(self) -> Path:
        """Where the run will be when it is complete (the folder it replaces, if any)."""
        return self.replaces or self.path

    def save_checkpoint(self, checkpoint: RunCheckpoint, name: str) -> Path:
        return checkpoint.save(self.checkpoint_path(name))

    def write_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        """metrics.jsonl, rewritten atomically from the history (a resumed run never repeats a row)."""
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(row) + "\n" for row in rows).encode())

    def write_report(self, report: dict[str, Any]) -> None:
        atomic_write_json(self.report_path, report)

    def finish(self) -> Path:
        """The run is complete: a replacement now takes the place of the folder it replaces. Returns the path."""
        if self.replaces is None:
            self._record_manifest(replaces=True)
            return self.path
        target = self.replaces
        old_lock = RunLock(target).acquire() if recognise(target) == "run" else None
        try:
            self._record_manifest(replaces=False)
            swap_into_place(self.path, target)
        finally:
            if old_lock is not None:
                old_lock.release()
        self.path, self.replaces = target, None
        return target

    def _record_manifest(self, replaces: bool) -> None:
        """The run is complete: its marker lists every file it holds, with its size (``model/`` has its own)."""
        marker = json.loads((self.path / MARKER).read_text())
        if not replaces:
            marker.pop("replaces", None)
        marker["files"] = {rel: size for rel, size in manifest_of(self.path, frozenset({MARKER})).items()
                           if not rel.startswith("model/")}
        atomic_write_json(self.path / MARKER, marker)

    def restart(self) -> None:
        """Back to what :func:`create_run` made (marker, lock, config.json): for a run that stopped before its first
        checkpoint, all it wrote since (metrics.jsonl, logs, a partial checkpoint) cannot be continued. Only files
        lpconvert writes in a run are removed: with any other file there it refuses, naming it."""
        foreign = first_foreign(self.path, "run")
        if foreign is not None:
            raise LatePhaseError(f"--resume {self.path}: {self.path / foreign} is not a file lpconvert wrote, and "
                                 "restarting the run would remove what is there; move it out first")
        for entry in self.path.iterdir():
            if entry.name in (MARKER, LOCK, "config.json"):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def prepare_run(path: Path, force: bool) -> bool:
    """Check, writing nothing, that a new run may be made at `path`; True when it will replace an old run."""
    replacing = check_replaceable(path, "run", "--output", force)
    if replacing:
        RunLock(path).acquire().release()  # refused now, not after training, if another process writes it
    building = _building_path(path) if replacing else path
    if replacing and building.exists() and recognise(building) != "run":
        raise LatePhaseError(f"{building} is in the way of the replacement and was not made by lpconvert; move it")
    return replacing


def create_run(path: Path, config: dict[str, Any], replacing: bool) -> RunDir:
    """Make the run directory (after validation!): marker, lock, config.json. A replacement is built at
    ``PATH.replacing`` and swapped in by :meth:`RunDir.finish`."""
    building = _building_path(path) if replacing else path
    if replacing and building.exists():  # an earlier replacement that never finished: ours, and superseded
        RunLock(building).acquire().release()
        shutil.rmtree(building)
    building.mkdir(parents=True, exist_ok=True)
    lock = RunLock(building).acquire()
    try:
        if {e.name for e in building.iterdir()} - {LOCK}:
            raise LatePhaseError(f"--output {building} was filled by someone else meanwhile; choose another --output")
        marker = {"kind": "run", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if replacing:
            marker["replaces"] = str(path.resolve())
        atomic_write_json(building / "config.json", config)
        # the manifest: what lpconvert wrote here (sizes); completed by RunDir.finish, cleared while a run is resumed
        marker["files"] = {"config.json": (building / "config.json").stat().st_size}
        atomic_write_json(building / MARKER, marker)
    except BaseException:
        lock.release()
        raise
    return RunDir(building, path.resolve() if replacing else None, lock)


def trained_epochs(path: Path) -> int:
    """How many epochs a run directory's metrics.jsonl records beyond the start (0 when it has none)."""
    try:
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return 0
    return max((int(r.get("epoch", 0)) for r in rows if isinstance(r, dict)), default=0)


def check_continuable(path: Path, force: bool) -> None:
    """Refuse, changing nothing, to restart a run that trained epochs but lost ``checkpoints/last.pt``: only a run
    that stopped before its first checkpoint starts again by itself; with `force` any run does."""
    if force or (path / "checkpoints" / "last.pt").is_file():
        return
    epochs = trained_epochs(path)
    if epochs or (path / "report.json").is_file():
        raise LatePhaseError(f"--resume {path}: the run trained {epochs} epoch(s) but checkpoints/last.pt is gone, so "
                             "it cannot continue; add --force to start it over from epoch 0 (replacing its metrics and "
                             "model), or start a new run with another --output")


def open_run(path: Path) -> RunDir:
    """An existing run directory, to resume: recognised, and locked by this process. A run that stopped before its
    first checkpoint (``checkpoints/last.pt``) is resumed by starting it again: see :meth:`RunDir.restart`."""
    if not (path / MARKER).is_file() and not (path / "checkpoints" / "last.pt").is_file():
        raise LatePhaseError(f"{path} is not an lpconvert run directory (no checkpoints/last.pt); cannot resume")
    if not (path / "checkpoints" / "last.pt").is_file() and not (path / "config.json").is_file():
        raise LatePhaseError(f"{path} stopped before it saved its settings (no config.json); start it again with "
                             "the same flags and --force")
    replaces = None
    lock = RunLock(path).acquire()
    with contextlib.suppress(OSError, ValueError, AttributeError):
        marker = json.loads((path / MARKER).read_text())
        replaces = marker.get("replaces")
        if isinstance(marker.get("files"), dict):  # its files change again: listed anew when it is complete
            marker["files"] = {}
            atomic_write_json(path / MARKER, marker)
    return RunDir(path, Path(replaces) if replaces else None, lock)


@contextlib.contextmanager
def output_lock(folder: Path, flag: str = "--out") -> Iterator[RunLock]:
    """Hold `folder`'s lock (:class:`RunLock`, as a run's) while a command writes it, creating the folder if absent:
    a second writer is refused with the holder's pid and host. On failure what this made is removed again."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    had_lock = (folder / LOCK).exists()
    try:
        lock = RunLock(folder).acquire(flag)
    except BaseException:
        _remove_empty(missing)
        raise
    try:
        yield lock
    finally:
        lock.release(remove=not had_lock)
        _remove_empty(missing)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _building_path(path: Path) -> Path:
    return path.with_name(path.name + REPLACING)


# ---------------------------------------------------------------------------------------------------------------------
# Reading a run


def checkpoint_file(path: Path, which: str = "best") -> Path:
    """The checkpoint of a run directory (``checkpoints/best.pt``, else ``last.pt``), or `path` itself (a .pt)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in (which, "last"):
            candidate = path / "checkpoints" / f"{name}.pt"
            if candidate.is_file():
                return candidate
        raise LatePhaseError(f"{path} is not an lpconvert run directory (no checkpoints/{which}.pt)")
    return path


def exported_checkpoint(path: str | Path) -> str:
    """Which checkpoint of a run directory its model folder was exported from: ``best`` or ``last`` as its
    report.json says (a run without a validation set has no ``best``), else ``best`` (a file: itself)."""
    try:
        chosen = json.loads((Path(path).expanduser() / "report.json").read_text()).get("select")
    except (OSError, ValueError, AttributeError):
        chosen = None
    return chosen if chosen in ("best", "last") else "best"


def is_run(path: str | Path) -> bool:
    """A run directory or a run checkpoint file."""
    path = Path(path).expanduser()
    return (path / "checkpoints").is_dir() or (path.is_file() and path.suffix == ".pt")
