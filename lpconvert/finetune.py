"""The fine-tuner: pretrained checkpoint → convert at T0 → Algorithm 1 for N epochs → collapse → save.

Reads top to bottom like torchvision's reference scripts: ``build_data``, ``build_engine``, ``train_one_epoch``,
``evaluate_averaged`` and ``run``. One process or many (``torchrun --nproc_per_node N -m lpconvert finetune …``:
DistributedDataParallel, every rank training the same member at once); interruptible and exactly resumable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import load_late_phase, load_run_checkpoint, save_pretrained
from .collapse import collapse
from .config import FinetuneConfig
from .data import build_datasets, data_fingerprint, digits_datasets, resolve_data_dirs
from .engine import LatePhaseEngine, iterate_members, shared_batch_norms
from .errors import LatePhaseError
from .files import atomic_save_torch, atomic_write_bytes, atomic_write_json
from .loading import ModelSource, load_model
from .metrics import evaluate_model
from .sampler import EpochBatchSampler, SeededSamples
from .surgery import convert, late_phase_layers, resolve_kinds

logger = logging.getLogger(__name__)
DIGITS = "sklearn-digits"  # the built-in real data set of the offline demo
VECTORIZE_MAX_PIXELS = 2**22  # auto mode stacks the K minibatches when K·B·H·W stays below this (≈4k CIFAR images)


class RunInterrupted(Exception):
    """Training stopped early (signal or ``stop_after``); a checkpoint was saved to resume from."""


# --------------------------------------------------------------------------------------------------------------------
# processes and devices
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(config: FinetuneConfig) -> Runtime:
    """Device, distributed process group (from torchrun's environment), autocast dtype and memory format."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LatePhaseError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}.get(config.amp)
    if config.amp == "auto":
        amp = torch.bfloat16 if device.type == "cuda" else None
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    return Runtime(device, rank, world_size, amp, channels_last)


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Data:
    train: Dataset
    val: Dataset
    fingerprint: dict[str, Any]
    label_names: list[str] | None = None


def build_data(config: FinetuneConfig, model: nn.Module) -> Data:
    """Training and validation sets with the model's own preprocessing (its timm data config)."""
    if config.data == DIGITS:
        train, val = digits_datasets()  # one split for every seed: the T0 model never sees a test digit
        return Data(train, val, {"dataset": DIGITS, "num_files": len(train) + len(val)}, [str(d) for d in range(10)])
    import timm.data

    train_dir, val_dir = resolve_data_dirs(config.data, config.train_dir, config.val_dir)
    if train_dir is None or val_dir is None:
        raise LatePhaseError("fine-tuning needs a training and a validation set; pass --data ROOT or --train-dir/--val-dir")
    data_config = timm.data.resolve_data_config(model=model)
    train, val = build_datasets(
        train_dir, val_dir, data_config=data_config, num_classes=_num_classes(model),
        train_subset=config.train_subset, val_subset=config.val_subset, seed=config.subset_seed,
        train_transform=config.train_transform,
    )
    transform, train.transform = train.transform, None
    fingerprint = {"train": data_fingerprint(train), "val": data_fingerprint(val)}
    names = sorted(train.class_to_idx, key=train.class_to_idx.get)
    return Data(SeededSamples(train, transform, config.seed), val, fingerprint, names)


def _num_classes(model: nn.Module) -> int | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return getattr(head, "out_features", None) or getattr(model, "num_classes", None)


def train_loader(data: Data, config: FinetuneConfig, runtime: Runtime) -> DataLoader:
    """Batches in a (seed, epoch)-determined order, split across ranks; position settable for resuming."""
    if len(data.train) < config.batch_size:
        raise LatePhaseError(
            f"the training set has {len(data.train)} images, fewer than one batch of {config.batch_size}; "
            "lower --batch-size"
        )
    samples = data.train if isinstance(data.train, SeededSamples) else SeededSamples(data.train)
    sampler = EpochBatchSampler(
        len(samples), config.batch_size, seed=config.seed, rank=runtime.rank, world_size=runtime.world_size
    )
    return DataLoader(
        samples, batch_sampler=sampler, num_workers=config.workers, pin_memory=runtime.device.type == "cuda",
        persistent_workers=config.workers > 0,
    )


def eval_loader(dataset: Dataset, config: FinetuneConfig, runtime: Runtime) -> DataLoader:
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.workers,
                      pin_memory=runtime.device.type == "cuda")


