"""The fine-tuner: pretrained checkpoint → convert at T0 → Algorithm 1 for N epochs → collapse → save.

Plain functions that read top to bottom, like torchvision's reference scripts: what is checked before anything is
written (:func:`prepare`, which plans the conversion once), the :class:`~lpconvert.train.state.TrainState` a run starts
or resumes from, :func:`fit` (epochs of :func:`~lpconvert.train.loop.train_one_epoch`, the T0 switch, SWA, validation
of the averaged model, checkpoints), :func:`finish` (collapse and export) and :func:`run`, the whole job. One process
or many (``torchrun --nproc_per_node N -m lpconvert finetune …``: DistributedDataParallel, every rank training the same
member at once); interruptible and exactly resumable.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lpconvert.collapse.average import collapse
from lpconvert.collapse.soup import Selection
from lpconvert.config import LEGACY_SETTINGS, FinetuneConfig, flag
from lpconvert.convert.late_phase_config import late_phase_config
from lpconvert.convert.surgery import convert_from_config
from lpconvert.data import DIGITS
from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.evaluation import evaluate_model
from lpconvert.evaluate.metrics import METRIC_NAMES
from lpconvert.files import atomic_write_json
from lpconvert.publish.export import eval_bn_stats, export_model, run_logs
from lpconvert.run.folder import RunDir, check_continuable, create_run, open_run, prepare_run
from lpconvert.run.saved import load_run, run_start
from lpconvert.train.distributed import announce_failure, failure_elsewhere, restore_rank_buffers
from lpconvert.train.engine import LatePhaseEngine
from lpconvert.train.job import Job, log_batch, prepare
from lpconvert.train.loop import evaluate_averaged, recalibration_batches, sync_member_statistics, train_one_epoch
from lpconvert.train.optim import build_engine, choose_mode
from lpconvert.train.plots import plot_curves
from lpconvert.train.runtime import Runtime, init_runtime
from lpconvert.train.state import History, Position, RunCheckpoint, TrainState, restore_model
from lpconvert.train.stopping import RunInterrupted, StopRequest, signals_caught, stop_before_training
from lpconvert.train.switch import enter_late_phase
from lpconvert.train.tensorboard import log_metrics

logger = logging.getLogger(__name__)
#: Settings a resumed run may differ in without --force (they do not change what is computed).
RESUME_FREE = ("resume", "force", "quiet", "workers", "log", "log_every", "output", "push_to_hub",
               "allow_regression", "dist_timeout")
#: What the late phase is made of: a resume may change these (with --force) only before T0, where they take effect.
STRUCTURAL = ("K", "late_phase", "late_phase_options", "include", "exclude", "sigma0", "t0")
#: Warn when θ's step grows by this factor at T0, or the first late-phase epoch loses this many points of top-1.
STEP_GROWTH_WARNING, TOP1_FALL_WARNING = 4.0, 5.0
#: A start scoring this much top-1 on images held out of its training set has seen them: they cannot rank epochs.
MEMORISED_TOP1 = 99.5
__all__ = ["DIGITS", "Job", "RunInterrupted", "finish", "fit", "prepare", "resume", "run", "start"]


# --------------------------------------------------------------------------------------------------------------------
# the state a run trains: started, resumed, switched at T0
# --------------------------------------------------------------------------------------------------------------------
def engine_for(model: nn.Module, job: Job, config: FinetuneConfig, runtime: Runtime, late: bool) -> LatePhaseEngine:
    """`model` on the run's device and memory format, wrapped for DDP / torch.compile, with its Algorithm-1 engine."""
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    train_model = model
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids, **_no_buffer_sync())
    if config.compile:
        train_model = torch.compile(train_model)
    mode = choose_mode(config, model, late_phase_config(model).K, job.input_size, runtime)
    return build_engine(train_model, config.optim_settings, mode, runtime, late, config.group_size)


