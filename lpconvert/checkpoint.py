"""Every way a model leaves lpconvert, and the run checkpoints that hold all K members.

* :func:`save_pretrained` writes a directory that timm / torchvision load without lpconvert: ``model.safetensors``,
  ``config.json``, a ``README.md`` model card and ``lpconvert.json`` provenance. :func:`read_output_dir` validates one.
* :func:`load_run_checkpoint` reads a training checkpoint; :func:`load_late_phase` rebuilds the late-phase model
  (all K members) of a run for collapsing, ensemble inference or inspection.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from lpconvert.errors import LatePhaseError
from lpconvert.files import (
    current_umask,
    fsync_dir,
    fsync_file,
    json_default,
    prepare_tensors,
    read_json_object,
    torch_load_weights_only,
)
from lpconvert.loading import ModelSource, load_model, source_from_timm
from lpconvert.model_card import (
    CONFIG_NAME,
    MODEL_CARD_NAME,
    OUTPUT_FILES,
    PROVENANCE_NAME,
    WEIGHTS_NAME,
    render_model_card,
)

__all__ = [
    "OutputDir",
    "load_late_phase",
    "load_run_checkpoint",
    "lpconvert_version",
    "read_output_dir",
    "run_checkpoint_path",
    "save_pretrained",
]


# ---------------------------------------------------------------------------------------------------------------------
# Saving an output directory


def lpconvert_version() -> str:
    """Installed lpconvert version, or ``"unknown"`` when running from an uninstalled source tree."""
    try:
        return importlib.metadata.version("lpconvert")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def save_pretrained(
    model: nn.Module,
    out_dir: str | Path,
    *,
    source: ModelSource | None = None,
    metrics: Mapping[str, Any] | None = None,
    hparams: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
    averaging: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write a collapsed, original-architecture model to ``out_dir`` so timm/torchvision load it without lpconvert.

    ``source`` is what :func:`load_model` returned; for a timm model built in your own code it may be omitted
    (it is then read from the model's ``pretrained_cfg``).

    Files: ``model.safetensors`` (the state dict), ``config.json`` (timm's format, or a torchvision rebuild recipe),
    ``README.md`` (model card) and ``lpconvert.json`` (version, ``"collapsed": true``, source, hparams, metrics,
    ``averaging`` — how the members were averaged, see :func:`render_model_card` — and the caller's ``provenance``). Everything is written into a temp directory beside ``out_dir`` and renamed into
    place; an existing non-empty ``out_dir`` is refused unless ``force``. Returns the output path.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise LatePhaseError(f"output path {out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise LatePhaseError(f"output directory {out_dir} is not empty; choose a new one or pass --force to replace it")
    _check_metrics(metrics)
    model = _unwrap_model(model)
    if source is None:
        if not getattr(model, "pretrained_cfg", None):
            raise LatePhaseError(
                f"cannot tell how to rebuild a {type(model).__name__}; pass source= (what load_model returns)"
            )
        source = source_from_timm(model.pretrained_cfg.get("architecture", ""), model, "timm", False, None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        weights_path = tmp / WEIGHTS_NAME
        safetensors.torch.save_file(
            prepare_tensors(model.state_dict()), str(weights_path),
            metadata={"format": "pt", "lpconvert_version": lpconvert_version()},
        )
        _write_config(model, tmp / CONFIG_NAME, source, label_names)
        (tmp / MODEL_CARD_NAME).write_text(
            render_model_card(source, metrics=metrics, hparams=hparams, averaging=averaging), encoding="utf-8"
        )
        info = {
            "lpconvert_version": lpconvert_version(),
            "format_version": 1,
            "collapsed": True,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source.to_dict(),
            "files": {WEIGHTS_NAME: {"sha256": _sha256(weights_path), "bytes": weights_path.stat().st_size}},
            "hparams": dict(hparams or {}),
            "metrics": dict(metrics) if metrics is not None else None,
            "averaging": dict(averaging) if averaging is not None else None,
            "provenance": dict(provenance or {}),
        }
        text = json.dumps(info, indent=2, ensure_ascii=False, default=json_default) + "\n"
        (tmp / PROVENANCE_NAME).write_text(text, encoding="utf-8")
        for name in OUTPUT_FILES:
            os.chmod(tmp / name, 0o666 & ~current_umask())
            fsync_file(tmp / name)
        fsync_dir(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _unwrap_model(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; a non-empty ``out_dir`` is first moved aside and removed afterwards."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old)  # onto the empty placeholder directory
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)  # also replaces an existing empty directory
    fsync_dir(out_dir.parent)


def _write_config(model: nn.Module, path: Path, source: ModelSource, label_names: Sequence[str] | None) -> None:
    if source.library == "torchvision":
        config: dict[str, Any] = {
            "library": "torchvision",
            "architecture": source.architecture,
            "num_classes": source.num_classes,
            "model_args": dict(source.model_args),
        }
        if label_names:
            config["label_names"] = list(label_names)
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return
    if not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        raise LatePhaseError(
            f"cannot write a timm config for {type(model).__name__}: it has no pretrained_cfg; "
            "build the model with timm.create_model"
        )
    from timm.models._hub import save_config_for_hf

    model_config = {"label_names": list(label_names)} if label_names else None
    save_config_for_hf(model, str(path), model_config=model_config)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_metrics(metrics: Mapping[str, Any] | None) -> None:
    if metrics is None:
        return
    for part in ("base", "final"):
        values = metrics.get(part)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise LatePhaseError(f"metrics['{part}'] must be a mapping of metric name to number")
        for name, value in values.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise LatePhaseError(f"metrics['{part}']['{name}'] is {value!r}, not a number")


# ---------------------------------------------------------------------------------------------------------------------
# Reading an output directory


@dataclass
class OutputDir:
    """A validated lpconvert output directory."""

    path: Path
    config: dict[str, Any]
    info: dict[str, Any]

    @property
    def collapsed(self) -> bool:
        return self.info.get("collapsed") is True

    @property
    def metrics(self) -> dict[str, Any] | None:
        return self.info.get("metrics")


def read_output_dir(path: str | Path) -> OutputDir:
    """Validate that ``path`` is an lpconvert output directory and return its config and ``lpconvert.json``."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise LatePhaseError(f"not an lpconvert output directory: {path} does not exist or is not a directory")
    missing = [n for n in (PROVENANCE_NAME, WEIGHTS_NAME, CONFIG_NAME) if not (path / n).is_file()]
    if missing:
        raise LatePhaseError(f"not an lpconvert output directory: {path} is missing {', '.join(missing)}")
    return OutputDir(path=path, config=read_json_object(path / CONFIG_NAME), info=read_json_object(path / PROVENANCE_NAME))


