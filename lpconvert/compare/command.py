"""`lpconvert compare`: does late-phase training beat plain fine-tuning on MY model and data, by more than the noise
between seeds? The paired experiment of the paper's tables, as a product.

Arms are named settings over one base :class:`~lpconvert.config.FinetuneConfig` (``plain``: K = 1; late-phase with
any kinds, K, σ0, γθ; SWA; the accumulation control; any other setting). Seeds are paired: per seed, the epochs
before T0 are trained once (``seedS/trunk``) and every arm whose settings leave those epochs unchanged branches from
a copy of it — same data order, same augmentation, bitwise the run it would have been in one go. Every arm ends at
its last epoch (``select = last``: nothing is chosen on the evaluation set, so nothing is held out of the training
set either, ``val_split = 0``) and is evaluated the same way on the base configuration's evaluation split (validation
or test): the averaged model (Eq. 1), and for late-phase arms the ensemble of the
members. :mod:`lpconvert.compare.report` turns the numbers into paired differences. Rerunning the same command
continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from lpconvert.collapse.average import ensemble_predict
from lpconvert.collapse.soup import choose_alpha, greedy_soup
from lpconvert.compare.plan import (
    DISPLAY_SETTINGS,
    EVALUATIONS,
    MARKER,
    SETTINGS,
    Arm,
    Comparison,
    arm_config,
    branches,
    jsonable,
    trunk_config,
)
from lpconvert.config import FinetuneConfig, flag
from lpconvert.data import build_data, eval_loader, recalibration_loader
from lpconvert.data.selection import selection_split
from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.calibration import calibrate
from lpconvert.evaluate.evaluation import evaluate_model
from lpconvert.evaluate.sets import eval_set, ood_names
from lpconvert.files import atomic_write_json, read_json_object
from lpconvert.publish.loading import load_model
from lpconvert.run.folder import RunLock
from lpconvert.run.saved import load_run, run_start
from lpconvert.train.finetune import RunInterrupted, run
from lpconvert.train.runtime import resolve_device
from lpconvert.train.state import RunCheckpoint

logger = logging.getLogger(__name__)


def run_comparison(comparison: Comparison) -> dict[str, Any]:
    """Train every (seed, arm) that is not finished, evaluate what is not evaluated (the starting checkpoint once per
    seed, ``seedS/start``), write the report; returns it."""
    from lpconvert.compare.report import write_report

    folder = comparison.folder
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder).acquire()
    try:
        atomic_write_json(folder / SETTINGS, comparison.settings())
        atomic_write_json(folder / MARKER, {"kind": "compare"})
        evaluations = _saved_evaluations(comparison)
        todo = [(s, a) for s in comparison.seeds for a in comparison.arms if f"seed{s}/{a.name}" not in evaluations]
        durations: list[float] = []
        for seed in comparison.seeds:
            if f"seed{seed}/start" not in evaluations:
                config = arm_config(comparison.base, comparison.arms[0], seed=seed, output=folder)
                evaluations[f"seed{seed}/start"] = evaluate_start(config, comparison.ood, comparison.selection_split)
                atomic_write_json(folder / EVALUATIONS, evaluations)
            for arm in comparison.arms:
                key = f"seed{seed}/{arm.name}"
                if key in evaluations:
                    continue
                _announce(comparison, seed, arm, todo, durations)
                began = time.monotonic()
                try:
                    path = train_arm(comparison, arm, seed)
                except RunInterrupted as stop:
                    raise RunInterrupted(f"{stop}, seed {seed}, arm {arm.name}", stop.run_dir,
                                         how="the same `lpconvert compare` command") from stop
                evaluations[key] = evaluate_arm(path, comparison.ood, comparison.selection_split)
                atomic_write_json(folder / EVALUATIONS, evaluations)
                durations.append(time.monotonic() - began)
        return write_report(comparison, evaluations)
    finally:
        lock.release()


def _announce(comparison: Comparison, seed: int, arm: Arm, todo: list[tuple[int, Arm]], durations: list[float]) -> None:
    """One line before each run: which seed and arm, how many runs are left and, once one has finished in this
    process, about how long they take."""
    left = len(todo) - len(durations)
    eta = f", about {sum(durations) / len(durations) * left / 60:.0f} min left" if durations else ""
    logger.info("compare: seed %d (%d/%d), arm %s (%d/%d): %d run%s to go%s", seed, comparison.seeds.index(seed) + 1,
                len(comparison.seeds), arm.name, comparison.arms.index(arm) + 1, len(comparison.arms), left,
                "s" if left != 1 else "", eta)


def _saved_evaluations(comparison: Comparison) -> dict[str, Any]:
    """The evaluations saved so far that still describe a finished run: an entry that is not an evaluation, or whose
    run folder is gone, is dropped (and so evaluated, or trained, again); an unreadable file is evaluated anew from
    the runs (evaluations are derived from them, never the other way round)."""
    path = comparison.folder / EVALUATIONS
    if not path.is_file():
        return {}
    try:
        saved = read_json_object(path)
    except LatePhaseError as err:
        logger.warning("%s; evaluating the finished runs again", err)
        return {}
    kept = {}
    for key, value in saved.items():
        seed, _, arm = key.partition("/")
        run_exists = arm == "start" or (comparison.folder / seed / arm / "report.json").is_file()
        if isinstance(value, dict) and isinstance(value.get("averaged"), dict) and run_exists:
            kept[key] = value
        else:
            logger.warning("evaluations.json: %s is %s; it is %s again", key,
                           "not an evaluation" if run_exists else "gone from the folder",
                           "evaluated" if run_exists else "trained")
    return kept


def train_arm(comparison: Comparison, arm: Arm, seed: int) -> Path:
    """The finished run of `arm` for `seed`: trained now, continued, or branched from the seed's trunk at T0 (what
    :func:`run_comparison` does before it evaluates; a script may train every arm first)."""
    path = comparison.run_dir(seed, arm.name)
    config = arm_config(comparison.base, arm, seed=seed, output=path)
    if path.exists():
        _check_saved_settings(path, config, arm.name)
    if (path / "report.json").is_file():
        return path
    if not path.exists() and branches(arm, comparison.base):
        trunk = _trunk(comparison, seed)
        building = path.with_name(path.name + ".branching")
        shutil.rmtree(building, ignore_errors=True)  # an earlier copy that never finished: ours, by its name
        shutil.copytree(trunk, building)
        atomic_write_json(building / "config.json", config.to_dict())
        os.replace(building, path)
    if path.exists():  # a branch, or an arm interrupted earlier: continue it with the arm's settings
        config = dataclasses.replace(config, resume=str(path), force=True)
    run(config)
    return path


def _check_saved_settings(path: Path, config: FinetuneConfig, arm: str) -> None:
    """An arm's run folder holds this arm's run: its config.json has the arm's settings (display settings aside)."""
    if not (path / "config.json").is_file():
        return
    saved = FinetuneConfig.from_saved(read_json_object(path / "config.json"))
    differing = [flag(k) for k, v in jsonable(config.to_dict()).items()
                 if k not in DISPLAY_SETTINGS + ("resume", "force") and jsonable(saved.to_dict())[k] != v]
    if differing:
        raise LatePhaseError(f"{path} was trained with other settings than arm {arm} ({', '.join(differing)}); "
                             "move it away to train the arm again, or rerun the comparison that made it")


