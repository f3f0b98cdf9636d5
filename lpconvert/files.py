"""Crash-safe file I/O shared by every writer in lpconvert, and the names of the files it writes.

Writers go through a temp file in the target's folder, flush + fsync, then ``os.replace`` (and fsync the folder), so
a crash or Ctrl-C leaves either the old file or the new one, never half of one. Readers unpickle weights-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from lpconvert.errors import LatePhaseError, one_line

__all__ = [
    "CONFIG_NAME",
    "MODEL_CARD_NAME",
    "OUTPUT_FILES",
    "PROVENANCE_NAME",
    "WEIGHTS_NAME",
    "atomic_save_torch",
    "atomic_write_bytes",
    "atomic_write_json",
    "fsync_dir",
    "read_json_object",
    "sha256_file",
    "torch_load_weights_only",
]

# An output directory (save_pretrained): what timm / torchvision load, the model card, lpconvert's provenance.
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_CARD_NAME = "README.md"
PROVENANCE_NAME = "lpconvert.json"
OUTPUT_FILES = (WEIGHTS_NAME, CONFIG_NAME, MODEL_CARD_NAME, PROVENANCE_NAME)


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a written file to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def current_umask() -> int:
    """The process umask (read without changing it for good), to give atomically written files the usual mode."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # temp files are private; give the result the usual permissions
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, flush + fsync, ``os.replace``."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented UTF-8 JSON (paths, tuples, sets and tensors become plain JSON)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=json_default) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_torch(obj: Any, path: str | Path) -> Path:
    """Atomically ``torch.save`` ``obj``; keep it to tensors, plain containers and primitives so that
    :func:`load_run_checkpoint` can read it back weights-only."""
    with atomic_target(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors ready for safetensors; shared or partial storages become own copies."""
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{key} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            # a second view of a storage (tied weights) or a view into a larger one is stored as its own copy
            if t.untyped_storage().data_ptr() in seen_storages or t.untyped_storage().nbytes() != t.nbytes:
                t = t.clone()
            seen_storages.add(t.untyped_storage().data_ptr())
        prepared[key] = t
    return prepared


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)``: paths, sets, scalar tensors, numpy scalars and datetimes as plain JSON."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, datetime):
        return obj.isoformat()
    return str(obj)


# ---------------------------------------------------------------------------------------------------------------------
# Safe reads


def torch_load_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; an unsafe or corrupted file is a one-line error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch < 2.14: "Unsupported global: GLOBAL posix.system"; 2.14: "unsupported GLOBAL posix.system whose ..."
        found = re.search(r"unsupported (?:global:\s*)?GLOBAL\s+([\w.]+)", str(err), re.IGNORECASE)
        if found is None:
            raise LatePhaseError(
                f"cannot read {path} as a plain weights file ({_unpickling_reason(err)}); it is corrupted or holds "
                "more than tensors, re-save only the state dict (or convert it to safetensors)"
            ) from err
        raise LatePhaseError(
            f"{path} is not a weights-only checkpoint: it pickles {one_line(found.group(1))}, which lpconvert never "
            "unpickles; re-save it as safetensors or a plain state_dict"
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise LatePhaseError(f"cannot read {path}: {one_line(err)}; the file may be truncated or corrupted") from err


def _unpickling_reason(err: BaseException) -> str:
    """torch's weights-only refusal without its advice (re-run with ``weights_only=False``, read the docs)."""
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
    if detail:
        return one_line(detail.group(1))
    paragraphs = [p for p in re.split(r"\n\s*\n", str(err)) if p.strip()]
    kept = [p for p in paragraphs if "weights_only" not in p and "documentation" not in p]
    return one_line(kept[0]) if kept else "it is not a weights-only pickle"


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a one-line error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LatePhaseError(f"cannot read {path}: {one_line(err)}; the file is corrupted, re-export it") from err
    if not isinstance(data, dict):
        raise LatePhaseError(f"{path} does not hold a JSON object; re-export it")
    return data
