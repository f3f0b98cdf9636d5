"""TensorBoard logs of a run (``--log tensorboard``; ``pip install 'lpconvert[tensorboard]'``).

Every field of ``metrics.jsonl`` becomes a scalar per epoch (step = epoch, 0 being the starting checkpoint); the
``train_`` and ``val_`` prefixes become TensorBoard's groups (``train/loss``, ``val/top1``). At each epoch end the
whole history is written again into one event file that atomically replaces the previous one, keeping the wall times
of the epochs it already held: a resumed run never repeats an epoch. The run keeps the file in ``RUN/tensorboard/``;
its model folder publishes a copy in ``runs/``, where the Hub finds it for the model page's Training metrics; no other
file of ``RUN/tensorboard/`` is published.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lpconvert.errors import LatePhaseError
from lpconvert.files import current_umask, fsync_dir, fsync_file

__all__ = ["EVENTS_NAME", "MODEL_EVENTS", "MODEL_LOGS", "RUN_LOGS", "check_log", "log_metrics", "tag", "write_scalars"]

RUN_LOGS = "tensorboard"  # in a run directory
MODEL_LOGS = "runs"  # in a model folder, uploaded by `lpconvert push`
#: One file, rewritten whole; TensorBoard and the Hub read files whose names hold "tfevents". A fixed name, unlike
#: SummaryWriter's own (time, host name, pid), publishes nothing about the machine.
EVENTS_NAME = "events.out.tfevents.lpconvert"
#: Where a model folder holds the run's event file: the only log it publishes (a user's own files in the run's
#: ``tensorboard/`` stay there).
MODEL_EVENTS = f"{MODEL_LOGS}/{EVENTS_NAME}"
_GROUPS = ("train_", "val_")


def check_log(log: str | None) -> None:
    """Refuse ``--log tensorboard`` where TensorBoard is not installed (checked before a run writes anything)."""
    if log != "tensorboard":
        return
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError as err:
        raise LatePhaseError("--log tensorboard needs TensorBoard: pip install 'lpconvert[tensorboard]' "
                             "(or pip install tensorboard), or leave out --log") from err


def log_metrics(log: str | None, run_path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """The rows of ``metrics.jsonl`` to the logger ``--log`` names, if any (TensorBoard: ``RUN/tensorboard/``)."""
    if log == "tensorboard":
        write_scalars(run_path / RUN_LOGS, rows)


def tag(name: str) -> str:
    """The TensorBoard tag of a ``metrics.jsonl`` field: ``val_top1`` → ``val/top1``, ``lr`` → ``lr``."""
    return name.replace("_", "/", 1) if name.startswith(_GROUPS) else name


def write_scalars(folder: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write every numeric field of `rows` (each with its ``epoch``) as a scalar at step ``epoch`` into
    ``folder/EVENTS_NAME``, replacing the file atomically; returns its path."""
    from torch.utils.tensorboard import SummaryWriter

    path = folder / EVENTS_NAME
    wall_times = _wall_times(path)
    now = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EVENTS_NAME}.tmp-", dir=folder))
    try:
        writer = SummaryWriter(log_dir=str(tmp))
        for row in rows:
            step = int(row["epoch"])
            for name, value in row.items():
                if name != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(tag(name), value, step, walltime=wall_times.get(step, now))
        writer.close()
        (written,) = tmp.iterdir()
        os.chmod(written, 0o666 & ~current_umask())
        fsync_file(written)
        os.replace(written, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(folder)
    return path


def _wall_times(path: Path) -> dict[int, float]:
    """Step → wall time of the scalars an earlier :func:`write_scalars` put in `path`."""
    if not path.is_file():
        return {}
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return {event.step: event.wall_time for event in EventFileLoader(str(path)).Load() if event.summary.value}