def start(job: Job, config: FinetuneConfig, runtime: Runtime, run_dir: RunDir) -> TrainState:
    """A new run: epoch 0 of metrics.jsonl is the starting checkpoint, the first candidate for ``--select best``
    (saved as ``best`` with the run's first checkpoint); the model gets one member (K at T0, even when T0 is 0)."""
    history = History(best_epoch=None if job.data.val_role == "test" else 0)  # nothing is chosen on a test set
    history.base = evaluate_model(job.model, job.val, device=runtime.device, amp_dtype=runtime.amp_dtype,
                                  progress=None if config.quiet or not runtime.is_main else "evaluating the start",
                                  distributed=runtime.distributed)
    history.epochs.append(_metrics_row(0, history.base))
    if runtime.is_main:
        run_dir.write_metrics(history.epochs)
        log_metrics(config.log, run_dir.path, history.epochs)
        _warn_about_a_memorised_hold_out(history.base, job, config)
    model = convert_from_config(job.model, dataclasses.replace(job.late_phase, K=1, sigma0=0.0))
    state = TrainState(model, engine_for(model, job, config, runtime, False), False, history=history)
    if config.select == "best" and runtime.is_main:
        state.unsaved_start = copy.deepcopy(_checkpoint(state, job, config))
    return state


def resume(job: Job, config: FinetuneConfig, runtime: Runtime, checkpoint: RunCheckpoint) -> TrainState:
    """The state `checkpoint` saved; at (T0, batch 0) the switch to K members is still to come. Without --threads
    the run continues with the thread count it trained with (bitwise the run in one go)."""
    at = (checkpoint.position.epoch, checkpoint.position.batch)
    if config.threads is None and checkpoint.threads and runtime.device.type == "cpu":
        torch.set_num_threads(checkpoint.threads)
    position = checkpoint.position
    if runtime.is_main:
        where = (f"epoch {position.epoch + 1}, iteration {position.iteration}" if position.epoch < config.epochs
                 else f"the end of training (iteration {position.iteration})")
        logger.info("resuming %s at %s of %d epochs (%d minibatches of that epoch trained), with %d CPU thread(s)",
                    config.resume, where, config.epochs, position.batch, torch.get_num_threads())
    late = config.optim_settings.late and at > (config.t0, 0)
    state = TrainState.from_checkpoint(checkpoint, job.model, partial(engine_for, job=job, config=config,
                                                                      runtime=runtime, late=late), late,
                                       where=f"{config.resume}/checkpoints/last.pt")
    restore_rank_buffers(state.model, checkpoint.rank_buffers, runtime)  # after DDP copied rank 0's
    return state


