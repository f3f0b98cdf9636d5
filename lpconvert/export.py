"""From a run's members to a published model directory: collapse (Eq. 1) and save, with the run's numbers.

:func:`export_model` is what the fine-tuner writes to ``RUN/model``; :func:`collapse_run` is ``lpconvert collapse``
(another checkpoint, another BatchNorm mode, another folder).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn

from .collapse import collapse
from .config import FinetuneConfig
from .data import DIGITS, build_data, hub_dataset_id, hub_name, recalibration_loader
from .data.archives import ARCHIVE_SUFFIXES, VAL_SPLITS
from .data.transforms import INPUT_KEYS, data_config
from .errors import LatePhaseError
from .late_phase_config import late_phase_config
from .late_phase_model import load_late_phase
from .loading import ModelSource
from .metrics import METRIC_NAMES
from .model_folder import save_pretrained
from .optim import gamma_theta, has_late_phase, optimizer_settings
from .ownership import check_apart, check_replaceable
from .run_dir import checkpoint_file, output_lock
from .run_state import History
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
                 logs: Path | None = None,
                 test: Callable[[nn.Module], dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Collapse `late_model` (Eq. 1) and write it with its card; metrics are the ones recorded for `epoch` when
    `bn_stats` is the mode they were measured with (else none are claimed). Returns those metrics.

    `data` are the recalibration batches for ``bn_stats="recalibrate"`` (:func:`lpconvert.data.recalibration_loader`),
    of which the first ``config.recalibrate_batches`` are used; `logs` is the run's TensorBoard folder
    (:func:`run_logs`), published with the model. `test` evaluates the collapsed model once on the test set (when the
    run selected on a held-out validation set); what it returns (``{"test": metrics, "test_dataset": description}``)
    joins the metrics. ``extra["execution"]["mode"]`` (the engine's mode), when given, is recorded as the resolved
    ``mode`` (:func:`resolved_config`)."""
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
    if test is not None:
        measured = test(averaged)
        measured["test_dataset"] = {"name": _data_name(config), **measured["test_dataset"]}
        metrics = {**(metrics or {}), **measured}
    spec = late_phase_config(late_model)
    hub_id = hub_dataset_id(config.dataset)
    averaging = {"bn_stats": bn_stats, "epoch": epoch, "select": chosen, "swa_start": config.swa_start,
                 "training_data": describe_training_data(config, extra.get("data_fingerprint"))}
    if config.input_size or config.img_size is not None or config.crop_pct is not None:
        used = data_config(averaged, config)  # config.json: the input size and crop it was trained and measured with
        own = getattr(averaged, "pretrained_cfg", None) or {}
        averaged.pretrained_cfg = {**own, **{key: used[key] for key in INPUT_KEYS}}
    save_pretrained(
        averaged, out_dir, source=source, metrics=metrics, hparams=_hparams(config), label_names=label_names,
        averaging=averaging, datasets=[hub_id] if hub_id else [], logs=logs, force=force, late_phase=spec,
        provenance={**extra, "config": resolved_config(config, source, (extra.get("execution") or {}).get("mode")),
                    "seed": config.seed, "epoch": epoch, "bn_stats": bn_stats,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "late_phase": spec.to_dict()},
    )
    return metrics


def resolved_config(config: FinetuneConfig, source: ModelSource, mode: str | None) -> dict[str, Any]:
    """The run's settings with what they resolved to, an equivalent configuration: ``pretrained`` as the base weights
    were loaded (False when ``--weights`` replaced the Hub's, as the model's ``source`` says), ``gamma_theta`` the
    number (default 1/K, see :func:`~lpconvert.optim.gamma_theta`) and ``mode`` the engine's (`mode`, when known)."""
    return {**config.to_dict(), "pretrained": source.pretrained,
            "gamma_theta": gamma_theta(config, config.K, has_late_phase(config)),
            **({"mode": mode} if mode is not None else {})}


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


def _validation_set(config: FinetuneConfig, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """The set a run's metrics were measured on, as the model card names it: ``type`` (the Hub dataset id, else the
    data's name), ``name``, ``split`` (the Hugging Face split, else the folder's name) and ``num_images`` (the
    fingerprint's count of validation images, when it has one)."""
    val = (fingerprint or {}).get("val") or {}
    split = val.get("split") or Path(val.get("root") or "validation").name
    name = _data_name(config)
    found = {"type": DIGITS if config.data == DIGITS else name, "name": name,
             "split": split if split in VAL_SPLITS else "validation"}
    return {**found, "num_images": val["num_files"]} if val.get("num_files") else found


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
    """The run's training settings for the card and ``lpconvert.json`` (K, the kinds and σ0 come from the model's
    late-phase configuration: :func:`~lpconvert.model_folder.late_phase_record`): γθ resolved, U_θ and — with
    members — U_φ with every setting they were built with (:func:`~lpconvert.optim.optimizer_settings`)."""
    late = has_late_phase(config)
    theta, member = optimizer_settings(config, late)
    hparams: dict[str, Any] = {"T0 (epochs)": config.t0, "gamma_theta": gamma_theta(config, config.K, late)} \
        if late else {}
    if config.accumulate > 1:
        hparams["accumulate"] = config.accumulate
    hparams.update({"epochs": config.epochs, "batch size": config.batch_size, "U_theta": theta.describe()})
    if config.K > 1:
        hparams["U_phi"] = member.describe()
    hparams.update({"schedule": _schedule(config), "label smoothing": config.smoothing, "clip_grad": config.clip_grad,
                    "bn_stats": config.bn_stats, "swa_start": config.swa_start})
    if config.swa_start is not None:
        hparams["swa_lr"] = config.swa_lr
    return hparams


def _schedule(config: FinetuneConfig) -> str:
    """The learning-rate schedule with its settings (:func:`~lpconvert.optim.lr_factor`) and the warm-up."""
    settings = {"multistep": f"milestones={','.join(map(str, config.milestones))} lr_gamma={config.lr_gamma}",
                "linear": f"anneal_start={config.anneal_start} anneal_end={config.anneal_end or config.epochs} "
                          f"lr_end={config.lr_end}",
                "cosine": f"lr_end={config.lr_end}", "constant": ""}[config.schedule]
    warmup = f" warmup_epochs={config.warmup_epochs} warmup_lr={config.warmup_lr}" if config.warmup_epochs else ""
    return f"{config.schedule} {settings}".strip() + warmup


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
    config = FinetuneConfig.from_saved({**checkpoint.config, "resume": None, "force": False})
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
