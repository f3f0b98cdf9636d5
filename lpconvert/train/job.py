"""A fine-tuning job, checked before the run directory appears: :func:`prepare` loads the model, its weights and
the data, plans the conversion once and refuses (in one line) what cannot run; :func:`log_batch` is the start line
that says how the batch is split."""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from lpconvert.config import FinetuneConfig, check_input_size
from lpconvert.convert.late_phase_config import LatePhaseConfig
from lpconvert.convert.surgery import convert_from_config, plan_or_refuse
from lpconvert.data import DIGITS, Data, build_data, eval_loader, recalibration_loader, train_loader
from lpconvert.data.transforms import data_config
from lpconvert.errors import LatePhaseError, one_line
from lpconvert.publish.loading import ModelSource, load_model
from lpconvert.publish.weights import check_weights
from lpconvert.train.distributed import local_main_first
from lpconvert.train.runtime import Runtime
from lpconvert.train.state import RunCheckpoint
from lpconvert.train.tensorboard import check_log

logger = logging.getLogger(__name__)
#: Warn when each member's BatchNorm sees fewer images than this per process in a distributed run.
SMALL_BN_BATCH = 16
__all__ = ["Job", "log_batch", "prepare"]


@dataclass
class Job:
    """What a run works with, loaded and checked: nothing of it has touched the disk. `late_phase` is the conversion
    planned once for the whole run (K members from T0 on; one member before)."""

    model: nn.Module
    source: ModelSource
    data: Data
    train: DataLoader
    val: DataLoader
    recalibration: DataLoader | None
    input_size: tuple[int, ...]
    late_phase: LatePhaseConfig
    test: DataLoader | None = None


def prepare(config: FinetuneConfig, runtime: Runtime, checkpoint: RunCheckpoint | None = None) -> Job:
    """Load and check the model, its weights, the data, the conversion and the Hub target; write nothing.

    Each failure is a one-line :class:`LatePhaseError`: unknown model or weights, weights that are not floating point
    or not finite, data that cannot be opened or decoded, a model that cannot run on the data, late-phase targets
    that match nothing, fewer late-phase minibatches than members, ``--push-to-hub`` without a token, ``--log
    tensorboard`` without TensorBoard. The model is traced once, here: every conversion of the run is
    :func:`convert_from_config` of the returned plan."""
    check_log(config.log)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, source = load_model(config.model, weights=config.weights if checkpoint is None else None,
                               num_classes=config.num_classes, pretrained=config.pretrained and checkpoint is None)
    if checkpoint is not None:
        source = ModelSource(**checkpoint.source)  # the base model, as the run started from it
    check_input_size(config, model)
    if config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    with local_main_first(runtime):  # archives extracted and folders scanned once per node, into the cache
        data = build_data(config.data_settings, model, quiet=config.quiet)
    if config.select == "best" and data.val_role == "test" and checkpoint is None:  # a saved run as it ran
        raise LatePhaseError("--select best would choose the epoch on the test set (the data has no validation "
                             "split and --val-split is 0); hold part of the training set out with --val-split 0.1, "
                             "or use --select last")
    if (config.soup == "greedy" or config.interpolate == "auto") and data.val_role == "test":
        raise LatePhaseError("--soup greedy and --interpolate auto choose on the validation set, and the data has none "
                             "(no validation split and --val-split is 0: it would be the test set); hold part of the "
                             "training set out with --val-split 0.1, or use --soup uniform and a number for "
                             "--interpolate")
    pin = runtime.device.type == "cuda"
    train = train_loader(data.train, config.batch_size, seed=config.seed, workers=config.workers, rank=runtime.rank,
                         world_size=runtime.world_size, pin_memory=pin)
    val = eval_loader(data.val, config.batch_size, workers=config.workers, pin_memory=pin)
    test = eval_loader(data.test, config.batch_size, workers=config.workers, pin_memory=pin) if data.test else None
    recalibration = recalibration_loader(data.train, config.batch_size, seed=config.seed, workers=config.workers,
                                         pin_memory=pin)
    _check_model_runs_on_data(model, data)
    report = plan_or_refuse(model, config.K, config.late_phase, include=config.include or None,
                            exclude=config.exclude or None, options=config.kind_options())
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
    late_phase = report.late_phase_config(config.sigma0, config.seed)
    if config.sigma0 > 0 and config.optim_settings.late:
        _check_members(model, late_phase, data)
    if checkpoint is None:
        report.warn()
        if data.val_role == "held-out" and runtime.is_main and not config.quiet:
            logger.info("validating on %d training images held out (--val-split %g); the %d test images are evaluated "
                        "once, at the end, on the selected model", len(data.val), config.val_split, len(data.test))
    input_size = (1, 8, 8) if config.data == DIGITS else data_config(model, config.data_settings)["input_size"]
    return Job(model.to(runtime.device), source, data, train, val, recalibration, tuple(input_size), late_phase,
               test)


def _check_model_runs_on_data(model: nn.Module, data: Data) -> None:
    """Decode one training image and one validation image and run the model on them (channels, sizes, classes,
    finite outputs)."""
    logits, y = _first_outputs(model, data)
    if logits.dim() != 2 or y >= logits.shape[1]:
        raise LatePhaseError(f"the model outputs {tuple(logits.shape[1:])} scores but the data has label {y}; "
                             "pass --num-classes with the data's number of classes")
    if not bool(torch.isfinite(logits).all()):
        raise LatePhaseError("the model's outputs are not finite (NaN or inf) on the first images of the data; "
                             "its weights overflow, check them for huge values")


def _check_members(model: nn.Module, late_phase: LatePhaseConfig, data: Data) -> None:
    """The planned conversion, of a copy: Eq. 2 with a huge σ0 overflows the members to inf, or their outputs."""
    fix = f"lower --sigma0 (now {late_phase.sigma0:g})"
    converted = convert_from_config(copy.deepcopy(model), late_phase)
    check_weights(converted, "the late-phase model initialised by Eq. 2", fix)
    if not bool(torch.isfinite(_first_outputs(converted, data)[0]).all()):
        raise LatePhaseError("the late-phase model initialised by Eq. 2 gives non-finite outputs (NaN or inf) on the "
                             f"first images of the data; {fix}")


def _first_outputs(model: nn.Module, data: Data) -> tuple[torch.Tensor, int]:
    """The model's logits (eval mode) for the first training and validation images, and the first training label."""
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
    return logits, int(y)


def log_batch(config: FinetuneConfig, runtime: Runtime, model: nn.Module) -> None:
    """The start line: the global batch, each process's share, and the batch each member's BatchNorm normalises over
    in each process (members train one at a time), then on a CPU the thread count chosen without ``--threads``; a
    warning when that batch is below SMALL_BN_BATCH in a distributed run."""
    if not runtime.is_main:
        return
    per_process = config.batch_size // runtime.world_size
    if not config.quiet:
        logger.info("batch: %d global = %d per process × %d process(es); each member's BatchNorm batch: %d images "
                    "per process", config.batch_size, per_process, runtime.world_size, per_process)
        if runtime.threads is not None and runtime.device.type == "cpu":
            logger.info(runtime.threads.describe())
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if runtime.distributed and has_bn and not config.sync_bn and per_process < SMALL_BN_BATCH:
        logger.warning("each member's BatchNorm normalises over %d images per process (--batch-size %d over %d "
                       "processes), below %d: its statistics are noisy; use --sync-bn (CUDA only) or a larger batch",
                       per_process, config.batch_size, runtime.world_size, SMALL_BN_BATCH)