def _metrics_row(epoch: int, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
    row = {"epoch": epoch, **extra}
    row.update({f"val_{k}": v for k, v in metrics.items() if k in METRIC_NAMES})
    return row


def _no_buffer_sync() -> dict[str, bool]:
    """Per-member BN statistics stay rank-local during an epoch (averaged at its end), under either DDP spelling."""
    import inspect

    names = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


# --------------------------------------------------------------------------------------------------------------------
# the epochs
# --------------------------------------------------------------------------------------------------------------------
def fit(state: TrainState, job: Job, config: FinetuneConfig, runtime: Runtime, run_dir: RunDir,
        stop: StopRequest) -> None:
    """Epoch after epoch up to ``--epochs``: the T0 switch, SWA from ``--swa-start``, one epoch of Algorithm 1, the
    averaged model's validation, ``last`` (and ``best``) checkpoints and metrics.jsonl."""
    save = partial(_save, state, job, config, runtime, run_dir)
    history = state.history
    while state.position.epoch < config.epochs:
        epoch = state.position.epoch
        if epoch == config.t0 and config.optim_settings.late and not state.late and state.position.batch == 0:
            state.model, state.engine = enter_late_phase(
                state.model, state.engine, job.late_phase,
                partial(engine_for, job=job, config=config, runtime=runtime, late=True))
            state.late = True
            _warn_about_theta_steps(config, runtime)
        if config.swa_start is not None and epoch >= config.swa_start and state.swa is None:
            state.start_swa()
        stats = train_one_epoch(state, job.train, config, runtime, stop=stop, save=save, run_dir=run_dir.path)
        sync_member_statistics(state, runtime)
        if state.swa is not None and config.swa_freq is None:  # else sampled every --swa-freq minibatches
            state.swa.update_parameters(state.model)
        metrics = evaluate_averaged(state, config, runtime, job.val, job.recalibration)  # every rank: its shard
        row = _metrics_row(epoch + 1, metrics, **stats, K=state.engine.num_members)
        history.epochs.append(row)
        improved = job.data.val_role != "test" and (  # a test set is measured, never chosen on: no best.pt
            history.best_epoch is None or metrics["top1"] > history.row(history.best_epoch)["val_top1"])
        if improved:
            history.best_epoch = epoch + 1
        if epoch == config.t0 and config.optim_settings.late:
            _warn_about_a_fall(history, epoch)
        state.position = Position(epoch=epoch + 1, iteration=state.position.iteration)
        save("last")
        if runtime.is_main:
            run_dir.write_metrics(history.epochs)
            log_metrics(config.log, run_dir.path, history.epochs)
        if improved:
            save("best")
        if runtime.is_main:
            logger.info("epoch %d/%d  loss %.4f  val top-1 %.2f  (start %.2f)  %.0f img/s", epoch + 1, config.epochs,
                        stats["train_loss"], row.get("val_top1", float("nan")), history.base["top1"],
                        stats["images_per_s"])
        if runtime.distributed:
            dist.barrier()
        if stop.at_epoch is not None and state.position.epoch >= stop.at_epoch < config.epochs:
            raise RunInterrupted(f"stopped at the end of epoch {state.position.epoch}", run_dir.path, planned=True)


def _save(state: TrainState, job: Job, config: FinetuneConfig, runtime: Runtime, run_dir: RunDir,
          name: str = "last") -> None:
    """Checkpoint `state` as ``checkpoints/NAME.pt`` (rank 0 writes), the starting checkpoint first as ``best`` if it
    is still unsaved."""
    if not runtime.is_main:
        return
    if state.unsaved_start is not None:
        run_dir.save_checkpoint(state.unsaved_start, "best")
        state.unsaved_start = None
    run_dir.save_checkpoint(_checkpoint(state, job, config), name)


def _checkpoint(state: TrainState, job: Job, config: FinetuneConfig) -> RunCheckpoint:
    return state.to_checkpoint(config=config.to_dict(), source=job.source.to_dict(), label_names=job.data.label_names,
                               data_fingerprint=job.data.fingerprint)


def _warn_about_theta_steps(config: FinetuneConfig, runtime: Runtime) -> None:
    """One line when θ's step grows by a large factor at T0: it steps once per iteration on γθ times the sum of the
    iteration's minibatch gradients, an effective learning rate of γθ · K · lr against lr before T0."""
    optim = config.optim_settings
    per_iteration = optim.minibatches_per_iteration(config.K, True)
    growth = optim.theta_scale(config.K, True) * per_iteration
    if runtime.is_main and growth >= STEP_GROWTH_WARNING:
        logger.warning("from T0 on the shared weights step on %g times a plain step (γθ %g × %d minibatches per "
                       "iteration: an effective learning rate of %g); if training collapses after T0, lower "
                       "--gamma-theta (default 1/K) or --lr", growth, optim.theta_scale(config.K, True),
                       per_iteration, growth * config.lr)


def _warn_about_a_memorised_hold_out(base: dict[str, Any], job: Job, config: FinetuneConfig) -> None:
    """One line before training when the start leaves no room to rank epochs on images held out of the training set:
    a checkpoint trained on them (the usual pretrained case) scores about 100 % there, so ``--select best`` would
    keep the start after all the epochs."""
    if job.data.val_role == "held-out" and config.select == "best" and base["top1"] >= MEMORISED_TOP1:
        logger.warning("the starting checkpoint scores %.2f %% on the %d validation images held out of the training "
                       "set: it was probably trained on them, so they cannot rank epochs and --select best will "
                       "likely export the start unchanged; pass a real validation split (--val-dir, or val/ in "
                       "--data) or --select last", base["top1"], base["count"])


def _warn_about_a_fall(history: History, epoch: int) -> None:
    """One line when the first late-phase epoch lost more than TOP1_FALL_WARNING points of validation top-1."""
    before, after = history.row(epoch).get("val_top1"), history.row(epoch + 1).get("val_top1")
    if before is not None and after is not None and before - after > TOP1_FALL_WARNING:
        logger.warning("validation top-1 fell from %.2f to %.2f in the first late-phase epoch (T0 = %d); the late "
                       "phase may be stepping too far: lower --gamma-theta or --lr", before, after, epoch)


# --------------------------------------------------------------------------------------------------------------------
# the end
# --------------------------------------------------------------------------------------------------------------------
def finish(state: TrainState, job: Job, config: FinetuneConfig, runtime: Runtime, run_dir: RunDir,
           command: str | None) -> dict[str, Any]:
    """Collapse the selected epoch's model (``--select``), write the model directory, the report and the plot; when
    the run validated on images held out of the training set, the exported model is evaluated once on the test set.

    The best epoch may lie before T0: it is exported as what it is, the plain model (K = 1) — at epoch 0, the starting
    checkpoint unchanged. ``--soup greedy`` / ``--interpolate`` (:func:`_selection`) choose on the validation set;
    what they chose goes into ``report.json`` (``selection``), the card and ``lpconvert.json``."""
    history = state.history
    chosen = "best" if config.select == "best" and history.best_epoch is not None else "last"
    epoch = history.best_epoch if chosen == "best" else history.epochs[-1]["epoch"]
    model, swa = state.model, state.swa
    if chosen == "best":
        model, swa = _saved_model(state, load_run(run_dir.path, "best").checkpoint)
    mode = eval_bn_stats(config, swa is not None)
    selection = _selection(job, config, runtime)
    batches = recalibration_batches(runtime, job.recalibration, mode)
    if batches is not None and selection is not None:  # a soup re-estimates statistics for every candidate
        batches = _Reiterable(partial(recalibration_batches, runtime, job.recalibration, mode))
    metrics = export_model(
        swa.module if swa is not None else model, run_dir.model_dir, config=config, source=job.source,
        history=history, epoch=epoch, chosen=chosen, bn_stats=mode, data=batches,
        extra={"command": command, "data_fingerprint": job.data.fingerprint, "started": state.started,
               "execution": {"device": str(runtime.device), "world_size": runtime.world_size,
                             "threads": torch.get_num_threads(), "mode": state.engine.mode}},
        label_names=job.data.label_names, logs=run_logs(config, run_dir.path),
        test=partial(_evaluate_test, job, runtime, config) if job.test is not None else None,
        selection=selection,
    )
    K = late_phase_config(model).K
    report = {
        "run_dir": str(run_dir.final_path), "model_dir": str(run_dir.final_path / "model"), "K": K,
        "select": chosen, "epoch": epoch, "validation": job.data.val_role, "bn_stats": mode, "mode": state.engine.mode,
        "start_top1": metrics["base"]["top1"], "final_top1": metrics["final"]["top1"],
        "change": metrics["final"]["top1"] - metrics["base"]["top1"],
    }
    if "test" in metrics:
        report["test_top1"], report["start_test_top1"] = metrics["test"]["top1"], metrics["base_test"]["top1"]
    report["run_K"] = config.K
    if selection is not None:
        report["selection"] = selection.record
    if epoch == 0:
        report["note"] = ("the starting checkpoint scored best on the validation set: fine-tuning did not improve it, "
                          "and the starting model is exported unchanged")
        logger.warning("no epoch beat the starting checkpoint on the validation set; the starting model is exported")
    elif K != config.K:
        report["note"] = f"the best epoch, {epoch}, came before T0 = {config.t0}: the plain model (K = 1) is exported"
    run_dir.write_report(report)
    plot_curves(history.epochs, run_dir.curves_path)
    return report


def _selection(job: Job, config: FinetuneConfig, runtime: Runtime) -> Selection | None:
    """``--soup`` / ``--interpolate`` at the end of a run: chosen on the run's validation set (``job.val``; never a
    test set — :func:`~lpconvert.train.job.prepare` refused that), the start rebuilt as the run built it
    (:func:`~lpconvert.publish.export.run_start`). None for the uniform average (Eq. 1) alone."""
    selection = Selection(config.soup, config.interpolate)
    if not selection.changes:
        return None
    if selection.needs_data and job.data.val_role == "test":
        raise LatePhaseError("--soup greedy and --interpolate auto choose on a validation set; this run has none")
    selection.evaluate = lambda m: {k: v for k, v in evaluate_model(
        m, job.val, device=runtime.device, amp_dtype=runtime.amp_dtype,
        progress=None if config.quiet else "choosing on the validation set").items() if k in METRIC_NAMES}
    selection.start = partial(run_start, config)
    return selection


class _Reiterable:
    """Batches that can be passed over again (each pass the same batches, from `make`)."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __iter__(self) -> Any:
        return iter(self.make())


def _evaluate_test(job: Job, runtime: Runtime, config: FinetuneConfig, model: nn.Module) -> dict[str, Any]:
    """The collapsed model's one evaluation on the test set, beside the starting checkpoint's (measured, never chosen
    on: the verdict's second line), with the set they were measured on."""
    measured = {}
    for name, candidate in (("base_test", run_start(config)), ("test", model)):
        metrics = evaluate_model(candidate, job.test, device=runtime.device, amp_dtype=runtime.amp_dtype,
                                 progress=None if config.quiet else "evaluating on the test set")
        measured[name] = {k: v for k, v in metrics.items() if k in METRIC_NAMES}
    return {**measured, "test_dataset": {"split": "test", "num_images": len(job.test.dataset)}}


def _saved_model(state: TrainState, checkpoint: RunCheckpoint) -> tuple[nn.Module, nn.Module | None]:
    """The late-phase model (and SWA average) saved in `checkpoint`, whatever its K was."""
    model = state.model
    if checkpoint.late_phase.to_dict() != late_phase_config(model).to_dict():  # e.g. the plain model before T0
        model = restore_model(collapse(state.model, bn_stats="mean"), checkpoint, "checkpoints/best.pt")
    else:
        model.load_state_dict(checkpoint.model)
    swa = None
    if checkpoint.swa is not None:
        swa = TrainState.average_of(model)
        swa.load_state_dict(checkpoint.swa)
    return model, swa


# --------------------------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------------------------
def output_path(config: FinetuneConfig, runtime: Runtime) -> Path:
    """``--output``, or a new folder per run as timm names them: ``runs/<date>-<time>-MODEL-K<K>`` (rank 0's name on
    every rank)."""
    if config.output:
        return Path(config.output)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model.replace(':', '-').replace('/', '-')}-K{config.K}"
    path = Path("runs") / stem
    for n in itertools.count(2):
        if not path.exists():
            break
        path = Path("runs") / f"{stem}-{n}"
    if runtime.distributed:
        chosen = [str(path)]
        dist.broadcast_object_list(chosen, src=0)
        path = Path(chosen[0])
    return path


def _resumable(config: FinetuneConfig, checkpoint: RunCheckpoint, run_dir: Path) -> None:
    """A resumed run's settings must be the saved ones (or --force); a setting the run was saved without has the
    value the version that saved it behaved as (its default then)."""
    saved = {**FinetuneConfig().to_dict(), **LEGACY_SETTINGS, **checkpoint.config}
    differing = [k for k, v in config.to_dict().items() if k not in RESUME_FREE and saved.get(k) != v]
    if differing and not config.force:
        raise LatePhaseError(
            f"--resume {run_dir}: the run was started with different settings ({', '.join(differing[:4])}); "
            "use the same flags, or --force to continue with the new ones"
        )
    at = (checkpoint.position.epoch, checkpoint.position.batch)
    entered = FinetuneConfig.from_saved(saved).optim_settings.late and \
        (saved["t0"] == 0 or at > (saved["t0"], 0))
    structural = [k for k in differing if k in STRUCTURAL]
    if entered and structural:
        k = structural[0]
        raise LatePhaseError(
            f"--resume {run_dir}: {flag(k)} cannot change once the late phase has begun ({saved[k]} → "
            f"{config.to_dict()[k]}; the checkpoint holds the members it trained); start a new run instead"
        )


def run(config: FinetuneConfig, *, stop_after: int | None = None, stop_at_epoch: int | None = None,
        command: str | None = None) -> dict[str, Any]:
    """The whole job: validate everything → create the run directory → evaluate the start → Algorithm 1 → collapse →
    save (and push). Returns the report.

    Nothing is written before the settings, model, weights, data, conversion and Hub target were checked.
    `stop_after` stops after that many iterations with a checkpoint (as SIGINT/SIGTERM do), `stop_at_epoch` at the end
    of that epoch (how `lpconvert compare` trains the epochs before T0 once); resume with
    ``FinetuneConfig(resume=run_dir, …)``."""
    config.validate()
    runtime = init_runtime(config)
    checkpoint, run_dir, replacing, phase = None, None, False, "data preparation"
    stop = StopRequest(stop_after, stop_at_epoch)
    try:
        with signals_caught(stop, runtime):
            if config.resume:
                path = Path(config.resume)
                check_continuable(path, config.force)
                run_dir = open_run(path) if runtime.is_main else RunDir(path)
                if run_dir.checkpoint_path("last").is_file():  # else it stopped before its first one: it starts again
                    checkpoint = load_run(path, "last").checkpoint
                    _resumable(config, checkpoint, path)
            else:
                output = output_path(config, runtime)
                replacing = prepare_run(output, config.force) if runtime.is_main else False
            job = prepare(config, runtime, checkpoint)
            log_batch(config, runtime, job.model)
            stop_before_training(stop, runtime, None if run_dir is None else run_dir.path)
            if run_dir is not None and runtime.is_main:  # config.json states the settings the run continues with
                if checkpoint is None:
                    run_dir.restart()
                atomic_write_json(run_dir.config_path, config.to_dict())
            if run_dir is None:
                run_dir = create_run(output, config.to_dict(), replacing) if runtime.is_main else RunDir(output)
            phase = "the start's evaluation" if checkpoint is None else "resuming"
            state = start(job, config, runtime, run_dir) if checkpoint is None else resume(job, config, runtime, checkpoint)
            if checkpoint is None:
                stop_before_training(stop, runtime, run_dir.path)
            phase = "training"
            report = _train(state, job, config, runtime, run_dir, stop, command)
    except RunInterrupted:
        raise
    except Exception as exc:  # one rank's failure ends every rank at once, with its one line
        elsewhere = failure_elsewhere(exc, runtime, waited=f"{config.dist_timeout:g} minutes", phase=phase)
        if elsewhere is not None:
            raise elsewhere from exc
        announce_failure(exc, runtime)
        raise
    finally:
        if run_dir is not None:
            run_dir.close()
    if config.push_to_hub and runtime.is_main:
        from lpconvert.publish.hub import push

        report["pushed"] = push(Path(report["model_dir"]), config.push_to_hub, allow_regression=config.allow_regression)
    return report


def _train(state: TrainState, job: Job, config: FinetuneConfig, runtime: Runtime, run_dir: RunDir, stop: StopRequest,
           command: str | None) -> dict[str, Any]:
    """fit + finish (a stop raises :class:`RunInterrupted` after its checkpoint); a replacement takes its folder's
    place at the end."""
    try:
        fit(state, job, config, runtime, run_dir, stop)
        if not runtime.is_main:
            return {}
        report = finish(state, job, config, runtime, run_dir, command)
        final = run_dir.finish()
        return {**report, "run_dir": str(final), "model_dir": str(final / "model")}
    except torch.OutOfMemoryError as exc:
        raise LatePhaseError(
            f"out of GPU memory in {state.engine.mode} mode with batch {config.batch_size}; "
            "use a smaller --batch-size, --mode sequential or a smaller --group-size"
        ) from exc


def finetune_command() -> str:
    """The command line as the user typed it: ``lpconvert …``, ``python -m lpconvert …``, or under torchrun
    ``torchrun --nnodes N --nproc_per_node M -m lpconvert …`` (from torchrun's environment)."""
    program = "python -m lpconvert" if Path(sys.argv[0]).name == "__main__.py" else Path(sys.argv[0]).name
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        nodes = int(os.environ.get("WORLD_SIZE", "1")) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
        program = (f"torchrun --nnodes {nodes} --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', '1')} "
                   "-m lpconvert")
    return " ".join([program, *sys.argv[1:]])
