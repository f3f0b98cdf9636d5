"""The folders lpconvert writes — above all the run directory — and the rules every command follows for them.

A run directory (``lpconvert finetune --output RUN``)::

    RUN/.lpconvert-run         marker: lpconvert made this folder (and, while it is being built, what it replaces)
    RUN/.lock                  held (flock) by the one process writing the run; pid and host inside
    RUN/config.json            every setting
    RUN/metrics.jsonl          epoch 0 = the start, then one row per epoch
    RUN/checkpoints/last.pt    RunCheckpoint: all K members, optimizer states, position, history (best.pt alike)
    RUN/model/                 the collapsed model (lpconvert.checkpoint.save_pretrained)
    RUN/report.json, RUN/curves.png

Rules:

* **Ownership.** lpconvert deletes or replaces only a folder it made and recognises — a run directory (marker), a
  model directory (``lpconvert.json``), a demo directory (marker) — holding nothing but what lpconvert writes there,
  and never the working directory, one of its parents, the home directory or the file-system root, nor the source of
  the operation. ``force`` comes only from the command line (a recipe cannot set it).
* **Replace after success.** A replacement is built beside the old folder (``RUN.replacing``) and swapped in when
  complete; a failed or interrupted run leaves the previous one as it was.
* **One writer.** A run is written by the process holding its lock; a second one is refused with the holder's pid
  and host. The lock dies with its process, so a crash never blocks ``--resume``.
* **Validate, then create.** The fine-tuner calls :func:`create_run` only after the settings, model, weights, data,
  conversion, device and Hub target were checked: a failure before leaves the disk as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import random
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .errors import LatePhaseError
from .files import OUTPUT_FILES, PROVENANCE_NAME, atomic_save_torch, atomic_write_bytes, atomic_write_json, fsync_dir
from .files import torch_load_weights_only
from .late_phase_config import LatePhaseConfig
from .loading import load_model
from .surgery import convert_from_config

MARKER = ".lpconvert-run"
DEMO_MARKER = ".lpconvert-demo"
LOCK = ".lock"
REPLACING = ".replacing"
#: What lpconvert writes into a run directory: anything else makes it someone else's folder.
RUN_ENTRIES = frozenset({MARKER, LOCK, "config.json", "metrics.jsonl", "checkpoints", "model", "report.json",
                         "curves.png"})
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "lpconvert-run", 2


# ---------------------------------------------------------------------------------------------------------------------
# Ownership


def recognise(path: Path) -> str | None:
    """``"run"``, ``"model"`` or ``"demo"`` for a folder lpconvert made and that holds only what lpconvert writes
    there (the temp files of an interrupted atomic write aside), else None."""
    if not path.is_dir():
        return None
    entries = {e.name for e in path.iterdir() if not _is_temp(e.name)}
    if (path / MARKER).is_file() and entries <= RUN_ENTRIES:
        return "run"
    if (path / PROVENANCE_NAME).is_file() and entries <= set(OUTPUT_FILES):
        return "model"
    if (path / DEMO_MARKER).is_file() and all(recognise(path / e) == "run" for e in entries - {DEMO_MARKER}):
        return "demo"
    return None


def _is_temp(name: str) -> bool:
    """Leftovers of lpconvert's atomic writes: ``.NAME.XXXX.tmp`` files, ``.NAME.tmp-XXXX`` / ``.NAME.old-XXXX``
    folders."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name or ".old-" in name)


def check_not_protected(path: Path, flag: str) -> None:
    """Refuse the working directory, its parents, the home directory and the root as a folder to write or replace."""
    resolved = path.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved in (Path.home().resolve(), Path(resolved.anchor)):
        raise LatePhaseError(f"{flag} {path} is the working directory, one of its parents or your home; "
                             "choose a folder of its own")


def check_apart(out: Path, source: Path, flag: str) -> None:
    """Refuse an output that is the source, inside it, or above it."""
    out, source = out.expanduser().resolve(), source.expanduser().resolve()
    if out == source or source in out.parents or out in source.parents:
        raise LatePhaseError(f"{flag} {out} would overwrite the source {source}; choose a folder outside it")


def check_replaceable(path: Path, kind: str, flag: str, force: bool) -> bool:
    """Whether `path` is to be replaced (True), or created because it is absent or empty (False). A non-empty folder
    is replaced only with `force` and only if lpconvert recognises it as a `kind` folder; otherwise one line, nothing
    touched."""
    check_not_protected(path, flag)
    if path.exists() and not path.is_dir():
        raise LatePhaseError(f"{flag} {path} exists and is not a folder; choose another path")
    if not path.is_dir() or not any(path.iterdir()):
        return False
    if not force:
        hint = f", --resume {path}" if kind == "run" and recognise(path) == "run" else ""
        raise LatePhaseError(f"{flag} {path} is not empty; choose another {flag}{hint}, or --force to replace it")
    if recognise(path) != kind:
        raise LatePhaseError(
            f"{flag} {path} is not an lpconvert {kind} folder (or holds files lpconvert did not write); --force only "
            "replaces what lpconvert made — move it away or choose another path"
        )
    return True


def swap_into_place(new: Path, target: Path) -> None:
    """Rename the complete folder `new` to `target`; a recognised `target` is moved aside first and removed after."""
    if target.is_dir() and any(target.iterdir()):
        if recognise(target) is None:
            raise LatePhaseError(f"{target} changed while lpconvert was writing its replacement; nothing was replaced, "
                                 f"the new result is in {new}")
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
    fsync_dir(target.parent)