# --------------------------------------------------------------------------------------------------------------------
# model, engine, schedule
# --------------------------------------------------------------------------------------------------------------------
def _optimizer_factory(name: str, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> Callable:
    if name == "sgd":
        return partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                       weight_decay=weight_decay)
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return partial(optimizer, lr=lr, weight_decay=weight_decay)


def choose_mode(config: FinetuneConfig, model: nn.Module, K: int, input_size: tuple[int, ...], runtime: Runtime) -> str:
    """Vectorized on a GPU when every batch-statistics layer is late-phase and K stacked minibatches stay small (on a
    CPU a K-times larger batch is not faster per image: see zoo/BENCHMARKS.md)."""
    if config.mode != "auto":
        return config.mode
    if K == 1 or runtime.device.type != "cuda" or shared_batch_norms(model):
        return "sequential"
    pixels = K * (config.batch_size // runtime.world_size) * math.prod(input_size[-2:])
    return "vectorized" if pixels <= VECTORIZE_MAX_PIXELS else "sequential"


def build_engine(model: nn.Module, train_model: nn.Module, config: FinetuneConfig, K: int, mode: str,
                 runtime: Runtime) -> LatePhaseEngine:
    """U_θ and U_φ from the config (U_φ inherits every setting it does not override)."""
    theta = _optimizer_factory(config.optimizer, config.lr, config.momentum, config.nesterov, config.weight_decay)
    member = _optimizer_factory(
        config.member_optimizer or config.optimizer,
        config.member_lr if config.member_lr is not None else config.lr,
        config.momentum, config.nesterov,
        config.member_weight_decay if config.member_weight_decay is not None else config.weight_decay,
    )
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.amp_dtype == torch.float16 else None
    engine = LatePhaseEngine(
        train_model, theta, member, gamma_theta=config.gamma_theta if K > 1 or config.accumulate > 1 else 1.0,
        mode=mode, group_size=config.group_size, autocast_dtype=runtime.amp_dtype, grad_scaler=scaler,
    )
    if K == 1 and config.accumulate > 1 and config.gamma_theta is None:
        engine.gamma_theta = 1.0 / config.accumulate
    for optimizer in engine.optimizers:
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
    return engine


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
# the run state: everything a resumed run needs
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Position:
    epoch: int = 0          # the epoch being trained (0-based)
    batch: int = 0          # global batches of this epoch already trained
    iteration: int = 0      # Algorithm-1 iterations since the start of the run
    loss_sum: float = 0.0   # this epoch's summed member losses so far
    loss_count: int = 0


@dataclass
class History:
    base: dict[str, float] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None


def late_phase_spec(model: nn.Module) -> dict[str, Any]:
    layers = late_phase_layers(model)
    return {"K": next(iter(layers.values())).num_members, "layers": {n: l.kind for n, l in layers.items()}}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------------------------------
class _Stop:
    """Set by SIGINT/SIGTERM; the loop saves a checkpoint at the next iteration boundary and exits."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def __call__(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name


def _to_device(x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    x = x.to(runtime.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last and x.dim() == 4 else x


def _recalibration_batches(train: DataLoader, runtime: Runtime):
    """Training batches (with their augmentation) on the device, from the start of the epoch-0 order."""
    train.batch_sampler.set_position(0)
    return ((_to_device(x, runtime), y) for x, y in train)


def evaluate_averaged(model: nn.Module, config: FinetuneConfig, val: DataLoader, train: DataLoader,
                      runtime: Runtime, swa: nn.Module | None = None) -> dict[str, float]:
    """Collapse a copy of the late-phase model (or of its SWA average) with --bn-stats and evaluate it."""
    source = swa.module if swa is not None else model
    bn_stats = _eval_bn_stats(config, swa is not None)
    data = None
    if bn_stats == "recalibrate":
        data = _recalibration_batches(train, runtime)
    averaged = collapse(source, bn_stats=bn_stats, data=data, num_batches=config.recalibrate_batches)
    return evaluate_model(averaged, val, device=runtime.device, amp_dtype=runtime.amp_dtype)


def _metrics_row(epoch: int, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
    row = {"epoch": epoch, **extra}
    row.update({f"val_{k}": v for k, v in metrics.items() if k in ("top1", "top5", "nll", "ece")})
    return row


class Trainer:
    """One fine-tuning run; `run()` below is the whole job."""

    def __init__(self, config: FinetuneConfig, run_dir: Path, runtime: Runtime) -> None:
        self.config, self.run_dir, self.runtime = config, run_dir, runtime
        self.stop = _Stop()
        self.position, self.history = Position(), History()
        self.swa: nn.Module | None = None
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # -- setup ----------------------------------------------------------------------------------------------------
    def setup(self, resume_state: dict[str, Any] | None) -> None:
        config, runtime = self.config, self.runtime
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        pretrained = config.pretrained and resume_state is None
        self.model, self.source = load_model(
            config.model, weights=config.weights if resume_state is None else None,
            num_classes=config.num_classes, pretrained=pretrained,
        )
        if config.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.data = build_data(config, self.model)
        self.train_loader = train_loader(self.data, config, runtime)
        self.val_loader = eval_loader(self.data.val, config, runtime)
        self.batches_per_epoch = self.train_loader.batch_sampler.batches_per_epoch
        self.model.to(runtime.device)
        if resume_state is None and runtime.is_main:  # measure the start: epoch 0 of metrics.jsonl
            create_run_dir(self.run_dir, config)
            self.history.base = evaluate_model(self.model, self.val_loader, device=runtime.device,
                                               amp_dtype=runtime.amp_dtype)
            self.history.epochs.append(_metrics_row(0, self.history.base))
            self._write_metrics()
        K = resume_state["late_phase"]["K"] if resume_state else (1 if config.t0 > 0 else config.K)
        self._convert(K)
        if resume_state is not None:
            self._restore(resume_state)

    def _convert(self, K: int, previous: LatePhaseEngine | None = None) -> None:
        """Turn the model into K members at T0 = its current weights; carry U_θ's state over at a T0 switch."""
        config, runtime = self.config, self.runtime
        convert(self.model, K, config.late_phase, include=config.include or None, exclude=config.exclude or None,
                sigma0=config.sigma0 if K > 1 else 0.0, seed=config.seed)
        self.model.to(runtime.device)
        if runtime.channels_last:
            self.model.to(memory_format=torch.channels_last)
        train_model = self.model
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, **_no_buffer_sync())
        if config.compile:
            train_model = torch.compile(train_model)
        input_size = getattr(self.model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
        if config.data == DIGITS:
            input_size = (1, 8, 8)
        self.mode = choose_mode(config, self.model, K, input_size, runtime)
        self.engine = build_engine(self.model, train_model, config, K, self.mode, runtime)
        if previous is not None:
            if previous.theta_optimizer is not None and self.engine.theta_optimizer is not None:
                self.engine.theta_optimizer.load_state_dict(previous.theta_optimizer.state_dict())
            for optimizer in self.engine.member_optimizers:
                optimizer.load_state_dict(previous.member_optimizers[0].state_dict())

    def _switch_to_late_phase(self) -> None:
        """T0 reached: the single member so far becomes K members (Eq. 2 initialisation)."""
        previous = self.engine
        self.model = collapse(self.model, bn_stats="mean", inplace=True)
        self._convert(self.config.K, previous)

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": "lpconvert-run", "version": 1,
            "config": self.config.to_dict(),
            "source": self.source.to_dict(),
            "late_phase": late_phase_spec(self.model),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "engine": self.engine.state_dict(),
            "position": vars(self.position).copy(),
            "history": {"base": self.history.base, "epochs": self.history.epochs, "best_epoch": self.history.best_epoch},
            "swa": None if self.swa is None else {
                "model": {k: v.detach().cpu() for k, v in self.swa.state_dict().items()}},
            "rng": _rng_state(),
            "started": self.started,
            "label_names": self.data.label_names,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.engine.load_state_dict(state["engine"])
        self.position = Position(**state["position"])
        self.history = History(**state["history"])
        if state["swa"] is not None:
            self._start_swa()
            self.swa.load_state_dict(state["swa"]["model"])
        _set_rng_state(state["rng"])
        self.started = state.get("started", self.started)

    def save(self, name: str = "last") -> Path | None:
        if not self.runtime.is_main:
            return None
        path = self.run_dir / "checkpoints" / f"{name}.pt"
        atomic_save_torch(self.state(), path)
        return path

    # -- the loop -----------------------------------------------------------------------------------------------
    def _start_swa(self) -> None:
        from torch.optim.swa_utils import AveragedModel

        self.swa = AveragedModel(self.model, use_buffers=False)

    def train_one_epoch(self, stop_after: int | None) -> dict[str, Any]:
        config, runtime, engine = self.config, self.runtime, self.engine
        K = engine.num_members
        # minibatches per Algorithm-1 iteration: one per member; K = 1 with --accumulate M is the gradient-
        # accumulation control (the single member steps on every minibatch, θ once per M)
        per_iteration = config.accumulate if K == 1 else K
        position = self.position
        sampler = self.train_loader.batch_sampler
        sampler.set_position(position.epoch, position.batch)
        self.model.train()
        loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
        finite = torch.ones((), device=runtime.device, dtype=torch.bool)
        seen, started = 0, time.perf_counter()
        iterations = math.ceil((self.batches_per_epoch - position.batch) / per_iteration)
        bar = _progress(iterations, f"epoch {position.epoch + 1}/{config.epochs}", disable=config.quiet or not runtime.is_main)
        for step, (xs, ys) in enumerate(iterate_members(self.train_loader, per_iteration)):
            xs = [_to_device(x, runtime) for x in xs]
            ys = [y.to(runtime.device, non_blocking=True) for y in ys]
            set_learning_rates(engine, lr_factor(config, position.epoch + position.batch / self.batches_per_epoch))
            losses = engine.step(xs, ys)  # round robin over the members, continued across epochs
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
                bar.set_postfix(members=K, loss=f"{position.loss_sum / max(position.loss_count, 1):.4f}",
                                lr=f"{engine.optimizers[0].param_groups[0]['lr']:.2e}",
                                img_s=f"{seen / (time.perf_counter() - started):.0f}")
            if checkpoint_due or stopping:
                self.save("last")
            if stopping:
                bar.close()
                raise RunInterrupted(self.stop.requested or f"stopped after {position.iteration} iterations")
        bar.close()
        elapsed = time.perf_counter() - started
        if runtime.distributed:  # every rank saw its own shard: report the loss over the global batches
            total = torch.tensor([position.loss_sum], dtype=torch.float64, device=runtime.device)
            dist.all_reduce(total)
            position.loss_sum = total.item() / runtime.world_size
        return {"train_loss": position.loss_sum / max(position.loss_count, 1),
                "lr": engine.optimizers[0].param_groups[0]["lr"], "images_per_s": seen / max(elapsed, 1e-9)}

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

    def fit(self, stop_after: int | None = None) -> None:
        config = self.config
        while self.position.epoch < config.epochs:
            epoch = self.position.epoch
            if epoch == config.t0 and self.engine.num_members != config.K and self.position.batch == 0:
                self._switch_to_late_phase()
            if config.swa_start is not None and epoch >= config.swa_start and self.swa is None:
                self._start_swa()
            stats = self.train_one_epoch(stop_after)
            self._sync_member_statistics()
            if self.swa is not None:
                self.swa.update_parameters(self.model)
            metrics = None
            if self.runtime.is_main:
                metrics = evaluate_averaged(self.model, config, self.val_loader, self.train_loader, self.runtime, self.swa)
            row = _metrics_row(epoch + 1, metrics or {}, **stats, K=self.engine.num_members)
            self.history.epochs.append(row)
            improved = metrics is not None and (
                self.history.best_epoch is None or metrics["top1"] > self._row(self.history.best_epoch)["val_top1"]
            )
            if improved:
                self.history.best_epoch = epoch + 1
            self.position = Position(epoch=epoch + 1, iteration=self.position.iteration)
            self.save("last")
            self._write_metrics()
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

    def _row(self, epoch: int) -> dict[str, Any]:
        return next(row for row in self.history.epochs if row["epoch"] == epoch)

    def _write_metrics(self) -> None:
        """metrics.jsonl, rewritten atomically from the history (so a resumed run never repeats a row)."""
        if self.runtime.is_main:
            lines = "".join(json.dumps(row) + "\n" for row in self.history.epochs)
            atomic_write_bytes(self.run_dir / "metrics.jsonl", lines.encode())

    # -- the end --------------------------------------------------------------------------------------------------
    def finish(self, command: str | None) -> dict[str, Any]:
        """Collapse the selected checkpoint (--select), write the model directory, the report and the plot."""
        config = self.config
        chosen = "best" if config.select == "best" and self.history.best_epoch is not None else "last"
        if chosen == "best":
            best = load_run_checkpoint(self.run_dir / "checkpoints" / "best.pt")
            self.model.load_state_dict(best["model"])
            if best["swa"] is not None:
                self.swa.load_state_dict(best["swa"]["model"])
        epoch = self.history.best_epoch if chosen == "best" else self.history.epochs[-1]["epoch"]
        recalibration = _recalibration_batches(self.train_loader, self.runtime)
        metrics = export_model(
            self.swa.module if self.swa is not None else self.model, self.run_dir / "model", config=config,
            source=self.source, history=self.history, epoch=epoch, chosen=chosen, data=recalibration,
            bn_stats=_eval_bn_stats(config, self.swa is not None), extra={
                "command": command, "data_fingerprint": self.data.fingerprint, "started": self.started},
            label_names=self.data.label_names, force=True,
        )
        report = {
            "run_dir": str(self.run_dir), "model_dir": str(self.run_dir / "model"), "K": config.K, "select": chosen,
            "epoch": epoch, "bn_stats": _eval_bn_stats(config, self.swa is not None), "mode": self.mode,
            "start_top1": metrics["base"]["top1"], "final_top1": metrics["final"]["top1"],
            "change": metrics["final"]["top1"] - metrics["base"]["top1"],
        }
        atomic_write_json(self.run_dir / "report.json", report)
        plot_curves(self.history.epochs, self.run_dir / "curves.png")
        return report


def _no_buffer_sync() -> dict[str, bool]:
    """Per-member BN statistics stay rank-local during an epoch (averaged at its end), under either DDP spelling."""
    import inspect

    names = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


def _eval_bn_stats(config: FinetuneConfig, swa: bool) -> str:
    """SWA averages weights over time, so its BN statistics are always re-estimated."""
    return "recalibrate" if swa else config.bn_stats


def export_model(late_model: nn.Module, out_dir: Path, *, config: FinetuneConfig, source: ModelSource,
                 history: History, epoch: int, chosen: str, bn_stats: str, data: Any, extra: dict[str, Any],
                 label_names: list[str] | None, force: bool) -> dict[str, Any] | None:
    """Collapse `late_model` (Eq. 1) and write it with its card; metrics are the ones recorded for `epoch`
    when `bn_stats` is the mode they were measured with (else none are claimed). Returns those metrics."""
    averaged = collapse(late_model, bn_stats=bn_stats, data=data if bn_stats == "recalibrate" else None,
                        num_batches=config.recalibrate_batches)
    row = next((r for r in history.epochs if r["epoch"] == epoch), {})
    metrics = None
    if bn_stats == _eval_bn_stats(config, config.swa_start is not None) and "val_top1" in row:
        metrics = {
            "base": _public(history.base),
            "final": {k[4:]: v for k, v in row.items() if k.startswith("val_")},
            "protocol": f"top-1/top-5/NLL/ECE on the same validation set with the same preprocessing; final = "
                        f"members averaged with bn_stats={bn_stats}, epoch {epoch} ({chosen})",
        }
    spec = late_phase_spec(late_model)
    averaging = {"K": spec["K"], "late_phase": ",".join(sorted(set(spec["layers"].values()))), "bn_stats": bn_stats,
                 "epoch": epoch, "select": chosen, "swa_start": config.swa_start,
                 "training_data": describe_training_data(config, extra.get("data_fingerprint"))}
    save_pretrained(
        averaged, out_dir, source=source, metrics=metrics, hparams=_hparams(config), label_names=label_names,
        averaging=averaging, force=force,
        provenance={**extra, "config": config.to_dict(), "seed": config.seed, "epoch": epoch, "bn_stats": bn_stats,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "late_phase": spec},
    )
    return metrics


def describe_training_data(config: FinetuneConfig, fingerprint: dict[str, Any] | None) -> str:
    """The training set for a public model card: its name, size and file-list fingerprint — never a local path."""
    if config.data == DIGITS:
        return "scikit-learn's handwritten digits"
    root = Path(config.data or config.train_dir or "data")
    name = root.name
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        name = name.removesuffix(suffix)
    if name == "train" and config.train_dir:
        name = root.parent.name or name
    train = (fingerprint or {}).get("train") or {}
    if "num_files" not in train:
        return f"`{name}`"
    return f"`{name}`, {train['num_files']:,} training images (SHA-256 of their file list: {train['sha256'][:16]}…)"


def collapse_run(path: str | Path, out: str | Path, *, bn_stats: str = "fold", data: str | None = None,
                 which: str = "best", force: bool = False) -> Path:
    """`lpconvert collapse`: average a run's (or checkpoint's) members into the original architecture and save it."""
    model, state = load_late_phase(path, which)
    config = FinetuneConfig.from_dict(state["config"])
    history = History(**state["history"])
    if state["swa"] is not None:
        from torch.optim.swa_utils import AveragedModel

        swa = AveragedModel(model, use_buffers=False)
        swa.load_state_dict(state["swa"]["model"])
        model = swa.module
    recalibration = None
    if data is not None:
        config_for_data = FinetuneConfig.from_dict({**state["config"], "data": data, "train_dir": None,
                                                    "val_dir": None, "workers": 0})
        runtime = Runtime(torch.device("cpu"))
        recalibration = train_loader(build_data(config_for_data, model), config_for_data, runtime)
    chosen = "best" if which == "best" and history.best_epoch is not None else "last"
    epoch = history.best_epoch if chosen == "best" else state["position"]["epoch"]
    out = Path(out)
    export_model(model, out, config=config, source=ModelSource(**state["source"]), history=history,
                 epoch=epoch, chosen=chosen, bn_stats=bn_stats, data=recalibration,
                 extra={"command": finetune_command(), "collapsed_from": str(path)},
                 label_names=state.get("label_names"), force=force)
    return out


def _public(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in ("top1", "top5", "nll", "ece")}


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


def _progress(total: int, description: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=disable, leave=False, dynamic_ncols=True)


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation top-1 of the averaged model per epoch, as a PNG (written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    trained = [r for r in rows if "train_loss" in r]
    left.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], marker="o")
    left.set(xlabel="epoch", ylabel="training loss (member mean)")
    right.plot([r["epoch"] for r in rows if "val_top1" in r], [r["val_top1"] for r in rows if "val_top1" in r],
               marker="o", label="averaged model")
    right.axhline(rows[0]["val_top1"], color="gray", linestyle="--", label="start")
    right.set(xlabel="epoch", ylabel="validation top-1 (%)")
    right.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------------------------
