"""What the ranks of a distributed run (``torchrun``) do together besides DDP's gradient all-reduce: evaluate
contiguous shards of a dataset and combine the sums, re-estimate BatchNorm statistics on shares of the
recalibration batches, agree on stopping at the same iteration, tell each other about a failure, and prepare the
data once per node. Every function is a no-op (or returns its input) in a run of one process, whose code path and
numbers stay exactly those of a non-distributed run."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lpconvert.errors import LatePhaseError, one_line

if TYPE_CHECKING:
    from lpconvert.train.runtime import Runtime

__all__ = ["FAILURE_KEY", "STOP_REASONS", "active", "agree_on_stop", "all_reduce_sum", "announce_failure",
           "combine_bn_statistics", "failure_elsewhere", "gather", "gather_rank_buffers", "local_main_first",
           "recalibration_share", "restore_rank_buffers", "shard"]

#: The reasons a run stops early, in the order the ranks settle on one (the largest code wins).
STOP_REASONS = ("stopped", "SIGINT", "SIGTERM")
#: The store key under which a failing rank leaves its one-line message for the others.
FAILURE_KEY = "lpconvert/failed"


def active() -> bool:
    """Whether this process belongs to a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Where the process group's collectives take tensors: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of `tensor` over all ranks (a new tensor on `tensor`'s device)."""
    total = tensor.to(_device(), copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


def gather(tensors: list[Tensor]) -> list[Tensor]:
    """Every rank's `tensors` (moved to the CPU), concatenated in rank order: for contiguous shards, the order of one
    process."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, [t.cpu() for t in tensors])
    return [t for part in everyone for t in part]


def shard(loader: Iterable) -> DataLoader:
    """This rank's contiguous share of `loader`'s batches: the same batches one process reads, batch ``b·r/W`` to
    ``b·(r+1)/W`` of ``b`` for rank ``r`` of ``W`` (possibly none). `loader` must be a DataLoader with a
    ``batch_size`` over a sized dataset, read in order."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise LatePhaseError("a distributed evaluation needs DataLoaders with a batch_size (not a batch_sampler) to "
                             f"split among the ranks, got {type(loader).__name__}")
    size, batch = len(loader.dataset), loader.batch_size  # type: ignore[arg-type]
    batches, rank, world = math.ceil(size / batch), dist.get_rank(), dist.get_world_size()
    first, last = batches * rank // world, batches * (rank + 1) // world
    return DataLoader(Subset(loader.dataset, range(first * batch, min(last * batch, size))), batch_size=batch,
                      shuffle=False, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory)


def recalibration_share(loader: DataLoader | None, num_batches: int, runtime: Runtime) -> tuple[Any, int]:
    """The recalibration batches this rank passes through the model and their number: the whole `loader` and
    `num_batches` in one process; else rank r's contiguous share of the first `num_batches` batches of epoch 0 (the
    batches one process would use)."""
    if loader is None or not runtime.distributed:
        return loader, num_batches
    sampler = loader.batch_sampler
    total = min(num_batches, sampler.batches_per_epoch)
    if total < runtime.world_size:
        raise LatePhaseError(f"BatchNorm recalibration on {total} batch(es) cannot be shared by {runtime.world_size} "
                             "processes; raise --recalibrate-batches (or use fewer processes)")
    first, last = total * runtime.rank // runtime.world_size, total * (runtime.rank + 1) // runtime.world_size

    def batches() -> Iterator[Any]:
        sampler.set_position(0, first)
        try:
            yield from islice(loader, last - first)
        finally:
            sampler.set_position(0, 0)

    return batches(), last - first


def combine_bn_statistics(model: nn.Module, count: int, runtime: Runtime) -> None:
    """After each rank re-estimated the BatchNorm statistics as the mean over its `count` batches, make every rank's
    statistics the mean over all ranks' batches (weighted by `count`)."""
    if not runtime.distributed:
        return
    total = int(all_reduce_sum(torch.tensor(float(count), dtype=torch.float64)).item())
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                weighted = all_reduce_sum(buffer.double() * count) / total
                buffer.copy_(weighted)
            module.num_batches_tracked.fill_(total)


