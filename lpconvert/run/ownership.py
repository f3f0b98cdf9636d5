"""Which folders lpconvert may replace, and how it replaces them — the rules every command follows for its output.

* **Ownership.** lpconvert deletes or replaces only a folder it made and recognises (:func:`recognise`) — a run
  directory (marker), a model directory (``lpconvert.json``), a demo directory (marker) — in which every file, at
  every depth, is one lpconvert wrote there and left unchanged (:func:`first_foreign`: allowed names, no symlinks,
  sizes as the marker's manifest records them), and never the working directory, one of its parents, the home directory or the file-system
  root (:func:`check_not_protected`), nor the source of the operation (:func:`check_apart`). ``force`` comes only
  from the command line (a recipe cannot set it).
* **Replace after success.** A replacement is built beside the old folder (``RUN.replacing``, or a temp folder) and
  swapped in when complete (:func:`swap_into_place`); a failed or interrupted run leaves the previous one as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lpconvert.errors import LatePhaseError
from lpconvert.files import OUTPUT_FILES, PROVENANCE_NAME, fsync_dir
from lpconvert.train.tensorboard import EVENTS_NAME, MODEL_LOGS, RUN_LOGS

MARKER = ".lpconvert-run"
DEMO_MARKER = ".lpconvert-demo"
LOCK = ".lock"
REPLACING = ".replacing"
#: What lpconvert writes into a run directory: anything else makes it someone else's folder.
RUN_ENTRIES = frozenset({MARKER, LOCK, "config.json", "metrics.jsonl", "checkpoints", "model", "report.json",
                         "curves.png", RUN_LOGS})
#: The same, at every depth (``model/`` is a model folder: :data:`MODEL_FILES`).
RUN_FILES = frozenset({MARKER, LOCK, "config.json", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt",
                       "report.json", "curves.png", f"{RUN_LOGS}/{EVENTS_NAME}"})
#: What lpconvert writes into a model folder (save_pretrained).
MODEL_ENTRIES = frozenset({*OUTPUT_FILES, MODEL_LOGS})
#: The same, at every depth (besides TensorBoard event files under ``runs/``).
MODEL_FILES = frozenset(OUTPUT_FILES)


def recognise(path: Path) -> str | None:
    """``"run"``, ``"model"`` or ``"demo"`` for a folder lpconvert made and that holds, at every depth, only what
    lpconvert wrote there (:func:`first_foreign`), else None."""
    if not path.is_dir() or path.is_symlink():
        return None
    for kind in ("run", "model", "demo"):
        if _made_as(path) == kind and first_foreign(path, kind) is None:
            return kind
    return None


def _made_as(path: Path) -> str | None:
    """Which kind of lpconvert folder `path` claims to be (its marker), valid or not."""
    if (path / MARKER).is_file():
        return "run"
    if (path / PROVENANCE_NAME).is_file():
        return "model"
    if (path / DEMO_MARKER).is_file():
        return "demo"
    return None


def _is_temp(name: str) -> bool:
    """Leftovers of lpconvert's atomic writes: ``.NAME.XXXX.tmp`` files, ``.NAME.tmp-XXXX`` / ``.NAME.old-XXXX``
    folders."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name or ".old-" in name)


def _files(root: Path, rel: str = "") -> Iterator[str]:
    """Every non-folder entry under `root` at every depth (files, symlinks, anything else), as sorted relative POSIX
    paths; symlinks are never followed; a temp folder of an atomic write (:func:`_is_temp`) is yielded whole."""
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = f"{rel}{entry.name}"
        if entry.is_dir(follow_symlinks=False) and not _is_temp(entry.name):
            yield from _files(root, name + "/")
        else:
            yield name


def read_manifest(marker: Path) -> dict[str, int] | None:
    """The manifest (relative path → size in bytes) in an lpconvert marker (``.lpconvert-run``) or provenance file
    (``lpconvert.json``); None when there is none (a forged marker, or one from lpconvert < 0.x)."""
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    manifest = files if marker.name == MARKER else (data.get("manifest") if isinstance(data, dict) else None)
    if not isinstance(manifest, dict) or not all(isinstance(k, str) and type(v) is int for k, v in manifest.items()):
        return None
    return manifest


def manifest_of(folder: Path, skip: frozenset[str] = frozenset()) -> dict[str, int]:
    """Relative path → size of every file lpconvert wrote under `folder` (temp files, the lock and `skip` aside)."""
    return {rel: (folder / rel).stat().st_size for rel in _files(folder)
            if rel not in skip and rel != LOCK and not any(_is_temp(part) for part in rel.split("/"))}


def _allowed(rel: str, kind: str) -> bool:
    """Whether `rel` is a path lpconvert writes into a `kind` folder (by name, at every depth)."""
    if kind == "model":
        return rel in MODEL_FILES or rel == LOCK or (rel.startswith(f"{MODEL_LOGS}/") and "tfevents" in rel)
    return rel in RUN_FILES


