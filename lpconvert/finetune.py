"""The fine-tuner: pretrained checkpoint → convert at T0 → Algorithm 1 for N epochs → collapse → save.

Reads top to bottom like torchvision's reference scripts: the optimizers and schedule (:func:`build_engine`,
:func:`lr_factor`), what is checked before anything is written (:func:`prepare`), the :class:`Trainer` with one epoch
of Algorithm 1 (:meth:`Trainer.train_one_epoch`) and the averaged model's validation, then :func:`run`, the whole
job. One process or many (``torchrun --nproc_per_node N -m lpconvert finetune …``: DistributedDataParallel, every
rank training the same member at once); interruptible and exactly resumable.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .collapse import collapse
from .config import FinetuneConfig
from .data import DIGITS, Data, build_data, eval_loader, recalibration_loader, train_loader
from .engine import LatePhaseEngine, iterate_members, shared_batch_norms
from .errors import LatePhaseError, one_line
from .export import eval_bn_stats, export_model
from .late_phase_config import late_phase_config
from .loading import ModelSource, load_model
from .metrics import METRIC_NAMES, evaluate_model
from .plots import plot_curves
from .run_dir import (
    History,
    Position,
    RunCheckpoint,
    RunDir,
    create_run,
    open_run,
    prepare_run,
    rng_state,
    set_rng_state,
)
from .runtime import Runtime, init_runtime
from .surgery import convert, convert_from_config, nothing_to_convert, plan

logger = logging.getLogger(__name__)
VECTORIZE_MAX_PIXELS = 2**22  # auto mode stacks the K minibatches when K·B·H·W stays below this (≈4k CIFAR images)
#: Settings a resumed run may differ in without --force (they do not change what is computed).
RESUME_FREE = ("resume", "force", "quiet", "workers", "log_every", "output", "push_to_hub", "allow_regression")
__all__ = ["DIGITS", "RunInterrupted", "build_engine", "lr_factor", "prepare", "run"]


class RunInterrupted(Exception):
    """Training stopped early (signal or ``stop_after``); a checkpoint was saved in `run_dir` to resume from."""

    def __init__(self, reason: str, run_dir: Path) -> None:
        super().__init__(reason)
        self.run_dir = run_dir


# --------------------------------------------------------------------------------------------------------------------
# optimizers, members, schedule: one source for each
# --------------------------------------------------------------------------------------------------------------------
def has_late_phase(config: FinetuneConfig) -> bool:
    """K members, or the gradient-accumulation control (``--K 1 --accumulate M``), from epoch T0 on; plain
    fine-tuning (K = 1) has no late phase."""
    return config.K > 1 or config.accumulate > 1


def minibatches_per_iteration(config: FinetuneConfig, K: int, late: bool) -> int:
    """One minibatch per member; in the late phase, K = 1 with ``--accumulate M`` is the gradient-accumulation control
    (the single member steps on every minibatch, θ once per M)."""
    if K > 1:
        return K
    return config.accumulate if late else 1


def gamma_theta(config: FinetuneConfig, K: int, late: bool) -> float:
    """γθ: the flag, else 1/(minibatches per iteration) — 1/K, 1/M for the control, 1 for plain fine-tuning."""
    per_iteration = minibatches_per_iteration(config, K, late)
    if config.gamma_theta is not None and per_iteration > 1:
        return config.gamma_theta
    return 1.0 / per_iteration


@dataclass(frozen=True)
class OptimizerSettings:
    name: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float

    def factory(self) -> Callable:
        if self.name == "sgd":
            return partial(torch.optim.SGD, lr=self.lr, momentum=self.momentum,
                           nesterov=self.nesterov and self.momentum > 0, weight_decay=self.weight_decay)
        optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.name]
        return partial(optimizer, lr=self.lr, weight_decay=self.weight_decay)


def optimizer_settings(config: FinetuneConfig, late: bool) -> tuple[OptimizerSettings, OptimizerSettings]:
    """U_θ, and U_φ — which in the late phase inherits every setting its ``--member-*`` flags do not override, and
    before it (the plain epochs before T0) is U_θ."""
    theta = OptimizerSettings(config.optimizer, config.lr, config.momentum, config.nesterov, config.weight_decay)
    if not late:
        return theta, theta
    member = OptimizerSettings(
        config.member_optimizer or config.optimizer, config.member_lr if config.member_lr is not None else config.lr,
        config.momentum, config.nesterov,
        config.member_weight_decay if config.member_weight_decay is not None else config.weight_decay,
    )
    return theta, member


def choose_mode(config: FinetuneConfig, model: nn.Module, K: int, input_size: tuple[int, ...], runtime: Runtime) -> str:
    """Vectorized on a GPU when every batch-statistics layer is late-phase and K stacked minibatches stay small (on a
    CPU a K-times larger batch is not faster per image: see zoo/BENCHMARKS.md)."""
    if config.mode != "auto":
        return config.mode
    if K == 1 or runtime.device.type != "cuda" or shared_batch_norms(model):
        return "sequential"
    pixels = K * (config.batch_size // runtime.world_size) * math.prod(input_size[-2:])
    return "vectorized" if pixels <= VECTORIZE_MAX_PIXELS else "sequential"


def build_engine(train_model: nn.Module, config: FinetuneConfig, K: int, mode: str, runtime: Runtime,
                 late: bool) -> LatePhaseEngine:
    """The engine with U_θ and U_φ of :func:`optimizer_settings` and γθ of :func:`gamma_theta`."""
    theta, member = optimizer_settings(config, late)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.amp_dtype == torch.float16 else None
    engine = LatePhaseEngine(train_model, theta.factory(), member.factory(), mode=mode, group_size=config.group_size,
                             autocast_dtype=runtime.amp_dtype, grad_scaler=scaler)
    apply_settings(engine, config, late)
    return engine


def apply_settings(engine: LatePhaseEngine, config: FinetuneConfig, late: bool) -> None:
    """The config's learning rates (as the schedule's base), weight decay, momentum and γθ — also over optimizer
    states loaded from a checkpoint, so that a run resumed with changed settings (``--force``) trains with them."""
    theta, member = optimizer_settings(config, late)
    pairs = [(engine.theta_optimizer, theta)] + [(optimizer, member) for optimizer in engine.member_optimizers]
    for optimizer, settings in pairs:
        for group in optimizer.param_groups if optimizer is not None else ():
            group["base_lr"] = settings.lr
            if not group.get("no_weight_decay"):
                group["weight_decay"] = settings.weight_decay
            if "nesterov" in group:  # SGD
                group["momentum"], group["nesterov"] = settings.momentum, settings.nesterov and settings.momentum > 0
    engine.gamma_theta = gamma_theta(config, engine.num_members, late)


def lr_factor(config: FinetuneConfig, epoch: float) -> float:
    """The schedule as a factor of the base learning rates at fractional epoch `epoch`."""
    if config.swa_start is not None and epoch >= config.swa_start and config.swa_lr is not None:
        return config.swa_lr / config.lr
    end = config.lr_end / config.lr
    if config.schedule == "multistep":
        return config.lr_gamma ** sum(epoch >= m for m in config.milestones)
    if config.schedule == "linear":  # constant, linear from anneal_start to anneal_end, constant (paper's CIFAR runs)
        stop = config.epochs if config.anneal_end is None else config.anneal_end
        progress = min(max((epoch - config.anneal_start) / max(stop - config.anneal_start, 1e-12), 0.0), 1.0)
        return 1.0 + (end - 1.0) * progress
    if config.schedule == "cosine":
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * min(epoch / config.epochs, 1.0)))
    return 1.0


def set_learning_rates(engine: LatePhaseEngine, factor: float) -> None:
    for optimizer in engine.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor


# --------------------------------------------------------------------------------------------------------------------
# everything checked before the run directory appears
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """What a run works with, loaded and checked: nothing of it has touched the disk."""

    model: nn.Module
    source: ModelSource
    data: Data
    train: DataLoader
    val: DataLoader
    recalibration: DataLoader | None
    input_size: tuple[int, ...]


def prepare(config: FinetuneConfig, runtime: Runtime, checkpoint: RunCheckpoint | None = None) -> Job:
    """Load and check the model, its weights, the data, the conversion and the Hub target; write nothing.

    Each failure is a one-line :class:`LatePhaseError`: unknown model or weights, weights that are not floating point
    or not finite, data that cannot be opened or decoded, a model that cannot run on the data, late-phase targets
    that match nothing, fewer late-phase minibatches than members, ``--push-to-hub`` without a token."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, source = load_model(config.model, weights=config.weights if checkpoint is None else None,
                               num_classes=config.num_classes, pretrained=config.pretrained and checkpoint is None)
    if checkpoint is not None:
        source = ModelSource(**checkpoint.source)  # the base model, as the run started from it
    if config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    data = build_data(config, model)
    pin = runtime.device.type == "cuda"
    train = train_loader(data.train, config.batch_size, seed=config.seed, workers=config.workers, rank=runtime.rank,
                         world_size=runtime.world_size, pin_memory=pin)
    val = eval_loader(data.val, config.batch_size, workers=config.workers, pin_memory=pin)
    recalibration = recalibration_loader(data.train, config.batch_size, seed=config.seed, workers=config.workers,
                                         pin_memory=pin) if runtime.is_main else None
    _check_model_runs_on_data(model, data)
    report = plan(model, config.K, config.late_phase, include=config.include or None, exclude=config.exclude or None,
                  options=config.kind_options())
    if not report.targets:
        raise LatePhaseError(nothing_to_convert(model, report))
    late_minibatches = (config.epochs - config.t0) * train.batch_sampler.batches_per_epoch
    if config.K > 1 and late_minibatches < config.K:
        raise LatePhaseError(
            f"--K {config.K} members but only {late_minibatches} late-phase minibatches in the run: some members "
            "would never train; lower --K or --batch-size, or train more epochs"
        )
    if config.push_to_hub and runtime.is_main:
        from huggingface_hub import get_token

        if get_token() is None:
            raise LatePhaseError(f"--push-to-hub {config.push_to_hub} needs a Hub token: set HF_TOKEN or run "
                                 "`hf auth login` first (checked now, not after the training)")
    input_size = (1, 8, 8) if config.data == DIGITS else getattr(model, "pretrained_cfg", {}).get("input_size",
                                                                                                  (3, 224, 224))
    return Job(model.to(runtime.device), source, data, train, val, recalibration, tuple(input_size))