# ---------------------------------------------------------------------------------------------------------------------
# One writer per run


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock``, released when the process ends (or :meth:`release`)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LatePhaseError(
                f"{self.path.parent} is being written by {holder}; wait for it to finish, or choose another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


# ---------------------------------------------------------------------------------------------------------------------
# The run's state


@dataclass
class Position:
    epoch: int = 0          # the epoch being trained (0-based)
    batch: int = 0          # global batches of this epoch already trained
    iteration: int = 0      # Algorithm-1 iterations since the start of the run
    loss_sum: float = 0.0   # this epoch's summed member losses so far
    loss_count: int = 0


@dataclass
class History:
    base: dict[str, float] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None

    def row(self, epoch: int) -> dict[str, Any]:
        return next((row for row in self.epochs if row["epoch"] == epoch), {})


@dataclass
class RunCheckpoint:
    """Everything a run needs to continue exactly, or to be collapsed: ``checkpoints/last.pt`` and ``best.pt``."""

    config: dict[str, Any]
    source: dict[str, Any]
    late_phase: LatePhaseConfig
    model: dict[str, torch.Tensor]
    engine: dict[str, Any]
    position: Position
    history: History
    swa: dict[str, torch.Tensor] | None
    rng: dict[str, Any]
    started: str
    label_names: list[str] | None = None
    data_fingerprint: dict[str, Any] | None = None

    def save(self, path: Path) -> Path:
        """Atomically, as plain containers and tensors (read back weights-only)."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        state.update(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, late_phase=self.late_phase.to_dict(),
                     position=dataclasses.asdict(self.position), history=dataclasses.asdict(self.history))
        return atomic_save_torch(state, path)

    @classmethod
    def load(cls, path: Path) -> RunCheckpoint:
        if not path.is_file():
            raise LatePhaseError(f"checkpoint not found: {path}; pass the run directory that holds it")
        state = torch_load_weights_only(path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "late_phase" not in state:
            raise LatePhaseError(f"{path} is not an lpconvert run checkpoint (written by `lpconvert finetune`)")
        swa = state.get("swa")
        return cls(
            config=state["config"], source=state["source"], late_phase=LatePhaseConfig.from_dict(state["late_phase"]),
            model=state["model"], engine=state["engine"], position=Position(**state["position"]),
            history=History(**state["history"]), swa=swa["model"] if swa and "model" in swa else swa, rng=state["rng"],
            started=state.get("started", ""), label_names=state.get("label_names"),
            data_fingerprint=state.get("data_fingerprint"),
        )


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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

    def load_checkpoint(self, name: str = "last") -> RunCheckpoint:
        return RunCheckpoint.load(self.checkpoint_path(name))

    def write_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        """metrics.jsonl, rewritten atomically from the history (a resumed run never repeats a row)."""
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(row) + "\n" for row in rows).encode())

    def write_report(self, report: dict[str, Any]) -> None:
        atomic_write_json(self.report_path, report)

    def finish(self) -> Path:
        """The run is complete: a replacement now takes the place of the folder it replaces. Returns the path."""
        if self.replaces is None:
            return self.path
        target = self.replaces
        old_lock = RunLock(target).acquire() if recognise(target) == "run" else None
        try:
            marker = json.loads((self.path / MARKER).read_text())
            marker.pop("replaces", None)
            atomic_write_json(self.path / MARKER, marker)
            swap_into_place(self.path, target)
        finally:
            if old_lock is not None:
                old_lock.release()
        self.path, self.replaces = target, None
        return target

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
        atomic_write_json(building / MARKER, marker)
        atomic_write_json(building / "config.json", config)
    except BaseException:
        lock.release()
        raise
    return RunDir(building, path.resolve() if replacing else None, lock)


def open_run(path: Path) -> RunDir:
    """An existing run directory, to resume: recognised, and locked by this process."""
    if recognise(path) != "run" and not (path / "checkpoints" / "last.pt").is_file():
        raise LatePhaseError(f"{path} is not an lpconvert run directory (no checkpoints/last.pt); cannot resume")
    if not (path / "checkpoints" / "last.pt").is_file():
        raise LatePhaseError(f"{path} has no checkpoint yet (it stopped before its first one); start it again "
                             "with --force")
    replaces = None
    with contextlib.suppress(OSError, ValueError):
        replaces = json.loads((path / MARKER).read_text()).get("replaces")
    return RunDir(path, Path(replaces) if replaces else None, RunLock(path).acquire())


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


def is_run(path: str | Path) -> bool:
    """A run directory or a run checkpoint file."""
    path = Path(path).expanduser()
    return (path / "checkpoints").is_dir() or (path.is_file() and path.suffix == ".pt")


def load_late_phase(path: str | Path, which: str = "best") -> tuple[nn.Module, RunCheckpoint]:
    """The late-phase model (all K members) of a run directory or run checkpoint, and the checkpoint.

    The architecture is rebuilt from the run's model spec without downloading weights, the late-phase layers are
    re-injected by their recorded names (no tracing), then the state is loaded strictly: ready for collapsing,
    ensemble inference or inspection."""
    checkpoint = RunCheckpoint.load(checkpoint_file(Path(path), which))
    config = checkpoint.config
    model, _ = load_model(config["model"], num_classes=config.get("num_classes"), pretrained=False)
    if config.get("sync_bn"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    convert_from_config(model, checkpoint.late_phase)
    model.load_state_dict(checkpoint.model)
    return model, checkpoint