def first_foreign(folder: Path, kind: str) -> str | None:
    """The first file (relative path) under `folder`, at any depth, that lpconvert did not write there, else None.

    A file is lpconvert's when (1) its path is one lpconvert writes into a `kind` folder (:data:`RUN_FILES`,
    :data:`MODEL_FILES`; the temp files of an interrupted atomic write anywhere), (2) it is a plain file, not a
    symlink, and (3) the folder's manifest lists it with the same size — in a model folder every file; in a run the
    files it holds once finished (a run being written adds checkpoints, metrics and logs between two manifests, so
    there (1) alone applies to files not listed; its ``model/`` is a model folder with its own manifest). A folder
    whose marker has no manifest (forged, or made by an older lpconvert) has the marker as its first foreign file."""
    marker = folder / {"run": MARKER, "model": PROVENANCE_NAME, "demo": DEMO_MARKER}[kind]
    if kind == "demo":
        try:
            valid = json.loads(marker.read_text(encoding="utf-8")).get("kind") == "demo"
        except (OSError, ValueError, AttributeError):
            valid = False
        if not valid:
            return DEMO_MARKER
        for entry in sorted(folder.iterdir()):
            if entry.name == DEMO_MARKER or (_is_temp(entry.name) and not entry.is_symlink()):
                continue
            if entry.is_symlink() or not entry.is_dir() or not (entry / MARKER).is_file():
                return entry.name
            inner = first_foreign(entry, "run")
            if inner is not None:
                return f"{entry.name}/{inner}"
        return None
    manifest = read_manifest(marker)
    if manifest is None:
        return marker.name
    model_checked = False
    for rel in _files(folder):
        parts = rel.split("/")
        path = folder / rel
        if any(_is_temp(part) for part in parts) and not path.is_symlink():
            continue
        if kind == "run" and parts[0] == "model" and len(parts) > 1 and (folder / "model").is_dir():
            if not model_checked:
                model_checked = True
                if (folder / "model" / PROVENANCE_NAME).is_symlink():
                    return f"model/{PROVENANCE_NAME}"
                inner = first_foreign(folder / "model", "model") if (folder / "model" / PROVENANCE_NAME).is_file() \
                    else next(_files(folder / "model"))
                if inner is not None:
                    return f"model/{inner}"
            continue
        if path.is_symlink() or not path.is_file() or not _allowed(rel, kind):
            return rel
        if rel in (marker.name, LOCK):
            continue
        size = manifest.get(rel)
        if (kind == "model" and size is None) or (size is not None and size != path.stat().st_size):
            return rel
    return None


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


def _has_content(path: Path) -> bool:
    """A folder with something in it besides an lpconvert lock."""
    return path.is_dir() and any(e.name != LOCK for e in path.iterdir())


def check_replaceable(path: Path, kind: str, flag: str, force: bool) -> bool:
    """Whether `path` is to be replaced (True), or created because it is absent or empty (False). A non-empty folder
    is replaced only with `force` and only if lpconvert made it as a `kind` folder and every file in it, at every
    depth, is one lpconvert wrote there, unchanged (:func:`first_foreign`); otherwise one line, nothing touched."""
    check_not_protected(path, flag)
    if path.is_symlink() and not path.exists():
        raise LatePhaseError(f"{flag} {path} is a symlink to {os.readlink(path)}, which does not exist; remove the "
                             f"link or choose another {flag}")
    if path.exists() and not path.is_dir():
        raise LatePhaseError(f"{flag} {path} exists and is not a folder; choose another path")
    if not _has_content(path):
        return False
    if not force:
        hint = f", --resume {path}" if kind == "run" and recognise(path) == "run" else ""
        raise LatePhaseError(f"{flag} {path} is not empty; choose another {flag}{hint}, or --force to replace it")
    if path.is_symlink() or _made_as(path) != kind:
        raise LatePhaseError(
            f"{flag} {path} is not an lpconvert {kind} folder (or holds files lpconvert did not write); --force only "
            "replaces what lpconvert made — move it away or choose another path"
        )
    foreign = first_foreign(path, kind)
    if foreign is not None:
        raise LatePhaseError(f"--force: {path / foreign} is not a file lpconvert wrote; move it out first or choose "
                             f"another {flag}")
    return True


def swap_into_place(new: Path, target: Path, replace: bool = True) -> None:
    """Rename the complete folder `new` to `target`. A `target` with content is moved aside first and removed after —
    only with `replace` and only if lpconvert recognises it; an empty one (or holding only a lock) is moved aside."""
    if target.is_dir() and not target.is_symlink() and any(target.iterdir()):
        if _has_content(target) and (not replace or recognise(target) is None):
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