def resolve_run_dir(config: FinetuneConfig) -> tuple[Path, dict[str, Any] | None]:
    """The run directory (a new one, or the one being resumed, whose settings must match unless --force) and the
    state to resume from. Nothing is written yet."""
    if config.resume:
        run_dir = Path(config.resume)
        path = run_dir / "checkpoints" / "last.pt"
        if not path.is_file():
            raise LatePhaseError(f"{run_dir} is not an lpconvert run directory (no checkpoints/last.pt); cannot resume")
        state = load_run_checkpoint(path)
        saved = state["config"]
        ignored = ("resume", "force", "quiet", "workers", "log_every", "output", "push_to_hub", "allow_regression")
        differing = [k for k, v in config.to_dict().items() if k not in ignored and saved.get(k) != v]
        if differing and not config.force:
            raise LatePhaseError(
                f"--resume {run_dir}: the run was started with different settings ({', '.join(differing[:4])}); "
                "use the same flags, or --force to continue with the new ones"
            )
        return run_dir, state
    name = config.output or os.path.join("runs", config.model.replace(":", "-").replace("/", "-") + f"-K{config.K}")
    run_dir = Path(name)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not config.force:
        raise LatePhaseError(
            f"output directory {run_dir} is not empty; choose --output, --resume {run_dir}, or --force to overwrite"
        )
    return run_dir, None


