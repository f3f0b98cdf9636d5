"""From a run's members to a published model directory: collapse (Eq. 1) and save, with the run's numbers.

:func:`export_model` is what the fine-tuner writes to ``RUN/model``; :func:`collapse_run` is ``lpconvert collapse``
(another checkpoint, another BatchNorm mode, another folder).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from .collapse import collapse
from .config import FinetuneConfig
from .data import DIGITS, build_data, hub_dataset_id, hub_name, recalibration_loader
from .data.archives import ARCHIVE_SUFFIXES, VAL_SPLITS
from .errors import LatePhaseError
from .late_phase_config import late_phase_config
from .late_phase_model import load_late_phase
from .loading import ModelSource
from .metrics import METRIC_NAMES
from .model_folder import save_pretrained
from .ownership import check_apart, check_replaceable
from .run_dir import checkpoint_file, output_lock
from .run_state import History
from .surgery import resolve_kinds
from .tensorboard import RUN_LOGS
from .weights import check_weights


def eval_bn_stats(config: FinetuneConfig, swa: bool) -> str:
    """How a run's averaged model gets its BN statistics: ``--bn-stats``, except for an SWA average, whose statistics
    are always re-estimated (weights averaged over time have none of their own)."""
    return "recalibrate" if swa else config.bn_stats


def measured_bn_stats(config: FinetuneConfig, epoch: int) -> str:
    """The BN statistics with which epoch `epoch` (1-based) of a run was validated."""
    return eval_bn_stats(config, config.swa_start is not None and epoch > config.swa_start)


def export_model(late_model: nn.Module, out_dir: Path, *, config: FinetuneConfig, source: ModelSource,
                 history: History, epoch: int, chosen: str, bn_stats: str, data: Iterable | None,
                 extra: dict[str, Any], label_names: list[str] | None, force: bool = True,
                 logs: Path | None = None) -> dict[str, Any] | None:
    """Collapse `late_model` (Eq. 1) and write it with its card; metrics are the ones recorded for `epoch` when
    `bn_stats` is the mode they were measured with (else none are claimed). Returns those metrics.

    `data` are the recalibration batches for ``bn_stats="recalibrate"`` (:func:`lpconvert.data.recalibration_loader`),
    of which the first ``config.recalibrate_batches`` are used; `logs` is the run's TensorBoard folder
    (:func:`run_logs`), published with the model."""
    averaged = collapse(late_model, bn_stats=bn_stats, data=data if bn_stats == "recalibrate" else None,
                        num_batches=config.recalibrate_batches)
    row = history.row(epoch)
    metrics = None
    if bn_stats == measured_bn_stats(config, epoch) and "val_top1" in row:
        metrics = {
            "base": {k: v for k, v in history.base.items() if k in METRIC_NAMES},
            "final": {k[4:]: v for k, v in row.items() if k.startswith("val_")},
            "protocol": f"top-1/top-5/NLL/ECE on the same validation set with the same preprocessing; final = "
                        f"members averaged with bn_stats={bn_stats}, epoch {epoch} ({chosen})",
            "dataset": _validation_set(config, extra.get("data_fingerprint")),
        }
    spec = late_phase_config(late_model)
    hub_id = hub_dataset_id(config.dataset)
    averaging = {"K": spec.K, "late_phase": ",".join(sorted(set(spec.layers.values()))), "bn_stats": bn_stats,
                 "epoch": epoch, "select": chosen, "swa_start": config.swa_start,
                 "training_data": describe_training_data(config, extra.get("data_fingerprint"))}
    save_pretrained(
        averaged, out_dir, source=source, metrics=metrics, hparams=_hparams(config), label_names=label_names,
        averaging=averaging, datasets=[hub_id] if hub_id else [], logs=logs, force=force,
        provenance={**extra, "config": config.to_dict(), "seed": config.seed, "epoch": epoch, "bn_stats": bn_stats,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "late_phase": spec.to_dict()},
    )
    return metrics


def run_logs(config: FinetuneConfig, run_path: Path) -> Path | None:
    """The run's TensorBoard folder, to publish with its model, when the run logged to TensorBoard."""
    folder = Path(run_path) / RUN_LOGS
    return folder if config.log == "tensorboard" and folder.is_dir() else None


def _data_name(config: FinetuneConfig) -> str:
    """The data's name for a public model card — the Hub dataset id, or the folder's name without an archive suffix,
    never a local path."""
    if config.data == DIGITS:
        return "scikit-learn's handwritten digits"
    if config.dataset is not None:
        return hub_dataset_id(config.dataset) or Path(hub_name(config.dataset)).name
    root = Path(config.data or config.train_dir or "data")
    name = root.name
    for suffix in ARCHIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    if name == "train" and config.train_dir:
        name = root.parent.name or name
    return name


def _validation_set(config: FinetuneConfig, fingerprint: dict[str, Any] | None) -> dict[str, str]:
    """The set a run's metrics were measured on, as the model card's ``model-index`` names it: ``type`` (the Hub
    dataset id, else the data's name), ``name`` and ``split`` (the Hugging Face split, else the folder's name)."""
    val = (fingerprint or {}).get("val") or {}
    split = val.get("split") or Path(val.get("root") or "validation").name
    name = _data_name(config)
    return {"type": DIGITS if config.data == DIGITS else name, "name": name,
            "split": split if split in VAL_SPLITS else "validation"}


