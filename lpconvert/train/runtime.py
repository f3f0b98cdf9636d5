"""Where a run executes: device, processes (torchrun's environment), autocast dtype, memory format."""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lpconvert.config import FinetuneConfig
from lpconvert.errors import LatePhaseError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    local_rank: int = 0
    threads: ThreadChoice | None = None  # the default CPU thread count and why; None with --threads

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the device, channels-last when the run uses it."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` (this process's GPU when there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device
    that is not there is a one-line error."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise LatePhaseError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatePhaseError(f"--device {spec} was asked for but no CUDA GPU is available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LatePhaseError(f"--device {spec} was asked for but MPS is not available; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise LatePhaseError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity; all of them where the platform has none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def runnable_threads() -> dict[int, float] | None:
    """Per process, its threads that are running or waiting for a CPU now, each weighted by the CPU share the
    scheduler gives it beside a thread of normal priority (1 at nice 0 or below, 1.25**-nice above: a ``nice 19``
    thread counts 1.4 %); None without ``/proc``."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    weights: dict[int, float] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
            except OSError:
                continue
            if len(fields) > 16 and fields[0] == "R":
                weights[pid] = weights.get(pid, 0.0) + min(1.0, 1.25 ** -int(fields[16]))
    return weights


def busy_cpus(samples: int = 3, interval: float = 0.03) -> float:
    """How many of this process's CPUs other processes keep busy now: the median of `samples` readings of their
    :func:`runnable_threads`, `interval` seconds apart, scaled to the share of the machine's CPUs this process may
    use; 0 where the platform does not say. Read now, not as the 1-minute load average: a run that just ended would
    otherwise count as load for the next one."""
    readings = []
    for i in range(samples):
        weights = runnable_threads()
        if weights is None:
            return 0.0
        readings.append(sum(weight for pid, weight in weights.items() if pid != os.getpid()))
        if i + 1 < samples:
            time.sleep(interval)
    return statistics.median(readings) * available_cpus() / max(os.cpu_count() or 1, 1)


@dataclass(frozen=True)
class ThreadChoice:
    """The default CPU thread count and what it followed."""

    threads: int
    cpus: int           # CPUs this process may use
    processes: int      # processes torchrun starts on this node
    busy: float         # threads other processes were running on those CPUs when the count was chosen

    def describe(self) -> str:
        """The start line: the count and what it followed."""
        split = f" for {self.processes} processes" if self.processes > 1 else ""
        return (f"CPU threads: {self.threads} (this process may use {self.cpus} CPU(s){split}; other processes were "
                f"running {self.busy:.1f} threads on them; --threads N to choose)")


@functools.cache
def default_threads(processes_on_node: int = 1) -> ThreadChoice:
    """The thread count without ``--threads``, chosen once per process (every run of a demo or comparison gets the
    same): the CPUs this process may use, divided among the processes on the node, less those other processes keep
    busy now, at least 1 and at most torch's count. More threads than free cores make torch's threads wait for each
    other: on 2 busy cores a run took several times longer with 2 threads than with 1 (zoo/BENCHMARKS.md)."""
    cpus, processes = available_cpus(), max(processes_on_node, 1)
    busy = max(0.0, busy_cpus() - (processes - 1))  # the node's other processes of this run have their share
    share = max(1, cpus // processes)
    free = max(1, round(cpus - busy) // processes)
    return ThreadChoice(max(1, min(torch.get_num_threads(), share, free)), cpus, processes, busy)


def cpu_threads(threads: int | None, processes_on_node: int = 1) -> int:
    """``--threads``, else :func:`default_threads`. Results are bit-identical for a fixed thread count."""
    return threads if threads is not None else default_threads(processes_on_node).threads


def init_runtime(config: FinetuneConfig) -> Runtime:
    """Device, distributed process group (from torchrun's environment, collectives waiting at most
    ``--dist-timeout`` minutes), autocast dtype and memory format. ``--batch-size-per-gpu`` is resolved here, where
    the number of processes is known: `config` then holds the global ``batch_size`` (per process × processes)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if rank != 0:  # warnings and progress once, from rank 0; errors from every rank
        logging.getLogger("lpconvert").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    device = resolve_device(config.device, local_rank)
    if config.sync_bn and device.type != "cuda":
        raise LatePhaseError("--sync-bn synchronises BatchNorm statistics across GPUs and has no CPU implementation; "
                             "drop --sync-bn, or run on CUDA GPUs under torchrun")
    choice = default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if config.threads is None else None
    torch.set_num_threads(config.threads if choice is None else choice.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=config.dist_timeout))
    if config.batch_size_per_gpu is not None:
        config.batch_size, config.batch_size_per_gpu = config.batch_size_per_gpu * world_size, None
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}.get(config.amp)
    if config.amp == "auto":
        amp = torch.bfloat16 if device.type == "cuda" else None
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    return Runtime(device, rank, world_size, amp, channels_last, local_rank, choice)