def _trunk(comparison: Comparison, seed: int) -> Path:
    """``seedS/trunk``: the base configuration trained up to T0 once, its last checkpoint at (T0, batch 0)."""
    path = comparison.run_dir(seed, "trunk")
    config = trunk_config(comparison.base, seed, path)
    if path.exists():  # continued — or started again, when it stopped before its first checkpoint
        last = path / "checkpoints" / "last.pt"
        if last.is_file():
            position = RunCheckpoint.load(last).position
            if (position.epoch, position.batch) == (config.t0, 0):
                return path
        config = dataclasses.replace(config, resume=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        run(config, stop_at_epoch=config.t0)
    except RunInterrupted as stop:
        if not stop.planned:  # a signal: the comparison stops too
            raise
    return path


@dataclass
class _Evaluation:
    """A run's (or its start's) evaluation sets: the split it is reported on and, with a selection split, the part
    that chooses soups and α; OOD loaders; the device."""

    report: Any
    selection: Any
    ood: dict[str, Any]
    device: Any
    record: dict[str, Any]

    def metrics(self, model: Any, predict_fn: Any = None) -> dict[str, Any]:
        """The metrics on the report part; with a selection part, also NLL, ECE and Brier after one temperature
        fitted there (``temperature``, ``nll_ts``, ``ece_ts``, ``brier_ts``: :func:`~lpconvert.evaluate.calibration.calibrate`)."""
        reported: list[Any] | None = None if self.selection is None else []
        result = evaluate_model(model, self.report, device=self.device, ood_loaders=self.ood or None,
                                predict_fn=predict_fn, outputs=reported)
        if reported:
            fit: list[Any] = []
            evaluate_model(model, self.selection, device=self.device, predict_fn=predict_fn, outputs=fit)
            scaled = calibrate(*fit[0], *reported[0])
            result.update({k: scaled[k] for k in ("temperature", "nll_ts", "ece_ts", "brier_ts")})
        return result

    def score(self, model: Any) -> float:
        """Top-1 on the selection part: what soups and α are chosen by."""
        return evaluate_model(model, self.selection, device=self.device)["top1"]


def _evaluation(config: FinetuneConfig, model: Any, data: Any, ood: Sequence[str], fraction: float) -> _Evaluation:
    val = data.val
    record: dict[str, Any] = {"split": data.val_role}
    selection = None
    if fraction > 0:
        selection_set, val = selection_split(val, fraction, config.subset_seed)
        selection = eval_loader(selection_set, config.batch_size, workers=config.workers)
        record["selection"] = {"fraction": fraction, "selection_images": len(selection_set),
                               "report_images": len(val), "seed": config.subset_seed}
    ood_loaders = {name: eval_set(model, path, subset=None, batch_size=config.batch_size, workers=config.workers,
                                  num_classes=None, settings=config.data_settings) for name, path in ood_names(ood).items()}
    return _Evaluation(eval_loader(val, config.batch_size, workers=config.workers), selection, ood_loaders,
                       resolve_device(config.device), record)


def evaluate_start(config: FinetuneConfig, ood: Sequence[str] = (), selection_fraction: float = 0.0) -> dict[str, Any]:
    """The starting checkpoint, evaluated as every arm is (on the report part when there is a selection split)."""
    start = run_start(config).eval()
    sets = _evaluation(config, start, build_data(config.data_settings, start), ood, selection_fraction)
    return {**sets.record, "averaged": sets.metrics(start)}


def evaluate_arm(run_dir: Path, ood: Sequence[str] = (), selection_fraction: float = 0.0) -> dict[str, Any]:
    """A finished run evaluated on its evaluation split — or, with `selection_fraction` F > 0, on the report part of
    it, with what is chosen chosen on the selection part (:func:`~lpconvert.data.selection.selection_split`):

    - ``averaged``: the run's averaged model (``RUN/model``, the last epoch; an SWA average when the run used SWA);
    - ``ensemble`` (K > 1): the mean of the final members' softmax outputs;
    - ``soup`` (K > 1, F > 0): the greedy soup of the members (:func:`~lpconvert.collapse.soup.greedy_soup`; of the SWA
      average's members, with BatchNorm statistics re-estimated, when the run used SWA);
    - ``interpolated`` (F > 0): the averaged model interpolated with the starting checkpoint, α chosen on the
      selection part (:func:`~lpconvert.collapse.soup.choose_alpha`; α = 0 is the start).

    With F > 0 every model's NLL, ECE and Brier score are also given after one temperature fitted on the selection
    part (calibration compared fairly, Guo et al. 2017).

    OOD AUROC per set and their mean when `ood` is given. ``"split"`` says what the evaluation split is (``"test"``:
    the data's test set, or ``"validation"``)."""
    run = load_run(run_dir, "last")
    late, checkpoint, config = run.members(), run.checkpoint, run.config
    averaged, _ = load_model(f"local-dir:{run_dir / 'model'}", pretrained=True)
    data = build_data(run.data, averaged)
    sets = _evaluation(config, averaged, data, ood, selection_fraction)
    results: dict[str, Any] = {**sets.record, "averaged": sets.metrics(averaged)}
    K = checkpoint.late_phase.K
    if K > 1:
        late.to(sets.device)
        results["ensemble"] = sets.metrics(None, predict_fn=partial(ensemble_predict, late))
    if sets.selection is None:
        return results
    results["selection_top1"] = sets.score(averaged)  # what settings may be chosen by (never the report part)
    if K > 1:
        members, bn_stats, recalibration = late, config.bn_stats, None
        swa = run.swa_members(late)
        if swa is not None:
            members, bn_stats = swa, "recalibrate"
            recalibration = recalibration_loader(data.train, config.batch_size, seed=config.seed)
        soup, record = greedy_soup(members, sets.score, bn_stats=bn_stats, data=recalibration,
                                   num_batches=config.recalibrate_batches)
        results["soup"], results["soup_record"] = sets.metrics(soup), record
    interpolated, record = choose_alpha(run.start(), averaged, sets.score)
    results["interpolated"], results["interpolation_record"] = sets.metrics(interpolated), record
    return results
