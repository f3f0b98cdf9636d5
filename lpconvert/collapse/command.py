"""``lpconvert collapse``: a run's (or a run checkpoint's) members averaged into the original architecture and written
as a published model folder — another checkpoint than the run exported, another BatchNorm mode, a greedy soup, an
interpolation with the start — chosen, when it chooses, on the run's validation set, never its test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lpconvert.collapse.soup import Selection
from lpconvert.data import build_data, eval_loader
from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.metrics import METRIC_NAMES
from lpconvert.publish.export import export_model, run_logs
from lpconvert.publish.loading import ModelSource
from lpconvert.publish.weights import check_weights
from lpconvert.run.folder import checkpoint_file, output_lock
from lpconvert.run.ownership import check_apart, check_replaceable
from lpconvert.run.saved import SavedRun, load_run

__all__ = ["collapse_run", "validation_evaluator"]


def collapse_run(path: str | Path, out: str | Path, *, bn_stats: str = "fold", data: str | None = None,
                 which: str = "best", force: bool = False, command: str | None = None, soup: str = "uniform",
                 interpolate: float | str | None = None) -> Path:
    """`lpconvert collapse`: average a run's (or checkpoint's) members into the original architecture and save it.

    The output folder is locked while it is written (as a run is): a second ``collapse`` to the same ``--out`` is
    refused with the holder's pid, and a finished model is replaced only with `force` (see :func:`_collapse_run`)."""
    path, out = Path(path), Path(out)
    Selection(soup, interpolate)  # the flags, before anything else
    checkpoint_file(path, which)  # a run (or run checkpoint), before anything else
    check_apart(out, path, "--out")
    check_replaceable(out.expanduser().absolute(), "model", "--out", force)
    with output_lock(out.expanduser().absolute()):
        return _collapse_run(path, out, bn_stats=bn_stats, data=data, which=which, force=force, command=command,
                             soup=soup, interpolate=interpolate)


def _collapse_run(path: str | Path, out: str | Path, *, bn_stats: str = "fold", data: str | None = None,
                  which: str = "best", force: bool = False, command: str | None = None, soup: str = "uniform",
                  interpolate: float | str | None = None) -> Path:
    """`lpconvert collapse`: average a run's (or checkpoint's) members into the original architecture and save it.

    ``bn_stats="recalibrate"`` re-estimates the statistics on the training split of `data` exactly as the run did
    (:func:`lpconvert.data.recalibration_loader` with the run's batch size, seed and ``--recalibrate-batches``).
    ``soup="greedy"`` keeps the members a greedy soup chooses, `interpolate` (α in [0, 1], or ``"auto"``) interpolates
    with the run's starting model (:func:`~lpconvert.run.saved.run_start`); both choose on the run's validation set
    (:func:`validation_evaluator`: its own data, or `data`), never its test set."""
    path, out = Path(path), Path(out)
    selection = Selection(soup, interpolate)
    file = checkpoint_file(path, which)  # a run (or run checkpoint), before anything else
    check_apart(out, path, "--out")
    check_replaceable(out.expanduser().absolute(), "model", "--out", force)
    if bn_stats == "recalibrate" and data is None:
        raise LatePhaseError("--bn-stats recalibrate needs --data (the training images to re-estimate them on)")
    run = load_run(path, which)
    config, checkpoint = run.config, run.checkpoint
    members = run.members()
    swa = run.swa_members(members)
    model = members if swa is None else swa
    check_weights(model, str(file), "nothing was written; collapse the run's other checkpoint (--which best or last) "
                  "or train again with a lower --lr")
    recalibration = run.recalibration(model, data) if bn_stats == "recalibrate" else None
    if selection.needs_data:
        selection.evaluate = validation_evaluator(run, model, data)
    if selection.interpolate is not None:
        selection.start = run.start
    history = checkpoint.history
    chosen = "best" if which == "best" and history.best_epoch is not None else "last"
    epoch = history.best_epoch if chosen == "best" else checkpoint.position.epoch
    export_model(model, out, config=config, source=ModelSource(**checkpoint.source), history=history, epoch=epoch,
                 chosen=chosen, bn_stats=bn_stats, data=recalibration,
                 extra={"command": command, "collapsed_from": str(path), "data_fingerprint": checkpoint.data_fingerprint},
                 label_names=checkpoint.label_names, force=force, logs=run_logs(config, path), selection=selection)
    return out


def validation_evaluator(run: SavedRun, model: nn.Module,
                         data: str | None = None) -> Callable[[nn.Module], dict[str, float]]:
    """The run's validation set (the images it validated on: its validation split or held-out training images) as
    a function model → metrics, on the GPU when there is one: what ``lpconvert collapse --soup greedy`` and
    ``--interpolate auto`` choose on. The data are the run's own, or `data` (the same root elsewhere: its validation
    images must be the run's, by their fingerprint). A run that validated on its test set (``--val-split 0``) has none:
    refused in one line."""
    from lpconvert.evaluate.evaluation import evaluate_model

    settings = (run.data if data is None else run.data.on(data)).replace(workers=0)
    built = build_data(settings, model)
    if built.val_role == "test":
        raise LatePhaseError("--soup greedy and --interpolate auto choose on the run's validation set, and this run "
                             "has none (it validated on the test set: --val-split 0); use --soup uniform and a number "
                             "for --interpolate, or train with --val-split 0.1")
    recorded = (run.checkpoint.data_fingerprint or {}).get("val") or {}
    found = built.fingerprint.get("val") or {}
    if any(key in recorded and key in found and recorded[key] != found[key] for key in ("num_files", "sha256")):
        raise LatePhaseError(f"the validation images of {data or 'the run data'} are not the ones the run validated on "
                             f"({found.get('num_files')} images against its {recorded.get('num_files')}, or other "
                             "files); pass the run's data to --data")
    loader = eval_loader(built.val, run.config.batch_size, workers=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return lambda m: {k: v for k, v in evaluate_model(m, loader, device=device).items() if k in METRIC_NAMES}
