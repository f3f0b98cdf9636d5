"""Sharded evaluation: seconds to evaluate a validation set in 1 process vs 2 gloo processes on the CPU.

    python scripts/bench_dist_eval.py --shared ../shared --images 2000 --rounds 3

The pretrained CIFAR-10 ResNet-20 (``cifar_resnet20`` with ``resnet20-12fca82f.th``) on the first ``--images``
images of the CIFAR-10 test set (extracted into a temporary folder under /tmp, decoded and normalised once, outside
the timing), batch ``--batch``, each process with ``--threads`` torch threads: ``evaluate_model`` in one process, and
``evaluate_model(..., distributed=True)`` in 2 processes started by ``torch.multiprocessing.spawn`` (timed inside the
ranks from a barrier to the end of the all-reduce, process start-up excluded). Prints the best of ``--rounds`` rounds
per setting and checks that both give the same top-1.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from lpconvert.evaluate.evaluation import evaluate_model
from lpconvert.publish.loading import load_model


def images(shared: Path, count: int) -> TensorDataset:
    """The first `count` CIFAR-10 test images (class folders in order), normalised with the canonical statistics."""
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        with tarfile.open(shared / "data" / "cifar10" / "test.tar.gz") as archive:
            archive.extractall(tmp, filter="data")
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.4914, 0.4822, 0.4465),
                                                                                    (0.2470, 0.2435, 0.2616))])
        folder = datasets.ImageFolder(os.path.join(tmp, "test"), transform=normalize)
        step = len(folder) // count  # every class: spread over the class-sorted set
        pairs = [folder[i] for i in range(0, step * count, step)]
    return TensorDataset(torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs]))


def model(shared: Path) -> torch.nn.Module:
    return load_model("cifar_resnet20", weights=str(shared / "weights" / "cifar10_resnet" / "resnet20-12fca82f.th"),
                      pretrained=False)[0]


def timed(net: torch.nn.Module, loader: DataLoader, distributed: bool, rounds: int) -> tuple[float, float]:
    """(best seconds over `rounds`, top-1) of evaluating `net` on `loader` after one untimed round."""
    best, top1 = float("inf"), float("nan")
    for r in range(rounds + 1):
        if distributed:
            dist.barrier()
        started = time.perf_counter()
        top1 = evaluate_model(net, loader, distributed=distributed)["top1"]
        if r:
            best = min(best, time.perf_counter() - started)
    return best, top1


def _rank(rank: int, port: int, args: argparse.Namespace, data: TensorDataset, out: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    try:
        seconds, top1 = timed(model(args.shared), DataLoader(data, batch_size=args.batch), True, args.rounds)
        if rank == 0:
            out["two"] = (seconds, top1)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = images(args.shared, args.images)
    load = os.getloadavg()
    torch.set_num_threads(args.threads)
    one = timed(model(args.shared), DataLoader(data, batch_size=args.batch), False, args.rounds)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(port, args, data, out), nprocs=2, join=True)
    two = out["two"]
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    print(f"{len(data)} CIFAR-10 test images, cifar_resnet20, batch {args.batch}, {args.threads} thread(s) per "
          f"process, best of {args.rounds}; {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, load average "
          f"{load[0]:.2f} before / {os.getloadavg()[0]:.2f} after")
    print(f"1 process:     {one[0]:.2f} s  ({len(data) / one[0]:.0f} img/s)  top-1 {one[1]:.2f}")
    print(f"2 gloo ranks:  {two[0]:.2f} s  ({len(data) / two[0]:.0f} img/s)  top-1 {two[1]:.2f}  "
          f"speed-up {one[0] / two[0]:.2f}x")
    if one[1] != two[1]:
        raise SystemExit(f"top-1 differs: {one[1]} vs {two[1]}")


if __name__ == "__main__":
    main()
