"""How a collapsed model leaves lpconvert: an output directory that timm / torchvision load without lpconvert.

:func:`save_pretrained` writes ``model.safetensors``, ``config.json``, a ``README.md`` model card and
``lpconvert.json`` provenance (and the run's TensorBoard logs in ``runs/``); :func:`read_output_dir` validates one.
(Run checkpoints, with all K members, are :mod:`lpconvert.train.state`'s.)
"""

from __future__ import annotations

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

from lpconvert.collapse.average import collapse
from lpconvert.convert.late_phase_config import ATTRIBUTE, LatePhaseConfig
from lpconvert.convert.members import unwrap
from lpconvert.errors import LatePhaseError
from lpconvert.files import (
    CONFIG_NAME,
    MODEL_CARD_NAME,
    OUTPUT_FILES,
    PROVENANCE_NAME,
    WEIGHTS_NAME,
    current_umask,
    fsync_dir,
    fsync_file,
    json_default,
    prepare_tensors,
    read_json_object,
    sha256_file,
)
from lpconvert.publish.loading import ModelSource, source_from_timm
from lpconvert.publish.model_card import render_model_card
from lpconvert.publish.weights import check_weights
from lpconvert.run.ownership import check_replaceable, manifest_of, swap_into_place
from lpconvert.train.tensorboard import EVENTS_NAME, MODEL_EVENTS, MODEL_LOGS, RUN_LOGS
from lpconvert.version import lpconvert_version

__all__ = ["OutputDir", "read_output_dir", "save_pretrained"]