def _check_model_runs_on_data(model: nn.Module, data: Data) -> None:
    """Decode one training image and one validation image and run the model on them (channels, sizes, classes)."""
    (x, y), (vx, _) = data.train[(0, 0)], data.val[0]
    was_training = model.training
    try:
        with torch.no_grad():
            logits = model.eval()(torch.stack([x, vx]))
    except RuntimeError as err:
        raise LatePhaseError(f"the model cannot run on this data ({one_line(err)}); check that --data matches "
                             f"the model's input (channels, image size)") from err
    finally:
        model.train(was_training)
    if logits.dim() != 2 or int(y) >= logits.shape[1]:
        raise LatePhaseError(f"the model outputs {tuple(logits.shape[1:])} scores but the data has label {int(y)}; "
                             "pass --num-classes with the data's number of classes")


# --------------------------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------------------------
class _Stop:
    """Set by SIGINT/SIGTERM; the loop saves a checkpoint at the next iteration boundary and exits."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def __call__(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name


def _metrics_row(epoch: int, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
    row = {"epoch": epoch, **extra}
    row.update({f"val_{k}": v for k, v in metrics.items() if k in METRIC_NAMES})
    return row


class Trainer:
    """One fine-tuning run over a prepared :class:`Job`: Algorithm 1 epoch after epoch, checkpoints, export."""

    def __init__(self, config: FinetuneConfig, runtime: Runtime, job: Job, run_dir: RunDir,
                 checkpoint: RunCheckpoint | None = None) -> None:
        self.config, self.runtime, self.job, self.run_dir = config, runtime, job, run_dir
        self.model = job.model
        self.stop = _Stop()
        self.position, self.history = Position(), History()
        self.swa: nn.Module | None = None
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.batches_per_epoch = job.train.batch_sampler.batches_per_epoch
        self.engine: LatePhaseEngine
        self.mode: str
        if checkpoint is None:
            self.late = has_late_phase(config) and config.t0 == 0
            self.evaluate_start()
            self._convert(config.K if self.late else 1)
        else:
            at = (checkpoint.position.epoch, checkpoint.position.batch)  # (T0, 0): the switch is still to come
            self.late = has_late_phase(config) and (config.t0 == 0 or at > (config.t0, 0))
            self._convert_as(checkpoint)
            self._restore(checkpoint)

    # -- members ----------------------------------------------------------------------------------------------------
    def _convert(self, K: int) -> None:
        """Turn the model into K members at T0 = its current weights (Eq. 2 initialisation)."""
        config = self.config
        convert(self.model, K, config.late_phase, include=config.include or None, exclude=config.exclude or None,
                sigma0=config.sigma0 if K > 1 else 0.0, seed=config.seed, options=config.kind_options())
        self._build_engine(K)

    def _convert_as(self, checkpoint: RunCheckpoint) -> None:
        """The late-phase layers a checkpoint was saved with, by their names (no tracing)."""
        convert_from_config(self.model, checkpoint.late_phase)
        self._build_engine(checkpoint.late_phase.K)

    def _build_engine(self, K: int) -> None:
        runtime = self.runtime
        self.model.to(runtime.device)
        if runtime.channels_last:
            self.model.to(memory_format=torch.channels_last)
        train_model = self.model
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, **_no_buffer_sync())
        if self.config.compile:
            train_model = torch.compile(train_model)
        self.mode = choose_mode(self.config, self.model, K, self.job.input_size, runtime)
        self.engine = build_engine(train_model, self.config, K, self.mode, runtime, self.late)

    def _switch_to_late_phase(self) -> None:
        """T0 reached: the single member so far becomes K members (or the control's accumulating one), U_φ takes the
        late-phase settings; U_θ's state carries over, and the members start from the single member's optimizer
        state when U_φ keeps its optimizer class."""
        previous = self.engine
        self.late = True
        self.model = collapse(self.model, bn_stats="mean", inplace=True)
        self._convert(self.config.K)
        if previous.theta_optimizer is not None and self.engine.theta_optimizer is not None:
            self.engine.theta_optimizer.load_state_dict(previous.theta_optimizer.state_dict())
        for optimizer in self.engine.member_optimizers:
            if type(optimizer) is type(previous.member_optimizers[0]):
                optimizer.load_state_dict(previous.member_optimizers[0].state_dict())
        apply_settings(self.engine, self.config, self.late)

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def checkpoint(self) -> RunCheckpoint:
        return RunCheckpoint(
            config=self.config.to_dict(), source=self.job.source.to_dict(), late_phase=late_phase_config(self.model),
            model={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            engine=self.engine.state_dict(), position=Position(**vars(self.position)),
            history=History(self.history.base, list(self.history.epochs), self.history.best_epoch),
            swa=None if self.swa is None else {k: v.detach().cpu() for k, v in self.swa.state_dict().items()},
            rng=rng_state(), started=self.started, label_names=self.job.data.label_names,
            data_fingerprint=self.job.data.fingerprint,
        )

    def _restore(self, checkpoint: RunCheckpoint) -> None:
        self.model.load_state_dict(checkpoint.model)
        self.engine.load_state_dict(checkpoint.engine)
        apply_settings(self.engine, self.config, self.late)  # the config's settings, also when they changed (--force)
        self.position, self.history = checkpoint.position, checkpoint.history
        if checkpoint.swa is not None:
            self._start_swa()
            self.swa.load_state_dict(checkpoint.swa)
        set_rng_state(checkpoint.rng)
        self.started = checkpoint.started or self.started

    def save(self, name: str = "last") -> None:
        if self.runtime.is_main:
            self.run_dir.save_checkpoint(self.checkpoint(), name)

    def _start_swa(self) -> None:
        from torch.optim.swa_utils import AveragedModel

        self.swa = AveragedModel(self.model, use_buffers=False)

    # -- the loop ---------------------------------------------------------------------------------------------------
    def evaluate_start(self) -> None:
        """Epoch 0 of metrics.jsonl: the starting checkpoint, before any training."""
        if not self.runtime.is_main:
            return
        self.history.base = evaluate_model(self.model, self.job.val, device=self.runtime.device,
                                           amp_dtype=self.runtime.amp_dtype,
                                           progress=None if self.config.quiet else "evaluating the start")
        self.history.epochs.append(_metrics_row(0, self.history.base))
        self.run_dir.write_metrics(self.history.epochs)

    def fit(self, stop_after: int | None = None) -> None:
        config = self.config
        while self.position.epoch < config.epochs:
            epoch = self.position.epoch
            if epoch == config.t0 and has_late_phase(config) and not self.late and self.position.batch == 0:
                self._switch_to_late_phase()
            if config.swa_start is not None and epoch >= config.swa_start and self.swa is None:
                self._start_swa()
            stats = self.train_one_epoch(stop_after)
            self._sync_member_statistics()
            if self.swa is not None:
                self.swa.update_parameters(self.model)
            metrics = self.evaluate_averaged() if self.runtime.is_main else None
            row = _metrics_row(epoch + 1, metrics or {}, **stats, K=self.engine.num_members)
            self.history.epochs.append(row)
            improved = metrics is not None and (
                self.history.best_epoch is None
                or metrics["top1"] > self.history.row(self.history.best_epoch)["val_top1"]
            )
            if improved:
                self.history.best_epoch = epoch + 1
            self.position = Position(epoch=epoch + 1, iteration=self.position.iteration)
            self.save("last")
            if self.runtime.is_main:
                self.run_dir.write_metrics(self.history.epochs)
            if improved:
                self.save("best")
            if self.runtime.is_main:
                logger.info(
                    "epoch %d/%d  loss %.4f  val top-1 %.2f  (start %.2f)  %.0f img/s", epoch + 1, config.epochs,
                    stats["train_loss"], row.get("val_top1", float("nan")), self.history.base["top1"],
                    stats["images_per_s"],
                )
            if self.runtime.distributed:
                dist.barrier()

    def train_one_epoch(self, stop_after: int | None) -> dict[str, Any]:
        """Algorithm 1 over one epoch: iterations of one minibatch per member (round robin, continued across epochs),
        learning rates set per iteration, no host sync except every ``--log-every`` iterations."""
        config, runtime, engine, position = self.config, self.runtime, self.engine, self.position
        per_iteration = minibatches_per_iteration(config, engine.num_members, self.late)
        self.job.train.batch_sampler.set_position(position.epoch, position.batch)
        self.model.train()
        loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
        finite = torch.ones((), device=runtime.device, dtype=torch.bool)
        seen, started = 0, time.perf_counter()
        iterations = math.ceil((self.batches_per_epoch - position.batch) / per_iteration)
        bar = _progress(iterations, f"epoch {position.epoch + 1}/{config.epochs}",
                        disable=config.quiet or not runtime.is_main)
        for step, (xs, ys) in enumerate(iterate_members(self.job.train, per_iteration)):
            xs = [runtime.to_device(x) for x in xs]
            ys = [y.to(runtime.device, non_blocking=True) for y in ys]
            set_learning_rates(engine, lr_factor(config, position.epoch + position.batch / self.batches_per_epoch))
            losses = engine.step(xs, ys)
            loss_sum += losses.sum()
            finite &= torch.isfinite(losses).all()
            position.batch += len(xs)
            position.iteration += 1
            position.loss_count += len(xs)
            seen += sum(x.shape[0] for x in xs) * runtime.world_size
            bar.update(1)
            boundary = (step + 1) % config.log_every == 0 or position.batch >= self.batches_per_epoch
            checkpoint_due = config.checkpoint_every and position.iteration % config.checkpoint_every == 0
            stopping = self.stop.requested or (stop_after is not None and position.iteration >= stop_after)
            if boundary or checkpoint_due or stopping:
                self._check_finite(finite)
                position.loss_sum += loss_sum.item()
                loss_sum.zero_()
                bar.set_postfix(members=engine.num_members,
                                loss=f"{position.loss_sum / max(position.loss_count, 1):.4f}",
                                lr=f"{engine.optimizers[0].param_groups[0]['lr']:.2e}",
                                img_s=f"{seen / (time.perf_counter() - started):.0f}")
            if checkpoint_due or stopping:
                self.save("last")
            if stopping:
                bar.close()
                reason = self.stop.requested or f"stopped after {position.iteration} iterations"
                raise RunInterrupted(reason, self.run_dir.path)
        bar.close()
        elapsed = time.perf_counter() - started
        if runtime.distributed:  # every rank saw its own shard: report the loss over the global batches
            total = torch.tensor([position.loss_sum], dtype=torch.float64, device=runtime.device)
            dist.all_reduce(total)
            position.loss_sum = total.item() / runtime.world_size
        return {"train_loss": position.loss_sum / max(position.loss_count, 1),
                "lr": engine.optimizers[0].param_groups[0]["lr"], "images_per_s": seen / max(elapsed, 1e-9)}

    def evaluate_averaged(self) -> dict[str, float]:
        """Collapse a copy of the late-phase model (or of its SWA average) with the run's BN statistics and evaluate
        it on the validation set."""
        source = self.swa.module if self.swa is not None else self.model
        mode = eval_bn_stats(self.config, self.swa is not None)
        averaged = collapse(source, bn_stats=mode, data=self._recalibration_batches(mode),
                            num_batches=self.config.recalibrate_batches)
        return evaluate_model(averaged, self.job.val, device=self.runtime.device, amp_dtype=self.runtime.amp_dtype)

    def _recalibration_batches(self, mode: str):
        if mode != "recalibrate":
            return None
        return ((self.runtime.to_device(x), y) for x, y in self.job.recalibration)

    def _check_finite(self, finite: torch.Tensor) -> None:
        if not bool(finite):
            raise LatePhaseError(
                f"non-finite loss at epoch {self.position.epoch + 1}, iteration {self.position.iteration}; stopped — "
                "the last good checkpoint is intact (lower --lr, or try --amp off)"
            )

    def _sync_member_statistics(self) -> None:
        """Average the per-member BN running statistics across ranks (each rank estimated them on its shard)."""
        if not self.runtime.distributed:
            return
        for buffer in self.model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= self.runtime.world_size

    # -- the end ----------------------------------------------------------------------------------------------------
    def finish(self, command: str | None) -> dict[str, Any]:
        """Collapse the selected epoch's model (``--select``), write the model directory, the report and the plot.

        The best epoch may lie before T0: it is exported as what it is, the plain model (K = 1)."""
        config, history = self.config, self.history
        chosen = "best" if config.select == "best" and history.best_epoch is not None else "last"
        epoch = history.best_epoch if chosen == "best" else history.epochs[-1]["epoch"]
        model, swa = self.model, self.swa
        if chosen == "best":
            model, swa = self._model_of(self.run_dir.load_checkpoint("best"))
        mode = eval_bn_stats(config, swa is not None)
        metrics = export_model(
            swa.module if swa is not None else model, self.run_dir.model_dir, config=config, source=self.job.source,
            history=history, epoch=epoch, chosen=chosen, bn_stats=mode, data=self._recalibration_batches(mode),
            extra={"command": command, "data_fingerprint": self.job.data.fingerprint, "started": self.started},
            label_names=self.job.data.label_names,
        )
        K = late_phase_config(model).K
        report = {
            "run_dir": str(self.run_dir.final_path), "model_dir": str(self.run_dir.final_path / "model"), "K": K,
            "select": chosen, "epoch": epoch, "bn_stats": mode, "mode": self.mode,
            "start_top1": metrics["base"]["top1"], "final_top1": metrics["final"]["top1"],
            "change": metrics["final"]["top1"] - metrics["base"]["top1"],
        }
        if K != config.K:
            report["note"] = f"the best epoch, {epoch}, came before T0 = {config.t0}: the plain model (K = 1) is exported"
        self.run_dir.write_report(report)
        plot_curves(history.epochs, self.run_dir.curves_path)
        return report

    def _model_of(self, checkpoint: RunCheckpoint) -> tuple[nn.Module, nn.Module | None]:
        """The late-phase model (and SWA average) saved in `checkpoint`, whatever its K was."""
        model = self.model
        if checkpoint.late_phase.to_dict() != late_phase_config(model).to_dict():  # e.g. the plain model before T0
            model = convert_from_config(collapse(self.model, bn_stats="mean"), checkpoint.late_phase)
        model.load_state_dict(checkpoint.model)
        swa = None
        if checkpoint.swa is not None:
            from torch.optim.swa_utils import AveragedModel

            swa = AveragedModel(model, use_buffers=False)
            swa.load_state_dict(checkpoint.swa)
        return model, swa


def _no_buffer_sync() -> dict[str, bool]:
    """Per-member BN statistics stay rank-local during an epoch (averaged at its end), under either DDP spelling."""
    import inspect

    names = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


def _progress(total: int, description: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=disable, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------------------------
def output_path(config: FinetuneConfig) -> Path:
    """``--output``, or ``runs/MODEL-K<K>``."""
    return Path(config.output or Path("runs") / (config.model.replace(":", "-").replace("/", "-") + f"-K{config.K}"))


def _resumable(config: FinetuneConfig, checkpoint: RunCheckpoint, run_dir: Path) -> None:
    differing = [k for k, v in config.to_dict().items() if k not in RESUME_FREE and checkpoint.config.get(k) != v]
    if differing and not config.force:
        raise LatePhaseError(
            f"--resume {run_dir}: the run was started with different settings ({', '.join(differing[:4])}); "
            "use the same flags, or --force to continue with the new ones"
        )


def run(config: FinetuneConfig, *, stop_after: int | None = None, command: str | None = None) -> dict[str, Any]:
    """The whole job: validate everything → create the run directory → evaluate the start → Algorithm 1 → collapse →
    save (and push). Returns the report.

    Nothing is written before the settings, model, weights, data, conversion and Hub target were checked.
    `stop_after` stops after that many iterations with a checkpoint (as SIGINT/SIGTERM do); resume with
    ``FinetuneConfig(resume=run_dir, …)``."""
    config.validate()
    runtime = init_runtime(config)
    checkpoint, run_dir, replacing = None, None, False
    if config.resume:
        path = Path(config.resume)
        run_dir = open_run(path) if runtime.is_main else RunDir(path)
        checkpoint = run_dir.load_checkpoint("last")
        _resumable(config, checkpoint, path)
    elif runtime.is_main:
        replacing = prepare_run(output_path(config), config.force)
    try:
        job = prepare(config, runtime, checkpoint)
        if run_dir is None:
            run_dir = create_run(output_path(config), config.to_dict(), replacing) if runtime.is_main else \
                RunDir(output_path(config))
        if config.schedule == "multistep" and any(m >= config.epochs for m in config.milestones):
            logger.warning("--milestones %s: those at or after --epochs %d never take effect",
                           ",".join(map(str, config.milestones)), config.epochs)
        trainer = Trainer(config, runtime, job, run_dir, checkpoint)
        report = _train(trainer, stop_after, command)
    finally:
        if run_dir is not None:
            run_dir.close()
    if config.push_to_hub and runtime.is_main:
        from .hub import push

        report["pushed"] = push(Path(report["model_dir"]), config.push_to_hub, allow_regression=config.allow_regression)
    return report


def _train(trainer: Trainer, stop_after: int | None, command: str | None) -> dict[str, Any]:
    """fit + finish with SIGINT/SIGTERM turned into a checkpoint; a replacement takes its folder's place at the end."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, trainer.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.fit(stop_after)
        if not trainer.runtime.is_main:
            return {}
        report = trainer.finish(command)
        final = trainer.run_dir.finish()
        return {**report, "run_dir": str(final), "model_dir": str(final / "model")}
    except torch.OutOfMemoryError as exc:
        raise LatePhaseError(
            f"out of GPU memory in {trainer.mode} mode with batch {trainer.config.batch_size}; "
            "use a smaller --batch-size, --mode sequential or a smaller --group-size"
        ) from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def finetune_command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
