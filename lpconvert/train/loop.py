"""One epoch of Algorithm 1 and the evaluation of the averaged model: plain functions over a :class:`TrainState`.

:func:`train_one_epoch` reads like torchvision's reference loop: iterations of one minibatch per member (round robin,
continued across epochs), the schedule's learning rates set per iteration, no host synchronisation except every
``--log-every`` iterations; it checkpoints and stops through the callbacks it is given and writes nothing itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lpconvert.collapse.average import collapse
from lpconvert.config import FinetuneConfig
from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.evaluation import evaluate_model
from lpconvert.publish.export import eval_bn_stats
from lpconvert.publish.weights import broken_tensor, model_tensors
from lpconvert.run.folder import RunDir
from lpconvert.train.distributed import agree_on_stop, combine_bn_statistics, gather_rank_buffers, recalibration_share
from lpconvert.train.engine import iterate_members
from lpconvert.train.optim import lr_factor, set_learning_rates
from lpconvert.train.optim_settings import OptimSettings
from lpconvert.train.runtime import Runtime
from lpconvert.train.state import TrainState
from lpconvert.train.stopping import RunInterrupted, StopRequest

__all__ = ["evaluate_averaged", "swa_sample_due", "train_one_epoch"]


def train_one_epoch(state: TrainState, loader: DataLoader, config: FinetuneConfig, runtime: Runtime, *,
                    stop: StopRequest, save: Callable[[], None], run_dir: Any) -> dict[str, float]:
    """Algorithm 1 over the rest of epoch ``state.position.epoch``; returns its training loss, last learning rate and
    throughput. `save` writes a checkpoint (every ``--checkpoint-every`` iterations, and before a stop, which then
    raises :class:`RunInterrupted` naming `run_dir`)."""
    engine, position = state.engine, state.position
    batches_per_epoch = loader.batch_sampler.batches_per_epoch
    optim = config.optim_settings
    per_iteration = optim.minibatches_per_iteration(engine.num_members, state.late)
    loader.batch_sampler.set_position(position.epoch, position.batch)
    state.model.train()
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    finite = torch.ones((), device=runtime.device, dtype=torch.bool)
    seen, started = 0, time.perf_counter()
    bar = _progress(batches_per_epoch, f"epoch {position.epoch + 1}/{config.epochs}",
                    disable=config.quiet or not runtime.is_main, initial=position.batch)
    for step, (xs, ys) in enumerate(iterate_members(loader, per_iteration)):
        xs = [runtime.to_device(x) for x in xs]
        ys = [y.to(runtime.device, non_blocking=True) for y in ys]
        set_learning_rates(engine, optim, state.late, lr_factor(optim, position.epoch + position.batch / batches_per_epoch))
        losses = engine.step(xs, ys)
        loss_sum += losses.sum()
        finite &= torch.isfinite(losses).all()
        if swa_sample_due(optim, position.epoch, batches_per_epoch, position.batch, len(xs)):
            state.swa.update_parameters(state.model)
        position.batch += len(xs)
        position.iteration += 1
        position.loss_count += len(xs)
        seen += sum(x.shape[0] for x in xs) * runtime.world_size
        bar.update(len(xs))
        boundary = (step + 1) % config.log_every == 0 or position.batch >= batches_per_epoch
        checkpoint_due = config.checkpoint_every and position.iteration % config.checkpoint_every == 0
        stopping = stop.reason(position.iteration)
        if runtime.distributed:  # where the host syncs anyway: a signal to any rank stops every rank there
            stop.announce(runtime)
            fixed = stop.after_iterations is not None and position.iteration >= stop.after_iterations
            stopping = agree_on_stop(stopping, runtime) if boundary or checkpoint_due or fixed else None
        if boundary or checkpoint_due or stopping:
            _check_finite(state, finite, Path(run_dir), weights=bool(checkpoint_due or stopping))
            position.loss_sum += loss_sum.item()
            loss_sum.zero_()
            bar.set_postfix(members=engine.num_members, loss=f"{position.loss_sum / max(position.loss_count, 1):.4f}",
                            lr=f"{engine.optimizers[0].param_groups[0]['lr']:.2e}",
                            img_s=f"{seen / (time.perf_counter() - started):.0f}")
        if checkpoint_due or stopping:
            state.rank_buffers = gather_rank_buffers(state.model, runtime)
            save()
            state.rank_buffers = None
        if stopping:
            bar.close()
            if runtime.distributed:  # no rank exits (and makes torchrun end the others) before the checkpoint is whole
                dist.barrier()
            raise RunInterrupted(stopping, run_dir)
    bar.close()
    _check_finite(state, finite, Path(run_dir), weights=True)
    elapsed = time.perf_counter() - started
    if runtime.distributed:  # every rank saw its own shard: report the loss over the global batches
        total = torch.tensor([position.loss_sum], dtype=torch.float64, device=runtime.device)
        dist.all_reduce(total)
        position.loss_sum = total.item() / runtime.world_size
    return {"train_loss": position.loss_sum / max(position.loss_count, 1),
            "lr": engine.optimizers[0].param_groups[0]["lr"], "images_per_s": seen / max(elapsed, 1e-9)}


def swa_sample_due(config: OptimSettings, epoch: int, batches_per_epoch: int, batch: int, count: int) -> bool:
    """``--swa-freq N``: whether the iteration that trained minibatches [batch, batch + count) of `epoch` completes a
    multiple of N minibatches counted from ``--swa-start`` (so K = 1 and K = 10 arms sample equally often)."""
    if config.swa_freq is None or config.swa_start is None or epoch < config.swa_start:
        return False
    before = (epoch - config.swa_start) * batches_per_epoch + batch
    return (before + count) // config.swa_freq > before // config.swa_freq


def evaluate_averaged(state: TrainState, config: FinetuneConfig, runtime: Runtime, val: DataLoader,
                      recalibration: Iterable | None) -> dict[str, float]:
    """Collapse a copy of the late-phase model (or of its SWA average) with the run's BN statistics (Eq. 1) and
    evaluate it on the validation set. In a distributed run every rank calls it: BN statistics are re-estimated on
    each rank's share of the recalibration batches and combined, the validation set is evaluated in shards, and
    every rank returns the same metrics."""
    source = state.swa.module if state.swa is not None else state.model
    mode = eval_bn_stats(config, state.swa is not None)
    share, count = recalibration_share(recalibration, config.recalibrate_batches, runtime)
    averaged = collapse(source, bn_stats=mode, data=recalibration_batches(runtime, share, mode), num_batches=count)
    if mode == "recalibrate":
        combine_bn_statistics(averaged, count, runtime)
    return evaluate_model(averaged, val, device=runtime.device, amp_dtype=runtime.amp_dtype,
                          distributed=runtime.distributed)


def recalibration_batches(runtime: Runtime, loader: Iterable | None, mode: str) -> Iterable | None:
    """Training batches on the device for ``--bn-stats recalibrate``; None for the other modes."""
    if mode != "recalibrate":
        return None
    return ((runtime.to_device(x), y) for x, y in loader)


def sync_member_statistics(state: TrainState, runtime: Runtime) -> None:
    """Average the per-member BN running statistics across ranks (each rank estimated them on its shard)."""
    if not runtime.distributed:
        return
    for buffer in state.model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= runtime.world_size


def _check_finite(state: TrainState, finite: torch.Tensor, run_dir: Path, weights: bool) -> None:
    """Stop a diverged run — a non-finite loss so far, or with `weights` (before a checkpoint and at the end of an
    epoch) non-finite weights — saying what is left: the last checkpoint (saved only after this check passed), or
    none."""
    problem = None if bool(finite) else "non-finite loss"
    if problem is None and weights:
        problem = broken_tensor(model_tensors(state.model))
    if problem is None:
        return
    where = f"{problem} at epoch {state.position.epoch + 1}, iteration {state.position.iteration}; stopped"
    last = RunDir(run_dir).checkpoint_path("last")
    if last.is_file():
        raise LatePhaseError(f"{where} — the last good checkpoint is intact ({last}); lower --lr (or try --amp off) "
                             f"and continue it with --resume {run_dir} --force")
    raise LatePhaseError(f"{where} before the first checkpoint, so nothing was saved: {run_dir} holds only its "
                         f"settings and starting metrics; start it again with --resume {run_dir} and a lower --lr "
                         "(or --amp off)")


def _progress(total: int, description: str, disable: bool, initial: int = 0):
    """A bar counting this epoch's minibatches (per process), starting where a resumed epoch stands."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, disable=disable, leave=False, dynamic_ncols=True,
                unit="batch")