def describe_training_data(config: FinetuneConfig, fingerprint: dict[str, Any] | None) -> str:
    """The training set for a public model card: its name, size and file-list fingerprint — never a local path."""
    if config.data == DIGITS:
        return _data_name(config)
    train = (fingerprint or {}).get("train") or {}
    if "num_files" not in train:
        return f"`{_data_name(config)}`"
    return (f"`{_data_name(config)}`, {train['num_files']:,} training images (SHA-256 of their file list: "
            f"{train['sha256'][:16]}…)")


def _hparams(config: FinetuneConfig) -> dict[str, Any]:
    return {
        "K": config.K, "T0 (epochs)": config.t0, "sigma0": config.sigma0,
        "gamma_theta": config.gamma_theta if config.gamma_theta is not None else f"1/K = {1 / config.K:.4g}",
        "late-phase weights": ",".join(resolve_kinds(config.late_phase)), "epochs": config.epochs,
        "batch size": config.batch_size, "U_theta": f"{config.optimizer} lr={config.lr} momentum={config.momentum} "
        f"nesterov={config.nesterov} wd={config.weight_decay}",
        "U_phi": f"{config.member_optimizer or config.optimizer} lr={config.member_lr or config.lr} "
                 f"wd={config.member_weight_decay if config.member_weight_decay is not None else config.weight_decay}",
        "schedule": config.schedule, "bn_stats": config.bn_stats, "swa_start": config.swa_start,
    }


def collapse_run(path: str | Path, out: str | Path, *, bn_stats: str = "fold", data: str | None = None,
                 which: str = "best", force: bool = False, command: str | None = None) -> Path:
    """`lpconvert collapse`: average a run's (or checkpoint's) members into the original architecture and save it.

    The output folder is locked while it is written (as a run is): a second ``collapse`` to the same ``--out`` is
    refused with the holder's pid, and a finished model is replaced only with `force` (see :func:`_collapse_run`)."""
    path, out = Path(path), Path(out)
    checkpoint_file(path, which)  # a run (or run checkpoint), before anything else
    check_apart(out, path, "--out")
    check_replaceable(out.expanduser().absolute(), "model", "--out", force)
    with output_lock(out.expanduser().absolute()):
        return _collapse_run(path, out, bn_stats=bn_stats, data=data, which=which, force=force, command=command)


def _collapse_run(path: str | Path, out: str | Path, *, bn_stats: str = "fold", data: str | None = None,
                  which: str = "best", force: bool = False, command: str | None = None) -> Path:
    """`lpconvert collapse`: average a run's (or checkpoint's) members into the original architecture and save it.

    ``bn_stats="recalibrate"`` re-estimates the statistics on the training split of `data` exactly as the run did
    (:func:`lpconvert.data.recalibration_loader` with the run's batch size, seed and ``--recalibrate-batches``)."""
    path, out = Path(path), Path(out)
    file = checkpoint_file(path, which)  # a run (or run checkpoint), before anything else
    check_apart(out, path, "--out")
    check_replaceable(out.expanduser().absolute(), "model", "--out", force)
    if bn_stats == "recalibrate" and data is None:
        raise LatePhaseError("--bn-stats recalibrate needs --data (the training images to re-estimate them on)")
    model, checkpoint = load_late_phase(path, which)
    config = FinetuneConfig.from_dict({**checkpoint.config, "resume": None, "force": False})
    if checkpoint.swa is not None:
        from torch.optim.swa_utils import AveragedModel

        swa = AveragedModel(model, use_buffers=False)
        swa.load_state_dict(checkpoint.swa)
        model = swa.module
    check_weights(model, str(file), "nothing was written; collapse the run's other checkpoint (--which best or last) "
                  "or train again with a lower --lr")
    recalibration = None
    if bn_stats == "recalibrate":
        source = {"data": None, "dataset": data} if str(data).startswith("hfds/") else {"data": data, "dataset": None}
        own = FinetuneConfig.from_dict({**config.to_dict(), **source, "train_dir": None, "val_dir": None, "workers": 0})
        samples = build_data(own, model, labels=False).train  # recalibration reads images, not labels
        if len(samples) < config.batch_size:  # collapse has no --batch-size: the run's batch size is used
            raise LatePhaseError(f"--data has {len(samples)} training images, fewer than one batch of the run's "
                                 f"batch size {config.batch_size}; pass the run's training data to --data, "
                                 "or use --bn-stats fold")
        recalibration = recalibration_loader(samples, config.batch_size, seed=config.seed)
    history = checkpoint.history
    chosen = "best" if which == "best" and history.best_epoch is not None else "last"
    epoch = history.best_epoch if chosen == "best" else checkpoint.position.epoch
    export_model(model, out, config=config, source=ModelSource(**checkpoint.source), history=history, epoch=epoch,
                 chosen=chosen, bn_stats=bn_stats, data=recalibration,
                 extra={"command": command, "collapsed_from": str(path), "data_fingerprint": checkpoint.data_fingerprint},
                 label_names=checkpoint.label_names, force=force, logs=run_logs(config, path))
    return out