# ---------------------------------------------------------------------------------------------------------------------
# Late-phase checkpoints (all K members)


def load_run_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`atomic_save_torch` (weights-only unpickling, on CPU)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LatePhaseError(f"checkpoint not found: {path}; pass the run directory that holds it")
    state = torch_load_weights_only(path)
    if not isinstance(state, dict):
        raise LatePhaseError(f"{path} is not an lpconvert training checkpoint (it holds a {type(state).__name__})")
    return state


def run_checkpoint_path(path: str | Path, which: str = "best") -> Path:
    """The checkpoint file of a run directory (``checkpoints/best.pt`` or ``last.pt``), or `path` itself."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in (which, "last"):
            candidate = path / "checkpoints" / f"{name}.pt"
            if candidate.is_file():
                return candidate
        raise LatePhaseError(f"{path} is not an lpconvert run directory (no checkpoints/{which}.pt)")
    return path


def load_late_phase(path: str | Path, which: str = "best") -> tuple[nn.Module, dict[str, Any]]:
    """The late-phase model (all K members) of a run directory or run checkpoint, and the checkpoint's state.

    The architecture is rebuilt from the run's model spec without downloading weights, converted with the recorded
    late-phase layers, then loaded strictly: ready for collapsing, ensemble inference or inspection."""
    from .surgery import convert

    state = load_run_checkpoint(run_checkpoint_path(path, which))
    if state.get("format") != "lpconvert-run" or "late_phase" not in state:
        raise LatePhaseError(f"{path} is not an lpconvert late-phase checkpoint (written by `lpconvert finetune`)")
    config, spec = state["config"], state["late_phase"]
    model, _ = load_model(config["model"], num_classes=config.get("num_classes"), pretrained=False)
    if config.get("sync_bn"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    convert(model, spec["K"], sorted(set(spec["layers"].values())), include=list(spec["layers"]))
    model.load_state_dict(state["model"])
    return model, state