def agree_on_stop(reason: str | None, runtime: Runtime) -> str | None:
    """The reason every rank stops at this iteration boundary: one tiny all-reduce (MAX) of this rank's reason
    (SIGTERM over SIGINT over a fixed number of iterations), so that a signal to any one rank stops them all here.
    Every rank must call it at the same iterations."""
    if not runtime.distributed:
        return reason
    kind = "stopped" if reason is not None and reason not in STOP_REASONS else reason
    code = torch.tensor([0 if kind is None else STOP_REASONS.index(kind) + 1], device=_device())
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    agreed = int(code.item())
    if agreed == 0:
        return None
    return reason if STOP_REASONS[agreed - 1] == kind else STOP_REASONS[agreed - 1]


def announce_failure(exc: BaseException, runtime: Runtime) -> None:
    """This rank failed: leave its one line in the process group's store and tear the group down, so that the other
    ranks' next collective fails at once (gloo; NCCL within ``--dist-timeout``). The store may live in rank 0's
    process (env:// rendezvous): a failing rank 0 waits up to 10 s for the others to read it, or fail themselves."""
    if not runtime.distributed or not dist.is_initialized():
        return
    store = dist.distributed_c10d._get_default_store()
    if not store.check([FAILURE_KEY]):  # the first failure is the one to report
        store.set(FAILURE_KEY, f"rank {runtime.rank} failed: {one_line(exc)}")
    store.set(f"{FAILURE_KEY}/done/{runtime.rank}", "1")
    dist.destroy_process_group()
    if runtime.rank == 0:
        try:
            store.wait([f"{FAILURE_KEY}/done/{r}" for r in range(1, runtime.world_size)], timedelta(seconds=10))
        except Exception:  # noqa: BLE001 - the others died too, or never got as far: nothing more to tell them
            pass


def failure_elsewhere(exc: BaseException, runtime: Runtime, *, waited: str = "--dist-timeout",
                      phase: str = "a collective") -> LatePhaseError | None:
    """When `exc` ended this rank because another rank failed (it left its message: the collective this rank waited
    in failed), a collective broke (another rank died) or timed out (another rank is stuck: this rank `waited` for
    it in `phase`): the one-line error to end this rank with; else None."""
    if not runtime.distributed or isinstance(exc, LatePhaseError) or not isinstance(exc, RuntimeError):
        return None
    if "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower():
        return LatePhaseError(f"rank {runtime.rank} waited {waited} for the other ranks in {phase} and timed out: "
                              "another rank is stuck or far slower (paused, swapping, a hung GPU); check every "
                              "rank's output, or raise --dist-timeout for slow steps")
    try:
        store = dist.distributed_c10d._get_default_store()
        message = store.get(FAILURE_KEY).decode() if store.check([FAILURE_KEY]) else None
        if message is not None:
            store.set(f"{FAILURE_KEY}/done/{runtime.rank}", "1")
    except Exception:  # noqa: BLE001 - the store went with the failed rank
        message = None
    if message is None and isinstance(exc, dist.DistError):
        message = f"another rank failed or died ({one_line(exc)})"
    return None if message is None else LatePhaseError(f"{message}; see its output")


def gather_rank_buffers(model: nn.Module, runtime: Runtime) -> list[dict[str, Tensor]] | None:
    """Every rank's floating-point buffers of `model` (on the CPU, in rank order) for a checkpoint taken within an
    epoch of a distributed run, where BN running statistics are still rank-local; None in one process."""
    if not runtime.distributed:
        return None
    local = {name: buffer.detach().cpu() for name, buffer in model.named_buffers() if buffer.is_floating_point()}
    everyone: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(everyone, local)
    return everyone


def restore_rank_buffers(model: nn.Module, saved: list[dict[str, Tensor]] | None, runtime: Runtime) -> None:
    """Give this rank back its own buffers saved by :func:`gather_rank_buffers` (after DDP copied rank 0's)."""
    if saved is None:
        return
    if len(saved) != runtime.world_size:
        raise LatePhaseError(f"the checkpoint was taken within an epoch on {len(saved)} processes; resume it on "
                             f"{len(saved)} processes (now {runtime.world_size}), or from the end of an epoch")
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in saved[runtime.rank].items():
            buffers[name].copy_(value)


@contextmanager
def local_main_first(runtime: Runtime) -> Iterator[None]:
    """Run the body on each node's local rank 0 first (extracting archives, scanning folders into the cache) while
    the node's other ranks wait at a barrier; they then run it on the prepared cache."""
    if not runtime.distributed:
        yield
        return
    if runtime.local_rank != 0:
        dist.barrier()
    yield
    if runtime.local_rank == 0:
        dist.barrier()
