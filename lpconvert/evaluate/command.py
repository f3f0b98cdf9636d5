"""`lpconvert evaluate`: the paper's metrics for a model, an output directory or a late-phase run.

Top-1/top-5, NLL, ECE, Brier score, OOD AUROC (predictive entropy and maximum softmax probability; per named OOD set
and their mean), optionally the flatness score δL(σz) of Fig. 3; for a late-phase run also the non-averaged ensemble
(``--ensemble``, mean of the members' softmax) and every collapse mode side by side (``--bn-stats all``). What
ensembles are for, besides: accuracy under the 15 common corruptions and the mean corruption error
(:mod:`lpconvert.evaluate.corruptions`), and calibration after temperature scaling fitted on held-out images
(:mod:`lpconvert.evaluate.calibration`). Under ``torchrun`` every rank evaluates its shard of every set and rank 0 reports.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from lpconvert.collapse.average import collapse, ensemble_predict
from lpconvert.data import DIGITS
from lpconvert.data.settings import DataSettings
from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.calibration import calibrate, calibration_split
from lpconvert.evaluate.corruptions import ArrayImages, CorruptedSet, corruption_summary, top1_by_set
from lpconvert.evaluate.evaluation import evaluate_model, flatness
from lpconvert.evaluate.metrics import METRIC_NAMES
from lpconvert.evaluate.report import format_table, to_csv, to_json
from lpconvert.evaluate.sets import Extras, Sets, default_workers, eval_set, ood_names, splits
from lpconvert.layers import BN_STATS_MODES
from lpconvert.publish.loading import load_model
from lpconvert.run.folder import is_run
from lpconvert.run.saved import load_run, reading
from lpconvert.train.distributed import announce_failure, failure_elsewhere, local_main_first
from lpconvert.train.runtime import Runtime, cpu_threads, resolve_device

logger = logging.getLogger(__name__)

__all__ = ["default_workers", "eval_set", "evaluate", "format_table", "ood_names", "to_csv", "to_json"]


def _check_options(batch_size: int, workers: int | None, subset: int | None, flatness_sigmas: Sequence[float],
                   flatness_draws: int, threads: int | None) -> None:
    problems = [
        (batch_size >= 1, f"--batch-size must be a positive integer, got {batch_size}"),
        (workers is None or workers >= 0, f"--workers must be 0 or more, got {workers}"),
        (threads is None or threads >= 1, f"--threads must be a positive integer, got {threads}"),
        (subset is None or subset >= 1, f"--subset must be a positive integer, got {subset}"),
        (all(math.isfinite(s) and s >= 0 for s in flatness_sigmas),
         f"--flatness takes σz values >= 0, got {','.join(map(str, flatness_sigmas))}"),
        (flatness_draws >= 1, f"--flatness-draws must be a positive integer, got {flatness_draws}"),
    ]
    for ok, message in problems:
        if not ok:
            raise LatePhaseError(message)


# ----------------------------------------------------------------------------------------------------- processes


@contextmanager
def _processes(device: str, threads: int | None) -> Iterator[Runtime]:
    """This process's device, its threads (``--threads``; else torch's count, or under torchrun the process's share
    of the CPUs) and, under torchrun (``WORLD_SIZE`` > 1), its process group — gloo on the CPU, NCCL on GPUs, as
    ``lpconvert finetune`` sets it up; warnings and progress from rank 0 only; a failure on one rank ends the others
    with its line."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device_ = resolve_device(device, local_rank)
    if threads is not None or world > 1:  # else torch's own count, as before
        torch.set_num_threads(cpu_threads(threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    runtime = Runtime(device_, rank, world, local_rank=local_rank)
    if world == 1 or dist.is_initialized():
        yield runtime
        return
    if rank != 0:
        logging.getLogger("lpconvert").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    if device_.type == "cuda":
        torch.cuda.set_device(device_)
    dist.init_process_group("nccl" if device_.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    try:
        yield runtime
    except Exception as exc:
        elsewhere = failure_elsewhere(exc, runtime)
        if elsewhere is not None:
            raise elsewhere from exc
        announce_failure(exc, runtime)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ evaluate


def evaluate(
    source: str,
    data: str | None = None,
    *,
    dataset: str | None = None,
    ood: Sequence[str] = (),
    ensemble: bool = False,
    bn_stats: str | None = None,
    checkpoint: str = "best",
    weights: str | None = None,
    subset: int | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    flatness_sigmas: Sequence[float] = (),
    flatness_draws: int = 10,
    corruptions: bool = False,
    corruption_dir: str | None = None,
    corruption_types: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    reference: str | None = None,
    reference_weights: str | None = None,
    calibration_split: float | None = None,
    calibration_data: str | None = None,
    calibration_on_train: bool = False,
) -> list[dict[str, Any]]:
    """One row of metrics per evaluated variant of `source` (a model spec, output directory or late-phase run), on
    the validation split of `data` (a root, or one ImageFolder tree or archive) or of `dataset` (``hfds/NAME``).

    Every row has top-1/top-5 (%), NLL, ECE, Brier score and, per ``ood`` set (``NAME=PATH`` or ``PATH``, see
    :func:`ood_names`), ``auroc/<name>`` (entropy score) and ``auroc_msp/<name>`` (maximum softmax probability).
    With `corruptions` (generated) or `corruption_dir` (published sets), the keys of
    :func:`lpconvert.evaluate.corruptions.corruption_summary` (accuracy per corruption and severity, ``mce``), and with
    `reference` (a model spec, with `reference_weights`, or the JSON of an earlier ``lpconvert evaluate --json``)
    Hendrycks' relative ``ce/<c>`` and ``mce_ref``; a reference model adds a row of its own. With
    `calibration_split` F (a fixed stratified fraction of the evaluation images fits one temperature, the rest
    report) or `calibration_data` (another held-out set fits it; ``"train"`` only with `calibration_on_train`), the
    ``calibration/*`` keys of :func:`lpconvert.evaluate.calibration.calibrate`. `workers` defaults to
    :func:`default_workers`. Under ``torchrun`` every rank evaluates its shard of every set and every rank returns the
    same rows.
    """
    _check_options(batch_size, workers, subset, flatness_sigmas, flatness_draws, threads)
    if (data is None) == (dataset is None):
        raise LatePhaseError("pass the evaluation data: --data (folders or tar archives) or --dataset hfds/NAME")
    extras = Extras(corruptions, corruption_dir, corruption_types, severities, reference, reference_weights,
                     calibration_split, calibration_data, calibration_on_train)
    oods = ood_names(ood)
    if workers is None:
        workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    with _processes(device, threads) as runtime:
        return _evaluate(source, data, dataset, oods, extras, runtime, ensemble=ensemble, bn_stats=bn_stats,
                         checkpoint=checkpoint, weights=weights, subset=subset, batch_size=batch_size,
                         workers=workers, flatness_sigmas=flatness_sigmas, flatness_draws=flatness_draws)


def _variants(source: str, train: Any, runtime: Runtime, *, ensemble: bool, bn_stats: str | None, checkpoint: str,
              weights: str | None, data: str | None,
              dataset: str | None) -> tuple[list[tuple[str, nn.Module | None, Any]], nn.Module, DataSettings]:
    """(name, model, predict_fn) of every variant to evaluate, the model whose preprocessing they share, and how it
    reads images (a run: as it read them, :attr:`~lpconvert.run.saved.SavedRun.data`; a model folder: its classes
    in its order, :func:`~lpconvert.run.saved.reading`)."""
    device_ = runtime.device
    rows: list[tuple[str, nn.Module | None, Any]] = []
    if not is_run(source):
        if ensemble or bn_stats:
            raise LatePhaseError("--ensemble and --bn-stats need a late-phase run (a `lpconvert finetune` output folder)")
        model, _ = load_model(source, weights=weights, pretrained=weights is None)
        return [("model", model.to(device_), None)], model, reading(source)
    run = load_run(source, checkpoint)
    late = run.members().to(device_)
    modes = BN_STATS_MODES if bn_stats == "all" else (bn_stats or run.config.bn_stats,)
    if "recalibrate" in modes and train is None:
        raise LatePhaseError(f"--bn-stats recalibrate needs a training split, and {dataset or data} has none")
    for mode in modes:
        with local_main_first(runtime) if mode == "recalibrate" else nullcontext():
            recal = run.recalibration(late, dataset or data, train=None if train == DIGITS else train) if mode == "recalibrate" else None
        averaged = collapse(late, bn_stats=mode, data=recal, num_batches=run.config.recalibrate_batches)
        rows.append((f"averaged ({mode})", averaged, None))
    if ensemble:
        rows.append((f"ensemble (K={run.late_phase.K}, not averaged)", None, partial(ensemble_predict, late)))
    return rows, late, run.data


def _corruption_top1(model: nn.Module | None, predict: Any, sets: list[CorruptedSet], batch_size: int, workers: int,
                     runtime: Runtime, name: str) -> dict[tuple[str, int], float]:
    """Top-1 (%) of one variant on every corrupted set, keyed by (corruption, severity)."""
    top1 = {}
    for item in sets:
        loader = DataLoader(item.dataset, batch_size=batch_size, shuffle=False,
                            num_workers=0 if isinstance(item.dataset, ArrayImages) else workers)
        progress = f"{name}: {item.corruption} {item.severity}" if runtime.is_main else None
        top1[item.corruption, item.severity] = evaluate_model(model, loader, device=runtime.device, predict_fn=predict,
                                                              progress=progress, distributed=True)["top1"]
    return top1


def _reference(extras: Extras, sets: Sets, runtime: Runtime,
               subset: int | None) -> tuple[dict[tuple[str, int], float] | None, dict[str, Any] | None]:
    """(the reference's top-1 per corrupted set, its row — None for a JSON reference)."""
    if extras.reference is None:
        return None, None
    path = Path(extras.reference).expanduser()
    if path.suffix == ".json" and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LatePhaseError(f"--reference {path}: not the JSON of `lpconvert evaluate --json` ({exc})") from None
        found = [top1_by_set(row) for row in (saved if isinstance(saved, list) else [saved]) if isinstance(row, dict)]
        found = [top1 for top1 in found if top1]
        if not found:
            raise LatePhaseError(f"--reference {path} holds no corruption results; evaluate the reference with "
                                 "--corruptions (or --corruption-dir) and --json first")
        return found[0], None
    model, _ = load_model(extras.reference, weights=extras.reference_weights,
                          pretrained=extras.reference_weights is None)
    model.to(runtime.device)
    val = sets.loader(model, sets.val_split, subset, getattr(model, "num_classes", None), own=False)
    metrics = evaluate_model(model, val, device=runtime.device, distributed=True,
                             progress="evaluating the reference" if runtime.is_main else None)
    corrupted = sets.corrupted(model, val, own=False)
    top1 = _corruption_top1(model, None, corrupted, sets.batch_size, sets.workers, runtime, "reference")
    row = {"variant": f"reference ({extras.reference})", **{k: metrics[k] for k in (*METRIC_NAMES, "brier")},
           "count": metrics["count"], **corruption_summary(top1), "corruption/count": len(corrupted[0].dataset)}
    return top1, row


def _evaluate(source: str, data: str | None, dataset: str | None, oods: dict[str, str], extras: Extras,
              runtime: Runtime, *, ensemble: bool, bn_stats: str | None, checkpoint: str, weights: str | None,
              subset: int | None, batch_size: int, workers: int, flatness_sigmas: Sequence[float],
              flatness_draws: int) -> list[dict[str, Any]]:
    with local_main_first(runtime):
        train, val_split = splits(data, dataset)
    variants, reference, settings = _variants(source, train, runtime, ensemble=ensemble, bn_stats=bn_stats,
                                               checkpoint=checkpoint, weights=weights, data=data, dataset=dataset)
    sets = Sets(runtime, val_split, train, data, extras, subset=subset, batch_size=batch_size, workers=workers,
                 settings=settings)
    val = sets.loader(reference, val_split, subset, getattr(reference, "num_classes", None))
    ood_loaders = {name: sets.loader(reference, path, subset) for name, path in oods.items()}
    corrupted = sets.corrupted(reference, val) if extras.corrupted else []
    fit_loader = sets.calibration(reference, val)
    results, top1s = [], []
    for name, model, predict in variants:
        outputs: list | None = [] if extras.calibrated else None
        metrics = evaluate_model(model, val, device=runtime.device, ood_loaders=ood_loaders or None,
                                 predict_fn=predict, progress=f"evaluating {name}" if runtime.is_main else None,
                                 distributed=True, outputs=outputs)
        row = {"variant": name, **{k: metrics[k] for k in (*METRIC_NAMES, "brier")}, "count": metrics["count"]}
        row.update({k: v for k, v in metrics.items() if k.startswith(("auroc/", "auroc_msp/"))})
        if outputs is not None:
            log_probs, labels = outputs[0]
            if fit_loader is None:
                fit, rest = calibration_split(labels, extras.calibration_split)
                calibrated = calibrate(log_probs[fit], labels[fit], log_probs[rest], labels[rest])
            else:
                fitted: list = []
                evaluate_model(model, fit_loader, device=runtime.device, predict_fn=predict, distributed=True,
                               outputs=fitted)
                calibrated = calibrate(*fitted[0], log_probs, labels)
            row.update({f"calibration/{k}": v for k, v in calibrated.items()})
        if corrupted:
            top1s.append(_corruption_top1(model, predict, corrupted, batch_size, workers, runtime, name))
            row.update({**corruption_summary(top1s[-1]), "corruption/count": len(corrupted[0].dataset)})
        if flatness_sigmas and model is not None:
            batches = [batch for _, batch in zip(range(4), val)]
            for sigma, value in flatness(model, batches, list(flatness_sigmas), draws=flatness_draws).items():
                row[f"flatness/{sigma:g}"] = value["mean"]
        results.append(row)
    reference_top1, reference_row = _reference(extras, sets, runtime, subset)
    if reference_top1 is not None:
        for row, top1 in zip(results, top1s):
            row.update(corruption_summary(top1, reference_top1))
        if reference_row is not None:
            results.append({**reference_row, **corruption_summary(reference_top1, reference_top1)})
    return results
