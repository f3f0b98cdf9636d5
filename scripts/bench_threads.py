"""CPU threads on a busy machine: wall time of `lpconvert demo` and of a 1-epoch fine-tune with 1 and 2 torch threads.

Each measurement is a fresh `lpconvert` process with OMP_NUM_THREADS=N (torch's thread count; lpconvert keeps it, at
most the CPUs the process may use). While it runs, one extra process spins on a core (a "busy" machine, as a shared
workstation or CI runner is); the rounds alternate (1 2 2 1 …) so that drifting load hits both counts alike. Prints
and writes JSON: per run the seconds and, for the demo, its result table (the demo's numbers at that thread count).

    python scripts/bench_threads.py --data ../shared/data/cifar10 --weights ../shared/weights/cifar10_resnet/resnet20-12fca82f.th \\
        --out bench_threads.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def spin(stop: multiprocessing.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def timed(command: list[str], threads: int) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, result.stdout


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 root (train/, test/ archives or folders)")
    parser.add_argument("--weights", required=True, help="the shared CIFAR-10 ResNet-20 checkpoint")
    parser.add_argument("--rounds", type=int, default=2, help="fine-tune rounds per thread count (alternating)")
    parser.add_argument("--out", default="bench_threads.json")
    args = parser.parse_args(argv)
    lpconvert = [sys.executable, "-m", "lpconvert"]
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=spin, args=(stop,), daemon=True)
    spinner.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            order = [1, 2, 2, 1] * (args.rounds // 2) + [1, 2] * (args.rounds % 2)
            for i, threads in enumerate(order):
                seconds, _ = timed([*lpconvert, "finetune", "cifar_resnet20", "--weights", args.weights, "--data",
                                    args.data, "--train-subset", "5000", "--val-subset", "1000", "--epochs", "1",
                                    "--K", "4", "--batch-size", "128", "--lr", "0.01", "--workers", "0", "--quiet",
                                    "--select", "last", "--output", f"{tmp}/ft{i}"], threads)
                rows.append({"what": "finetune cifar_resnet20, 1 epoch of 5,000 images, K = 4", "threads": threads,
                             "seconds": seconds})
                print(rows[-1], flush=True)
            for threads in (1, 2):
                seconds, table = timed([*lpconvert, "demo", "--output", f"{tmp}/demo{threads}"], threads)
                rows.append({"what": "lpconvert demo", "threads": threads, "seconds": seconds, "table": table})
                print(rows[-1], flush=True)
    finally:
        stop.set()
        spinner.join()
    load = os.getloadavg()
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "load_average_at_end": load, "busy": "one extra process spinning on a core throughout", "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