# ---------------------------------------------------------------------------------------------------------------------
# Saving an output directory


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
    datasets: Sequence[str] = (),
    logs: str | Path | None = None,
    force: bool = False,
    late_phase: LatePhaseConfig | None = None,
) -> Path:
    """Write a collapsed, original-architecture model to ``out_dir`` so timm/torchvision load it without lpconvert.

    ``source`` is what :func:`load_model` returned; for a timm model built in your own code it may be omitted
    (it is then read from the model's ``pretrained_cfg``). A late-phase model (:func:`lpconvert.convert`, not yet
    collapsed) is collapsed here (:func:`lpconvert.collapse`, ``bn_stats="fold"``); its ``late_phase_config`` — or
    `late_phase`, the configuration of the model a collapsed `model` was averaged from — gives K, the kinds and σ0
    to ``averaging`` and ``hparams`` (:func:`late_phase_record`), so the card and ``lpconvert.json`` state them.

    Files: ``model.safetensors`` (the state dict), ``config.json`` (timm's format, or a torchvision rebuild recipe),
    ``README.md`` (model card) and ``lpconvert.json`` (version, ``"collapsed": true``, source, hparams, metrics,
    ``averaging`` — how the members were averaged, see :func:`render_model_card` — and the caller's
    ``provenance``). ``metrics`` holds ``base`` and ``final`` (name → number) and optionally ``protocol``,
    ``dataset`` (``type``, ``name``, ``split``, ``num_images``: where they were measured, for the card's
    ``model-index``) and ``test`` with its ``test_dataset`` (``name``, ``split``, ``num_images``);
    ``datasets`` are the Hub ids of the training data (the card's ``datasets``); the TensorBoard event file lpconvert
    wrote in ``logs`` (a run's ``tensorboard/``; no other file there) is copied into ``runs/``, which ``lpconvert
    push`` uploads. Everything is written into a temp directory beside ``out_dir`` and renamed into place. An existing
    non-empty ``out_dir`` is replaced only with ``force`` and only if it is an lpconvert model folder (see
    :mod:`lpconvert.run.ownership`), after the new one is complete. A model with non-finite weights or a negative
    BatchNorm variance is refused before anything is written. Returns the output path.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    replacing = check_replaceable(out_dir, "model", "--out", force)
    _check_metrics(metrics)
    _check_datasets(datasets)
    events = _event_files(Path(logs)) if logs is not None else {}
    model = unwrap(model)
    if isinstance(getattr(model, ATTRIBUTE, None), LatePhaseConfig):
        late_phase = late_phase or getattr(model, ATTRIBUTE)
        model = collapse(model)
        averaging = {"bn_stats": "fold", **(averaging or {})}
    if late_phase is not None:
        record = late_phase_record(late_phase)
        averaging = {**record, **(averaging or {})}
        hparams = {"K": record["K"], **({"late-phase weights": record["late_phase"], "sigma0": record["sigma0"]}
                                        if late_phase.K > 1 else {}), **(hparams or {})}
    check_weights(model, "the model to save", f"nothing was written to {out_dir}; save a model that did not diverge "
                  "(an earlier checkpoint, or train again with a lower --lr)")
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
            render_model_card(source, metrics=metrics, hparams=hparams, averaging=averaging, datasets=datasets,
                              logs=bool(events)), encoding="utf-8"
        )
        for name, path in events.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / name)
        info = {
            "lpconvert_version": lpconvert_version(),
            "format_version": 1,
            "collapsed": True,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source.to_dict(),
            "files": {WEIGHTS_NAME: {"sha256": sha256_file(weights_path), "bytes": weights_path.stat().st_size}},
            "hparams": dict(hparams or {}),
            "metrics": dict(metrics) if metrics is not None else None,
            "averaging": dict(averaging) if averaging is not None else None,
            "provenance": dict(provenance or {}),
            # every other file written here and its size: --force replaces this folder only while it holds just these
            "manifest": manifest_of(tmp),
        }
        text = json.dumps(info, indent=2, ensure_ascii=False, default=json_default) + "\n"
        (tmp / PROVENANCE_NAME).write_text(text, encoding="utf-8")
        for name in (*OUTPUT_FILES, *events):
            os.chmod(tmp / name, 0o666 & ~current_umask())
            fsync_file(tmp / name)
        if events:
            fsync_dir(tmp / MODEL_LOGS)
        fsync_dir(tmp)
        swap_into_place(tmp, out_dir, replace=replacing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def late_phase_record(late_phase: LatePhaseConfig) -> dict[str, Any]:
    """What a saved model records of the late phase it was averaged from: K, its kinds (comma-separated) and σ0 —
    neither for K = 1, which has no late-phase weights (plain fine-tuning)."""
    late = late_phase.K > 1
    return {"K": late_phase.K, "late_phase": ",".join(sorted(late_phase.kinds)) if late else None,
            "sigma0": late_phase.sigma0 if late else None}


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


def _event_files(logs: Path) -> dict[str, Path]:
    """Where the TensorBoard event file lpconvert wrote in `logs` (:data:`~lpconvert.train.tensorboard.EVENTS_NAME`, a plain
    file) goes in a model folder: ``runs/``. Nothing else there is published — not a user's own event files."""
    if not logs.is_dir():
        raise LatePhaseError(f"logs={logs} is not a folder; pass the folder of TensorBoard event files (a run's "
                             f"{RUN_LOGS}/)")
    ours = logs / EVENTS_NAME
    return {MODEL_EVENTS: ours} if ours.is_file() and not ours.is_symlink() else {}


def _check_datasets(datasets: Sequence[str]) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if isinstance(datasets, str):
        raise LatePhaseError(f"datasets must be a list of Hub dataset ids, got the text {datasets!r}")
    for dataset in datasets:
        try:
            validate_repo_id(dataset)
        except HFValidationError:
            raise LatePhaseError(f"{dataset!r} is not a Hub dataset id (NAME or NAMESPACE/NAME); the model card's "
                                 "datasets name data on the Hub, never a local path") from None


def _check_metrics(metrics: Mapping[str, Any] | None) -> None:
    if metrics is None:
        return
    for where, needed in (("dataset", ("type", "name")), ("test_dataset", ())):
        dataset = metrics.get(where)
        if dataset is None:
            continue
        named = isinstance(dataset, Mapping) and all(isinstance(dataset.get(key), str) and dataset[key]
                                                     for key in needed)
        count = dataset.get("num_images") if isinstance(dataset, Mapping) else None
        if not named or not (count is None or (type(count) is int and count > 0)):
            texts = "the texts 'type' (a Hub dataset id or a name) and 'name', and optionally " if needed else ""
            raise LatePhaseError(f"metrics['{where}'] must be a mapping with {texts}'split' and 'num_images' (a "
                                 "positive integer)")
    for part in ("base", "final", "base_test", "test"):
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
