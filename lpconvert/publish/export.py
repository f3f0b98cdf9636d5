"""From a run's members to a published model directory: collapse (Eq. 1) and save, with the run's numbers.

:func:`export_model` is what the fine-tuner writes to ``RUN/model`` and what ``lpconvert collapse``
(:mod:`lpconvert.collapse.command`) writes to another folder. The model may be a greedy soup of the members and
interpolated with the run's starting model (:mod:`lpconvert.collapse.soup`), chosen on the run's validation set.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn

from lpconvert.collapse.average import collapse
from lpconvert.collapse.soup import Selection, describe, soup_and_interpolate
from lpconvert.config import FinetuneConfig
from lpconvert.convert.late_phase_config import late_phase_config
from lpconvert.data import DIGITS, hub_dataset_id, hub_name
from lpconvert.data.archives import ARCHIVE_SUFFIXES, VAL_SPLITS
from lpconvert.data.fingerprint import validated_on_held_out
from lpconvert.data.transforms import INPUT_KEYS, data_config
from lpconvert.evaluate.metrics import METRIC_NAMES
from lpconvert.publish.loading import ModelSource
from lpconvert.publish.model_folder import save_pretrained
from lpconvert.train.optim import optimizer_settings
from lpconvert.train.state import History
from lpconvert.train.tensorboard import RUN_LOGS

logger = logging.getLogger(__name__)
#: Warn when the rebuilt starting model's validation top-1 differs from the run's epoch 0 by more than this (points).
START_MISMATCH = 1.0


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
                 test: Callable[[nn.Module], dict[str, Any]] | None = None,
                 selection: Selection | None = None) -> dict[str, Any] | None:
    """Collapse `late_model` (Eq. 1) and write it with its card; metrics are the ones recorded for `epoch` when
    `bn_stats` is the mode they were measured with (else none are claimed). Returns those metrics.

    `data` are the recalibration batches for ``bn_stats="recalibrate"`` (:func:`lpconvert.data.recalibration_loader`),
    of which the first ``config.recalibrate_batches`` are used; `logs` is the run's TensorBoard folder
    (:func:`run_logs`), published with the model. `test` evaluates the collapsed model once on the test set (when the
    run selected on a held-out validation set); what it returns (``{"test": metrics, "test_dataset": description}``)
    joins the metrics. ``extra["execution"]["mode"]`` (the engine's mode), when given, is recorded as the resolved
    ``mode`` (:func:`resolved_config`).

    `selection` (``--soup greedy``, ``--interpolate``) makes the model a greedy soup and/or interpolates it with the
    run's start (:func:`lpconvert.collapse.soup.soup_and_interpolate`); its record goes into ``averaging["selection"]`` (the
    card, ``lpconvert.json``) and ``selection.record``, and the validation metrics are those of the exported model,
    measured again with ``selection.evaluate`` (none are claimed without it)."""
    record = None
    if selection is not None and selection.changes:
        averaged, record = soup_and_interpolate(late_model, selection, bn_stats=bn_stats,
                                                data=data if bn_stats == "recalibrate" else None,
                                                num_batches=config.recalibrate_batches)
        selection.record = record
        _check_start(record, history)
    else:
        averaged = collapse(late_model, bn_stats=bn_stats, data=data if bn_stats == "recalibrate" else None,
                            num_batches=config.recalibrate_batches)
    row = history.row(epoch)
    metrics = None
    if record is not None and selection.evaluate is not None:
        chose = "chosen on this validation set, so its figure here is optimistic" if selection.needs_data else ""
        metrics = {
            "base": {k: v for k, v in history.base.items() if k in METRIC_NAMES},
            "final": {k: v for k, v in selection.evaluate(averaged).items() if k in METRIC_NAMES},
            "protocol": f"top-1/top-5/NLL/ECE on the same validation set with the same preprocessing; final = "
                        f"{describe(record)}, bn_stats={bn_stats}, epoch {epoch} ({chosen})"
                        + (f"; {chose}" if chose else ""),
            "dataset": _validation_set(config, extra.get("data_fingerprint")),
        }
    elif record is None and bn_stats == measured_bn_stats(config, epoch) and "val_top1" in row:
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
    averaging = {"bn_stats": bn_stats, "epoch": epoch, "select": chosen, "swa_start": config.swa_start, "run_K": config.K,
                 "training_data": describe_training_data(config, extra.get("data_fingerprint"))}
    if record is not None:
        averaging["selection"] = record
    if config.input_size or config.img_size is not None or config.crop_pct is not None:
        used = data_config(averaged, config.data_settings)  # config.json: the input size and crop it was trained and measured with
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


def _check_start(record: dict[str, Any], history: History) -> None:
    """A warning when the starting model, rebuilt for ``--interpolate auto``, does not score on the validation set
    what the run measured for its epoch 0 (α = 0 is that model): its weights may have changed since the run."""
    scores = dict((alpha, score) for alpha, score in (record.get("interpolation") or {}).get("scores", []))
    recorded = history.base.get("top1")
    if 0.0 in scores and recorded is not None and abs(scores[0.0] - recorded) > START_MISMATCH:
        logger.warning("the starting model rebuilt for --interpolate scores %.2f %% top-1 on the validation set, the "
                       "run measured %.2f %% at epoch 0: its base weights may have changed since the run",
                       scores[0.0], recorded)


def resolved_config(config: FinetuneConfig, source: ModelSource, mode: str | None) -> dict[str, Any]:
    """The run's settings with what they resolved to, an equivalent configuration: ``pretrained`` as the base weights
    were loaded (False when ``--weights`` replaced the Hub's, as the model's ``source`` says), ``gamma_theta`` the
    number (default 1/K, see :func:`~lpconvert.train.optim.gamma_theta`) and ``mode`` the engine's (`mode`, when known)."""
    return {**config.to_dict(), "pretrained": source.pretrained,
            "gamma_theta": config.optim_settings.theta_scale(config.K, config.optim_settings.late),
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
    if validated_on_held_out(fingerprint):  # images held out of the training split: no split of the data
        found.update(split="train", held_out=True)
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
    late-phase configuration: :func:`~lpconvert.publish.model_folder.late_phase_record`): γθ resolved, U_θ and — with
    members — U_φ with every setting they were built with (:func:`~lpconvert.train.optim.optimizer_settings`)."""
    optim = config.optim_settings
    late = optim.late
    theta, member = optimizer_settings(optim, late)
    hparams: dict[str, Any] = {"T0 (epochs)": config.t0, "gamma_theta": optim.theta_scale(config.K, late)} \
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
    """The learning-rate schedule with its settings (:func:`~lpconvert.train.optim.lr_factor`) and the warm-up."""
    settings = {"multistep": f"milestones={','.join(map(str, config.milestones))} lr_gamma={config.lr_gamma}",
                "linear": f"anneal_start={config.anneal_start} anneal_end={config.anneal_end or config.epochs} "
                          f"lr_end={config.lr_end}",
                "cosine": f"lr_end={config.lr_end}", "constant": ""}[config.schedule]
    warmup = f" warmup_epochs={config.warmup_epochs} warmup_lr={config.warmup_lr}" if config.warmup_epochs else ""
    return f"{config.schedule} {settings}".strip() + warmup
