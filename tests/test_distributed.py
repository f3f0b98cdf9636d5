"""One run on several processes (2 gloo processes on the CPU): sharded evaluation and BN recalibration equal one
process's, a signal to one rank stops every rank at the same iteration and resumes bit-exactly, and a failure on one
rank ends the others at once with its one line."""

import json
import os
import signal
import time
from functools import partial
from types import SimpleNamespace

import pytest
import safetensors.torch
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_finetune import FAST, _digits_run, _free_port
from torch.utils.data import DataLoader, TensorDataset

import lpconvert
import lpconvert.train.loop
from lpconvert.config import FinetuneConfig
from lpconvert.data import build_data, eval_loader, recalibration_loader
from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.evaluation import evaluate_model
from lpconvert.train.finetune import RunInterrupted, run
from lpconvert.train.loop import evaluate_averaged
from lpconvert.train.runtime import Runtime

WORLD = 2


def _join(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _leave() -> None:
    if dist.is_initialized():  # a failing rank tore its group down already
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# (a) sharded evaluation and recalibration
# --------------------------------------------------------------------------------------------------------------------
def _evaluation_setup():
    """A random digits CNN, its late-phase version (K = 3, σ0 = 0.2), the digits' validation set (odd size: the
    shards differ), 300 noise images as an OOD set and the recalibration loader."""
    torch.manual_seed(0)
    model = timm.create_model("digits_cnn")
    late = lpconvert.convert(timm.create_model("digits_cnn"), K=3, targets=("batchnorm", "classifier"), sigma0=0.2)
    config = FinetuneConfig(model="digits_cnn", pretrained=False, bn_stats="recalibrate", recalibrate_batches=7,
                            **FAST)
    data = build_data(config.data_settings, model)
    val = eval_loader(data.val, 32, workers=0)
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 4 - 2
    ood = DataLoader(TensorDataset(noise, torch.zeros(300, dtype=torch.long)), batch_size=40)
    recalibration = recalibration_loader(data.train, 40, seed=0)
    return model, late, config, val, ood, recalibration


def _evaluations(runtime: Runtime) -> dict:
    model, late, config, val, ood, recalibration = _evaluation_setup()
    plain = evaluate_model(model, val, ood_loaders={"noise": ood}, distributed=runtime.distributed)
    averaged = evaluate_averaged(SimpleNamespace(model=late, swa=None), config, runtime, val, recalibration)
    return {"plain": plain, "averaged": averaged, "val": len(val.dataset)}


def _evaluation_worker(rank, port, out):
    _join(rank, port)
    dist.init_process_group("gloo")
    try:
        result = _evaluations(Runtime(torch.device("cpu"), rank, WORLD))
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        _leave()


def test_two_processes_evaluate_what_one_process_evaluates(tmp_path):
    """Top-1, NLL, ECE, entropy and OOD AUROC of a model, and the metrics of a late-phase model collapsed with BN
    statistics re-estimated on each rank's share of 7 batches, equal one process's to 1e-6."""
    mp.spawn(_evaluation_worker, args=(_free_port(), tmp_path), nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    one = _evaluations(Runtime(torch.device("cpu")))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1]  # every rank returns the whole set's metrics
    two = ranks[0]
    assert two["val"] % 32 and two["plain"]["count"] == two["val"] == one["plain"]["count"]
    assert 0 < one["plain"]["top1"] < 50 and 0.5 < one["plain"]["auroc/noise"] < 1  # a random model, real numbers
    for variant in ("plain", "averaged"):
        assert one[variant].keys() == two[variant].keys()
        for key, value in one[variant].items():
            assert two[variant][key] == pytest.approx(value, abs=1e-6, rel=1e-6), (variant, key)
    assert one["averaged"]["nll"] != one["plain"]["nll"]  # the recalibrated late-phase model is another model


# --------------------------------------------------------------------------------------------------------------------
# (b) a signal to one rank, (c) a failure on one rank
# --------------------------------------------------------------------------------------------------------------------
def _on_iteration(n: int, action):
    """Make `action` happen inside the training loop at iteration `n` (the learning-rate factor is computed once per
    iteration); returns the undo."""
    original, calls = lpconvert.train.loop.lr_factor, []

    def hooked(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            action()
        return original(*args, **kwargs)

    lpconvert.train.loop.lr_factor = hooked
    return lambda: setattr(lpconvert.train.loop, "lr_factor", original)


def _fail(out):
    (out / "raised").write_text(str(time.time()))
    raise ValueError("the data of this rank is broken")


def _runs_worker(rank, port, jobs, out):
    """Runs `jobs` one after the other in one process group: (name, config, rank to act on, "sigterm" | "error")."""
    _join(rank, port)
    try:
        for name, config_dict, acting_rank, what in jobs:
            undo = lambda: None  # noqa: E731
            if rank == acting_rank:
                action = (lambda: os.kill(os.getpid(), signal.SIGTERM)) if what == "sigterm" else partial(_fail, out)
                undo = _on_iteration(4, action)
            try:
                run(FinetuneConfig(**config_dict))
                outcome = {"ended": "finished"}
            except (RunInterrupted, LatePhaseError, ValueError) as exc:
                outcome = {"ended": type(exc).__name__, "message": str(exc),
                           "run_dir": str(getattr(exc, "run_dir", ""))}
                if isinstance(exc, RunInterrupted) and rank == 0:  # the checkpoint as the interruption left it
                    saved = torch.load(f"{exc.run_dir}/checkpoints/last.pt", map_location="cpu", weights_only=True)
                    outcome.update(position=saved["position"], ranks_saved=len(saved["rank_buffers"]))
            finally:
                undo()
            (out / f"{name}-rank{rank}.json").write_text(json.dumps({**outcome, "time": time.time()}))
    finally:
        _leave()


def _spawn(tmp_path, jobs):
    """Spawn 2 processes running `jobs` (name, acting rank, what, config overrides); each job's outcome per rank."""
    out = tmp_path / "outcomes"
    out.mkdir()
    configs = [(name, _digits_run(tmp_path, name, epochs=2, sigma0=0.05, K=2, device="cpu", **overrides).to_dict(),
                acting_rank, what) for name, acting_rank, what, overrides in jobs]
    mp.spawn(_runs_worker, args=(_free_port(), configs, out), nprocs=WORLD, join=True)
    return out, {name: [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(WORLD)]
                 for name, *_ in jobs}


def test_sigterm_to_one_rank_stops_every_rank_and_resumes_bit_exactly(tmp_path):
    """SIGTERM to rank 1 at iteration 4: both ranks stop at the next --log-every boundary (iteration 5) with the same
    interruption naming the run directory, rank 0 wrote one complete checkpoint, and resuming ends with the
    uninterrupted run's model bit for bit."""
    resumed = str(tmp_path / "resumed")
    _, ended = _spawn(tmp_path, [("straight", None, None, {}), ("resumed", 1, "sigterm", {}),
                                 ("again", None, None, dict(resume=resumed, output=resumed))])
    assert [r["ended"] for r in ended["straight"]] == ["finished", "finished"]
    stopped = ended["resumed"]
    assert [r["ended"] for r in stopped] == ["RunInterrupted", "RunInterrupted"]
    assert stopped[0]["message"] == stopped[1]["message"] == "SIGTERM"
    assert stopped[0]["run_dir"] == stopped[1]["run_dir"] == resumed
    assert stopped[0]["position"]["iteration"] == 5 and stopped[0]["position"]["epoch"] == 0  # mid-epoch (of 10)
    assert stopped[0]["ranks_saved"] == 2  # both ranks' rank-local BN statistics are in the one checkpoint
    assert [r["ended"] for r in ended["again"]] == ["finished", "finished"]
    checkpoint = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["position"]["epoch"] == 2 and checkpoint["model"]["fc.weight"].shape == (2, 10, 64)
    a = safetensors.torch.load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 5
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [0, 1, 2] and log[2]["val_top1"] > 50  # it trained


def test_a_failure_on_one_rank_ends_every_rank_at_once_with_its_line(tmp_path):
    """An exception on rank 1 at iteration 4: rank 1 ends with it, rank 0 within seconds with one line naming rank 1
    and its message (not after --dist-timeout)."""
    out, ended = _spawn(tmp_path, [("failing", 1, "error", dict(dist_timeout=5.0))])
    ended = ended["failing"]
    assert ended[1]["ended"] == "ValueError" and ended[1]["message"] == "the data of this rank is broken"
    assert ended[0]["ended"] == "LatePhaseError"
    assert ended[0]["message"] == "rank 1 failed: the data of this rank is broken; see its output"
    assert ended[0]["time"] - float((out / "raised").read_text()) < 30


# --------------------------------------------------------------------------------------------------------------------
# (d) data prepared once per node, (e) the batch said plainly
# --------------------------------------------------------------------------------------------------------------------
def _node_worker(rank, port, out):
    import logging

    from lpconvert.train.distributed import local_main_first
    from lpconvert.train.job import log_batch
    from lpconvert.train.runtime import init_runtime

    _join(rank, port)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("lpconvert").addHandler(handler)
    logging.getLogger("lpconvert").setLevel(logging.INFO)
    settings = {**{k: v for k, v in FAST.items() if k != "batch_size"}, "quiet": False}
    config = FinetuneConfig(model="digits_cnn", batch_size_per_gpu=8, device="cpu", **settings)
    runtime = init_runtime(config)
    try:
        prepared = out / "prepared"
        with local_main_first(runtime):
            seen = prepared.exists()  # local rank 0 first: it finds nothing, the other rank finds its work
            if runtime.local_rank == 0:
                time.sleep(1.0)
                prepared.write_text("extracted")
        log_batch(config, runtime, timm.create_model("digits_cnn"))
        (out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "batch_size": config.batch_size,
                                                           "lines": lines}))
    finally:
        _leave()