def create_run_dir(run_dir: Path, config: FinetuneConfig) -> None:
    """Start a new run directory with the resolved settings (after the model and data loaded without error)."""
    if run_dir.exists() and config.force:
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", config.to_dict())


def run(config: FinetuneConfig, *, stop_after: int | None = None, command: str | None = None) -> dict[str, Any]:
    """The whole job: load → evaluate the start → convert → Algorithm 1 → collapse → save. Returns the report.

    `stop_after` stops after that many iterations with a checkpoint (as SIGINT/SIGTERM do); resume with
    ``FinetuneConfig(resume=run_dir, …)``."""
    config.validate()
    runtime = init_runtime(config)
    run_dir, resume_state = resolve_run_dir(config)
    trainer = Trainer(config, run_dir, runtime)
    previous = {}
    if threading_is_main():
        previous = {sig: signal.signal(sig, trainer.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.setup(resume_state)
        trainer.fit(stop_after)
        report = trainer.finish(command) if runtime.is_main else {}
    except torch.OutOfMemoryError as exc:
        raise LatePhaseError(
            f"out of GPU memory in {getattr(trainer, 'mode', 'the')} mode with batch {config.batch_size}; "
            "use a smaller --batch-size, --mode sequential or a smaller --group-size"
        ) from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if config.push_to_hub and runtime.is_main:
        from .hub import push

        report["pushed"] = push(run_dir / "model", config.push_to_hub, allow_regression=config.allow_regression)
    return report


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def finetune_command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])

