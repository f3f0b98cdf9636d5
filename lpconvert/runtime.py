"""Where a run executes: device, processes (torchrun's environment), autocast dtype, memory format."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import FinetuneConfig
from .errors import LatePhaseError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    local_rank: int = 0

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


def cpu_threads(threads: int | None, processes_on_node: int = 1) -> int:
    """``--threads``, else torch's thread count capped at this process's share of the CPUs it may use (several
    threads per process on a node that torchrun fills with processes only oversubscribe it)."""
    if threads is not None:
        return threads
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), available // max(processes_on_node, 1)))


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
    torch.set_num_threads(cpu_threads(config.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
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
    return Runtime(device, rank, world_size, amp, channels_last, local_rank)