def test_local_rank_0_prepares_the_data_first_and_the_batch_is_said_plainly(tmp_path):
    mp.spawn(_node_worker, args=(_free_port(), tmp_path), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["seen"] for r in ranks] == [False, True]
    assert [r["batch_size"] for r in ranks] == [16, 16]  # --batch-size-per-gpu 8 on 2 processes: a global batch of 16
    start, threads, warning = ranks[0]["lines"]
    assert threads.startswith("CPU threads: ") and "--threads N" in threads  # how many it chose without --threads
    assert start == ("batch: 16 global = 8 per process × 2 process(es); each member's BatchNorm batch: 8 images per "
                     "process")
    assert "normalises over 8 images per process" in warning and "--sync-bn" in warning
    assert ranks[1]["lines"] == []  # rank 0 speaks for the run
    with pytest.raises(LatePhaseError, match="--batch-size-per-gpu"):
        FinetuneConfig(batch_size=64, batch_size_per_gpu=8)


# --------------------------------------------------------------------------------------------------------------------
# (f) the same through torchrun and the command line: SIGTERM to rank 1's process only
# --------------------------------------------------------------------------------------------------------------------
def _rank_pid(marker: str, rank: int) -> int | None:
    """The process of torchrun's worker `rank` started with LPCONVERT_TEST_MARKER=`marker` (from /proc)."""
    from pathlib import Path

    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = set(environ.read_bytes().split(b"\0"))
        except OSError:
            continue
        if f"LPCONVERT_TEST_MARKER={marker}".encode() in variables and f"RANK={rank}".encode() in variables:
            return int(environ.parent.name)
    return None


