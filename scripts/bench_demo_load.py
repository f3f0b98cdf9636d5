"""`lpconvert demo` on a quiet machine and beside busy processes, with the old and the new CPU-thread defaults.

Four ways to start the same demo, each a fresh process, with OMP_NUM_THREADS / MKL_NUM_THREADS / OMP_WAIT_POLICY
removed from the environment so that the defaults act:

* ``old``     — the defaults before issue #29: torch's thread count at most the CPUs the process may use (run as
  ``python -m lpconvert demo --threads N`` with that N), libgomp's default wait policy (its threads spin a while);
* ``passive`` — the same N threads with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once);
* ``new``     — the ``lpconvert`` command now (``python -m lpconvert_launcher demo``): PASSIVE set before torch
  loads, and the demo's own default of 1 thread;
* ``auto``    — the command with ``demo --threads 0``: the thread count lpconvert's finetune / evaluate now choose
  without ``--threads`` (the CPUs the process may use, less those other processes keep busy).

Conditions: ``quiet`` (nothing started by this script; run it when the machine is otherwise idle — the load before
each condition is recorded), and ``busy`` (this script keeps `--busy` processes spinning, one Python loop each, at
normal priority, for the whole condition). The ways alternate (A B C D D C B A …) so that drift hits all alike. Each
run records its wall time, the thread count it used (from the demo's ``lpconvert.json``) and the demo's result table
(bit-identical for a fixed thread count). Prints a Markdown table and writes JSON.

    python scripts/bench_demo_load.py --rounds 2 --out bench_demo_load.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
WAYS = ("old", "passive", "new", "auto")


def spin(stop: multiprocessing.synchronize.Event) -> None:
    """One busy process: a Python loop, as another user's job keeps a core busy."""
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def clean_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **extra}


def old_default_threads() -> int:
    """What lpconvert chose without --threads before #29: torch's count, at most the CPUs this process may use."""
    code = "import os, torch; print(min(torch.get_num_threads(), len(os.sched_getaffinity(0))))"
    return int(subprocess.run([sys.executable, "-c", code], env=clean_environment(), capture_output=True, text=True,
                              check=True).stdout)


def command(way: str, output: Path, old_threads: int) -> tuple[list[str], dict[str, str]]:
    if way == "old":
        return [sys.executable, "-m", "lpconvert", "demo", "--threads", str(old_threads)], clean_environment()
    if way == "passive":
        return ([sys.executable, "-m", "lpconvert", "demo", "--threads", str(old_threads)],
                clean_environment(OMP_WAIT_POLICY="PASSIVE"))
    launcher = [sys.executable, "-m", "lpconvert_launcher", "demo"]
    return (launcher if way == "new" else [*launcher, "--threads", "0"]), clean_environment()


def threads_used(output: Path) -> int | None:
    try:
        info = json.loads((output / "plain-seed0" / "model" / "lpconvert.json").read_text())
    except (OSError, ValueError):
        return None
    found = [v for v in _values(info, "threads") if isinstance(v, int)]
    return found[0] if found else None


def _values(obj: object, key: str):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _values(v, key)


def runnable_others() -> float:
    """Threads of other processes running or waiting for a CPU now (lpconvert's own reading)."""
    sys.path.insert(0, str(REPO))
    from lpconvert.train.runtime import busy_cpus

    return busy_cpus()


def measure(condition: str, rounds: int, timeout: float, old_threads: int, tmp: Path) -> list[dict]:
    rows = []
    order = [w for r in range(rounds) for w in (WAYS if r % 2 == 0 else WAYS[::-1])]
    for i, way in enumerate(order):
        output = tmp / f"{condition}-{way}-{i}"
        cmd, env = command(way, output, old_threads)
        cmd += ["--output", str(output)]
        started = time.perf_counter()
        try:
            result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            seconds, table, ok = time.perf_counter() - started, result.stdout, result.returncode == 0
            error = "" if ok else (result.stderr.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            seconds, table, ok, error = None, "", False, f"stopped after {timeout:.0f} s"
        rows.append({"condition": condition, "way": way, "seconds": seconds, "threads": threads_used(output),
                     "ok": ok, "error": error, "table": table})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "table"}), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| condition | " + " | ".join(WAYS) + " |", "|---|" + "---:|" * len(WAYS)]
    for condition in dict.fromkeys(r["condition"] for r in rows):
        cells = []
        for way in WAYS:
            runs = [r for r in rows if r["condition"] == condition and r["way"] == way]
            done = [r["seconds"] for r in runs if r["ok"]]
            threads = sorted({r["threads"] for r in runs if r["threads"] is not None})
            text = ", ".join(f"{s:.1f}" for s in done) + (f" (median {statistics.median(done):.1f})" if done else "")
            stopped = len(runs) - len(done)
            cells.append(f"{text}{f'; {stopped} stopped' if stopped else ''} s, {threads} thread(s)")
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hardware() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable by this process"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each way per condition (alternating order)")
    parser.add_argument("--busy", type=int, default=3, help="busy processes beside the demo in the busy condition")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds after which one demo run is stopped")
    parser.add_argument("--conditions", default="quiet,busy", help="which conditions, comma-separated")
    parser.add_argument("--out", default="bench_demo_load.json")
    args = parser.parse_args(argv)
    import torch

    old_threads = old_default_threads()
    report: dict = {"machine": hardware(), "torch": torch.__version__, "python": platform.python_version(),
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "old_default_threads": old_threads, "busy_processes": args.busy, "conditions": {}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for condition in args.conditions.split(","):
            stop = multiprocessing.Event()
            spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True)
                        for _ in range(args.busy if condition == "busy" else 0)]
            for spinner in spinners:
                spinner.start()
            time.sleep(2.0 if spinners else 0.0)
            report["conditions"][condition] = {"load_average_before": os.getloadavg(),
                                               "runnable_others_before": runnable_others()}
            try:
                report["rows"] += measure(condition, args.rounds, args.timeout, old_threads, Path(tmp))
            finally:
                stop.set()
                for spinner in spinners:
                    spinner.join()
            report["conditions"][condition]["load_average_after"] = os.getloadavg()
    report["table"] = markdown(report["rows"])
    tables = {(r["threads"], r["table"]) for r in report["rows"] if r["ok"]}
    report["results_by_thread_count"] = {str(t): sorted({tb for tt, tb in tables if tt == t}) for t, _ in tables}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(report["table"])
    return report


if __name__ == "__main__":
    main()
