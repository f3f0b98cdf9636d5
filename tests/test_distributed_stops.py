"""Every rank survives every stop (2 gloo processes under torchrun, through the command line): a stop during data
preparation ends both ranks with the same line and writes nothing; a collective that times out is named, with exit 2,
whether a rank is stuck during training or waits for the other's data preparation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import WORLD, _rank_pid
from test_finetune import _free_port

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def _start(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path, str]:
    logs, marker = tmp_path / f"logs-{name}", f"{tmp_path}-{name}"
    env = {**os.environ, "LPCONVERT_TEST_MARKER": marker, "OMP_NUM_THREADS": "1",
           "LPCONVERT_CACHE": str(tmp_path / f"cache-{name}")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
               str(_free_port()), "--log-dir", str(logs), "--redirects", "3", "-m", "lpconvert", "finetune",
               "--workers", "0", "--quiet", "--device", "cpu", "--threads", "1", "--schedule", "constant",
               "--output", str(tmp_path / name), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), logs, marker


def _outputs(logs: Path) -> list[str]:
    return [sorted(logs.rglob(f"attempt_0/{rank}/stderr.log"))[0].read_text() for rank in range(WORLD)]


def _wait_for(condition, process: subprocess.Popen, what: str, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None and time.time() < deadline, f"the run ended before {what}"
        time.sleep(0.1)


CIFAR = ["cifar_lenet5_bn", "--no-pretrained", "--data", str(SHARED_CIFAR), "--train-subset", "200", "--val-subset",
         "100", "--K", "2", "--batch-size", "20", "--epochs", "1"]


@pytest.mark.slow  # extracts the CIFAR-10 training archive: run with -m slow
def test_a_signal_during_data_preparation_stops_every_rank_with_one_line_and_nothing_written(tmp_path):
    process, logs, marker = _start(tmp_path, "run", *CIFAR)
    cache = tmp_path / "cache-run"
    _wait_for(lambda: cache.is_dir() and any(cache.rglob("*.png")), process, "it extracted the archive")
    os.kill(_rank_pid(marker, 1), signal.SIGTERM)  # rank 1 waits while rank 0 extracts the training images
    _, errors = process.communicate(timeout=300)
    line = "interrupted (SIGTERM before training); no checkpoint yet: continue with the same command (nothing was written)"
    rank0, rank1 = _outputs(logs)
    assert [out.strip().splitlines()[-1] for out in (rank0, rank1)] == [line, line], errors
    assert errors.count("exitcode  : 130") == WORLD and "Traceback" not in rank0 + rank1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a 15 s collective timeout under torchrun: run with -m slow
def test_a_stuck_rank_turns_a_stop_into_a_named_timeout_not_an_internal_error(tmp_path):
    process, logs, marker = _start(tmp_path, "run", "digits_cnn", "--no-pretrained", "--data", "sklearn-digits",
                                   "--K", "2", "--batch-size", "40", "--epochs", "50", "--checkpoint-every", "2",
                                   "--log-every", "2", "--dist-timeout", "0.25")
    _wait_for((tmp_path / "run" / "checkpoints" / "last.pt").exists, process, "its first checkpoint")
    stuck, stopped = _rank_pid(marker, 1), _rank_pid(marker, 0)
    os.kill(stuck, signal.SIGSTOP)
    try:
        os.kill(stopped, signal.SIGTERM)
        _wait_for(lambda: not Path(f"/proc/{stopped}").exists(), process, "rank 0 exited", seconds=120)
    finally:
        os.kill(stuck, signal.SIGCONT)
    _, errors = process.communicate(timeout=300)
    rank0 = _outputs(logs)[0]
    assert rank0.strip().splitlines()[-1].startswith(
        "error: rank 0 waited 0.25 minutes for the other ranks in training and timed out"), rank0
    assert "exitcode  : 2" in errors and "internal error" not in rank0 and "Traceback" not in rank0


@pytest.mark.slow  # extracts the CIFAR-10 training archive: run with -m slow
def test_a_timeout_during_data_preparation_says_which_rank_waited_for_what(tmp_path):
    process, logs, _ = _start(tmp_path, "run", *CIFAR, "--dist-timeout", "0.02")
    _, errors = process.communicate(timeout=300)
    rank1 = _outputs(logs)[1]
    assert rank1.strip().splitlines()[-1].startswith(
        "error: rank 1 waited 0.02 minutes for the other ranks in data preparation and timed out"), rank1
    assert "internal error" not in rank1 and "Traceback" not in rank1 and not (tmp_path / "run").exists()