def _torchrun(tmp_path, name: str, *args: str) -> tuple[int, list[str]]:
    """Run `lpconvert finetune` under torchrun on 2 CPU processes; (torchrun's exit code, each rank's output)."""
    import subprocess
    import sys

    logs = tmp_path / f"logs-{name}"
    env = {**os.environ, "LPCONVERT_TEST_MARKER": f"{tmp_path}-{name}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
               str(_free_port()), "--log-dir", str(logs), "--redirects", "3", "-m", "lpconvert", "finetune",
               "digits_cnn", "--no-pretrained", "--data", "sklearn-digits", "--K", "2", "--batch-size", "40",
               "--workers", "0", "--quiet", "--device", "cpu", "--threads", "1", "--schedule", "constant",
               "--output", str(tmp_path / "run"), *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if name == "stopped":
        deadline = time.time() + 240
        while not (tmp_path / "run" / "checkpoints" / "last.pt").exists():  # training, signal handlers in place
            assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        os.kill(_rank_pid(f"{tmp_path}-{name}", 1), signal.SIGTERM)
    _, errors = process.communicate(timeout=300)
    outputs = [sorted(logs.rglob(f"attempt_0/{rank}/stderr.log"))[0].read_text() for rank in range(WORLD)]
    return process.returncode, outputs + [errors]


@pytest.mark.slow  # two torchrun launches of the CLI (46 s on 2 cores); the in-process 2-rank stop test runs always
def test_torchrun_sigterm_to_one_rank_exits_130_on_every_rank_with_one_line(tmp_path):
    code, (rank0, rank1, torchrun) = _torchrun(tmp_path, "stopped", "--epochs", "5", "--checkpoint-every", "2",
                                              "--log-every", "2")
    line = f"interrupted (SIGTERM); a checkpoint was saved: continue with --resume {tmp_path / 'run'}"
    assert code != 0 and torchrun.count("exitcode  : 130") == WORLD, torchrun  # both workers ended with 130
    assert [out.strip().splitlines()[-1] for out in (rank0, rank1)] == [line, line]
    assert "Traceback" not in rank0 + rank1
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["position"]["epoch"] < 5 and checkpoint["position"]["iteration"] % 2 == 0
    code, _ = _torchrun(tmp_path, "resumed", "--resume", str(tmp_path / "run"), "--epochs", "5",
                        "--checkpoint-every", "2", "--log-every", "2")
    assert code == 0 and (tmp_path / "run" / "model" / "model.safetensors").is_file()
