"""Data-path and training throughput: per-sample PIL decoding (DataLoader workers) vs the in-memory batch path.

    python scripts/bench_data.py --data ../shared/data/cifar10 --markdown zoo/BENCHMARKS.md

Measured in ONE run, each comparison in interleaved rounds (A B C, C B A, …) after one untimed warm-up round per
path, on the real CIFAR-10 training set (50,000 PNGs; lpconvert extracts the archive into its cache, never into the
repository):

1. the data path alone: images/s the training loader delivers (``train_loader`` of ``build_data``: seeded order,
   RandomCrop with 4 px zero padding, flip, normalisation) — per sample (``--data-in-memory off``) with 0 and with
   ``--workers`` worker processes, and in memory (``--data-in-memory on``); plus the in-memory path's one-time decode;
2. training as ``lpconvert finetune`` runs it — Algorithm 1 (``LatePhaseEngine``, K members of late-phase BatchNorm,
   SGD) fed by ``iterate_members(loader, K)`` — in images/s, for each model on each path.

``--markdown FILE`` appends the tables with the hardware (CPU model, cores, torch version and threads, load average
before and after: the machine may be shared) to FILE.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial

import timm
import torch

import lpconvert
from lpconvert.config import FinetuneConfig
from lpconvert.data import build_data, train_loader
from lpconvert.train.engine import iterate_members

Round = Callable[[int], tuple[int, float]]  # round number → (images, seconds)


def interleaved(runs: dict[str, Round], rounds: int) -> dict[str, float]:
    """Images/s of each run over `rounds` timed rounds in alternating order, after one untimed round each."""
    for run in runs.values():
        run(0)
    totals = {name: [0, 0.0] for name in runs}
    for r in range(1, rounds + 1):
        for name in list(runs) if r % 2 else list(reversed(runs)):
            images, seconds = runs[name](r)
            totals[name][0] += images
            totals[name][1] += seconds
    return {name: images / seconds for name, (images, seconds) in totals.items()}


def loaders(model: torch.nn.Module, name: str, args) -> tuple[dict[str, torch.utils.data.DataLoader], float]:
    """The training loaders of the three paths for `model`'s preprocessing, and the in-memory decode's seconds."""
    out, decode = {}, 0.0
    for path, memory, workers in (("per-sample, 0 workers", "off", 0),
                                  (f"per-sample, {args.workers} workers", "off", args.workers),
                                  ("in-memory", "on", args.workers)):
        config = FinetuneConfig(model=name, data=args.data, batch_size=args.batch, workers=workers,
                                data_in_memory=memory)
        started = time.perf_counter()
        data = build_data(config.data_settings, model)
        if memory == "on":
            decode = time.perf_counter() - started
        out[path] = train_loader(data.train, args.batch, seed=0, workers=workers)
    return out, decode


def _batches(loader, epoch: int) -> Iterator:
    loader.batch_sampler.set_position(epoch, 0)
    return iter(loader)


def delivery(loader, batches: int) -> Round:
    """A round: `batches` batches of epoch `round` taken from `loader`, nothing done with them."""
    def run(r: int) -> tuple[int, float]:
        started, images = time.perf_counter(), 0
        for _, (x, _) in zip(range(batches), _batches(loader, r)):
            images += len(x)
        return images, time.perf_counter() - started
    return run


def training(engine: lpconvert.LatePhaseEngine, loader, K: int, iterations: int) -> Round:
    """A round: `iterations` Algorithm-1 iterations (K minibatches each) on epoch `round` of `loader`."""
    def run(r: int) -> tuple[int, float]:
        started, images = time.perf_counter(), 0
        for _, (xs, ys) in zip(range(iterations), iterate_members(_batches(loader, r), K)):
            engine.step(xs, ys)
            images += sum(len(x) for x in xs)
        return images, time.perf_counter() - started
    return run


def _cpu() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10", help="CIFAR-10 root with train/ and test/.")
    parser.add_argument("--models", default="cifar_lenet5_bn,cifar_resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="Worker processes of the per-sample path.")
    parser.add_argument("--K", type=int, default=10)
    parser.add_argument("--batches", type=int, default=60, help="Batches per data-path round.")
    parser.add_argument("--iterations", default="6,3", help="Algorithm-1 iterations per training round, per model.")
    parser.add_argument("--rounds", type=int, default=4, help="Timed rounds per path.")
    parser.add_argument("--markdown", default=None, help="Append the tables to this file.")
    args = parser.parse_args()
    names = args.models.split(",")
    iterations = dict(zip(names, map(int, args.iterations.split(","))))
    load_before = os.getloadavg()

    data_rates, decode, train_rates = {}, {}, {}
    for name in names:
        model = timm.create_model(name, num_classes=10)
        paths, decode[name] = loaders(model, name, args)
        if not data_rates:  # the data path alone, with the first model's preprocessing
            data_rates = interleaved({path: delivery(loader, args.batches) for path, loader in paths.items()},
                                     args.rounds)
            print({path: round(rate) for path, rate in data_rates.items()}, flush=True)
        engine = lpconvert.LatePhaseEngine(lpconvert.convert(model.train(), K=args.K),
                                           partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4))
        train_rates[name] = interleaved({path: training(engine, loader, args.K, iterations[name])
                                         for path, loader in paths.items()}, args.rounds)
        print(name, {path: round(rate, 1) for path, rate in train_rates[name].items()}, flush=True)

    load_after = os.getloadavg()
    paths = list(data_rates)
    slow, fast = paths[0], paths[-1]
    lines = [
        f"## Data path — per-sample vs in-memory, CPU, {datetime.date.today()}",
        "",
        f"{_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"float32; load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after.",
        "",
        "```bash",
        "python " + " ".join(sys.argv),
        "```",
        "",
        f"Training loader alone (batch {args.batch}, {args.rounds} interleaved rounds of {args.batches} batches):",
        "",
        "| path | images/s delivered | vs per-sample, 0 workers |",
        "|---|---:|---:|",
        *[f"| {path} | {rate:,.0f} | {rate / data_rates[slow]:.1f}× |" for path, rate in data_rates.items()],
        "",
        "One-time decode of the in-memory path (50,000 training + 10,000 test images, "
        f"{args.workers} workers): " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in decode.items()) + ".",
        "",
        f"Late-phase training (Algorithm 1, K = {args.K}, late-phase BatchNorm, SGD, batch {args.batch}; "
        f"{args.rounds} interleaved rounds per path), images/s:",
        "",
        "| model | " + " | ".join(paths) + f" | in-memory / {paths[1]} |",
        "|---|" + "---:|" * (len(paths) + 1),
        *[f"| {name} ({iterations[name] * args.K * args.rounds} minibatches per path) | "
          + " | ".join(f"{rates[path]:,.0f}" for path in paths) + f" | {rates[fast] / rates[paths[1]]:.2f}× |"
          for name, rates in train_rates.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
