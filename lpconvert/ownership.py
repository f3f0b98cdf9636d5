"""Which folders lpconvert may replace, and how it replaces them — the rules every command follows for its output.

* **Ownership.** lpconvert deletes or replaces only a folder it made and recognises (:func:`recognise`) — a run
  directory (marker), a model directory (``lpconvert.json``), a demo directory (marker) — holding nothing but what
  lpconvert writes there, and never the working directory, one of its parents, the home directory or the file-system
  root (:func:`check_not_protected`), nor the source of the operation (:func:`check_apart`). ``force`` comes only
  from the command line (a recipe cannot set it).
* **Replace after success.** A replacement is built beside the old folder (``RUN.replacing``, or a temp folder) and
  swapped in when complete (:func:`swap_into_place`); a failed or interrupted run leaves the previous one as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import LatePhaseError
from .files import OUTPUT_FILES, PROVENANCE_NAME, fsync_dir
from .tensorboard import MODEL_LOGS, RUN_LOGS

MARKER = ".lpconvert-run"
DEMO_MARKER = ".lpconvert-demo"
LOCK = ".lock"
REPLACING = ".replacing"
#: What lpconvert writes into a run directory: anything else makes it someone else's folder.
RUN_ENTRIES = frozenset({MARKER, LOCK, "config.json", "metrics.jsonl", "checkpoints", "model", "report.json",
                         "curves.png", RUN_LOGS})
#: What lpconvert writes into a model folder (save_pretrained).
MODEL_ENTRIES = frozenset({*OUTPUT_FILES, MODEL_LOGS})


def recognise(path: Path) -> str | None:
    """``"run"``, ``"model"`` or ``"demo"`` for a folder lpconvert made and that holds only what lpconvert writes
    there (the temp files of an interrupted atomic write aside), else None."""
    if not path.is_dir():
        return None
    entries = {e.name for e in path.iterdir() if not _is_temp(e.name)}
    if (path / MARKER).is_file() and entries <= RUN_ENTRIES:
        return "run"
    if (path / PROVENANCE_NAME).is_file() and entries <= MODEL_ENTRIES:
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
