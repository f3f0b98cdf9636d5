"""What happens before any command runs: the torch / torchvision pair, OpenMP's wait policy, the CPU thread count."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lpconvert_launcher
from lpconvert import compat
from lpconvert.train import runtime

REPO = Path(__file__).resolve().parents[1]


def _python(*args: str, pythonpath: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    paths = [str(pythonpath)] if pythonpath else []
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(REPO)]), **env}
    environment.pop("LPCONVERT_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def unpaired_torchvision(tmp_path: Path) -> tuple[Path, str, str]:
    """A folder that, first on PYTHONPATH, makes the installed torchvision's metadata say the release before the
    one that pairs with the installed torch (what `pip install torchvision==…` of another release leaves behind)."""
    torch_version = compat.installed_version("torch")
    series = compat.paired_torchvision(torch_version)
    fake = f"0.{int(series.split('.')[1]) - 1}.0"
    info = tmp_path / f"torchvision-{fake}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchvision\nVersion: {fake}\n")
    return tmp_path, torch_version, fake


def test_versions_that_do_not_pair_are_one_line_from_the_command_and_from_python_m(unpaired_torchvision):
    folder, torch_version, fake = unpaired_torchvision
    fix = f'"torchvision=={compat.paired_torchvision(torch_version)}.*"'
    command = _python("-m", "lpconvert_launcher", "zoo", pythonpath=folder)  # what the `lpconvert` script runs
    assert command.returncode == 2 and command.stdout == "", command
    assert command.stderr.count("\n") == 1 and command.stderr.startswith("error: ")
    for fragment in (f"torch {torch_version}", f"torchvision {fake}", "do not pair", "pip install", fix):
        assert fragment in command.stderr
    module = _python("-m", "lpconvert", "zoo", pythonpath=folder)  # torchrun's form: Python's own one line
    assert module.returncode != 0 and module.stderr.count("\n") == 1
    assert f"torchvision {fake}" in module.stderr and fix in module.stderr
    library = _python("-c", "import lpconvert", pythonpath=folder)  # the library: a clear ImportError
    assert library.returncode == 1 and library.stderr.strip().splitlines()[-1].startswith(
        f"lpconvert.compat.TorchPairError: torch {torch_version} and torchvision {fake} do not pair")
    debug = _python("-m", "lpconvert_launcher", "--debug", "zoo", pythonpath=folder)
    assert "Traceback" in debug.stderr


def test_a_torchvision_that_fails_to_import_is_one_line(monkeypatch):
    """The usual symptom of a mismatched build: ``import torchvision`` raises inside its operator registrations."""

    class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "torchvision" else None

        def exec_module(self, module):
            raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(compat.TorchPairError) as info:
        compat.check_torch_pair()
    message = str(info.value)
    assert "\n" not in message
    for fragment in (f"torchvision {compat.installed_version('torchvision')}", compat.installed_version("torch"),
                     "RuntimeError: operator torchvision::nms does not exist", "pip install --force-reinstall"):
        assert fragment in message


def test_the_pairing_rule_and_the_install_command():
    assert compat.paired_torchvision("2.14.1+cu130") == "0.29" and compat.paired_torchvision("2.4.0") == "0.19"
    assert compat.paired_torchvision("3.0.0") is None and compat.paired_torchvision("nightly") is None
    assert compat.version_mismatch("2.14.1", "0.29.1+cpu") is None
    assert compat.version_mismatch("2.15.0.dev20270101", "0.30.0.dev20270101") is None
    assert compat.version_mismatch("2.14.1", None) is None and compat.version_mismatch("3.1.0", "0.2.0") is None
    message = compat.version_mismatch("2.14.1+cpu", "0.28.0")
    assert message.startswith("torch 2.14.1+cpu and torchvision 0.28.0 do not pair") and message.endswith(
        'pip install torch==2.14.1 "torchvision==0.29.*" --index-url https://download.pytorch.org/whl/cpu')
    assert compat.install_command("2.14.1") == 'pip install torch==2.14.1 "torchvision==0.29.*"'
    assert compat.install_command("2.14.1+cu130", reinstall=True) == ('pip install --force-reinstall --no-deps '
                                                                      '"torchvision==0.29.*" --index-url '
                                                                      'https://download.pytorch.org/whl/cu130')


def test_the_command_sets_a_passive_wait_policy_before_torch_unless_the_user_chose_one(monkeypatch):
    seen = []
    monkeypatch.setattr("lpconvert.cli.main", lambda **kwargs: seen.append(os.environ.get("OMP_WAIT_POLICY")))
    monkeypatch.setenv("OMP_WAIT_POLICY", "x")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    lpconvert_launcher.main()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    lpconvert_launcher.main()
    assert seen == ["PASSIVE", "ACTIVE"], seen
    imported = _python("-c", "import sys, lpconvert_launcher; print(sorted({'torch', 'lpconvert'} & set(sys.modules)))")
    assert imported.stdout.strip() == "[]", imported  # nothing of torch is loaded before the launcher's main runs


@pytest.fixture
def choose(monkeypatch):
    """default_threads on a made-up machine: (cpus, busy, torch's count) → the choice; the cache emptied around."""

    def choice(cpus: int, busy: float, torch_threads: int = 64, processes: int = 1) -> runtime.ThreadChoice:
        runtime.default_threads.cache_clear()
        monkeypatch.setattr(runtime, "available_cpus", lambda: cpus)
        monkeypatch.setattr(runtime, "busy_cpus", lambda: busy)
        monkeypatch.setattr(torch, "get_num_threads", lambda: torch_threads)
        return runtime.default_threads(processes)

    yield choice
    runtime.default_threads.cache_clear()


def test_the_default_thread_count_follows_the_cpus_and_the_load(choose):
    assert choose(2, 0.0).threads == 2  # quiet: every CPU
    assert choose(2, 0.4).threads == 2
    assert choose(2, 1.0).threads == 1 and choose(2, 3.0).threads == 1  # busy: never more threads than free cores
    assert choose(16, 4.0).threads == 12 and choose(16, 0.0, torch_threads=8).threads == 8  # at most torch's count
    assert choose(16, 0.0, processes=4).threads == 4  # torchrun: the node's CPUs shared among its processes
    assert choose(16, 3.0, processes=4).threads == 4  # the node's 3 other ranks are not load
    assert choose(16, 7.0, processes=4).threads == 3
    described = choose(2, 3.0).describe()
    assert described.startswith("CPU threads: 1 (this process may use 2 CPU(s);") and "--threads N" in described
    assert runtime.cpu_threads(5) == 5  # --threads wins


def test_the_choice_is_made_once_per_process(choose, monkeypatch):
    first = choose(2, 0.0).threads
    monkeypatch.setattr(runtime, "busy_cpus", lambda: 5.0)  # the process's own earlier runs are not load later
    assert runtime.default_threads(1).threads == runtime.cpu_threads(None) == first == 2


def test_busy_processes_count_by_their_priority():
    code = "import sys; print('ready', flush=True)\nwhile True: pass"
    spinners = [subprocess.Popen(["nice", "-n", str(n), sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                for n in (0, 19)]
    try:
        for spinner in spinners:
            assert spinner.stdout.readline().strip() == "ready"
        time.sleep(0.05)
        weights = runtime.runnable_threads()
        for spinner in spinners:  # always runnable; weighted by its nice level (19: 1.4 % of a nice-0 thread)
            nice = os.getpriority(os.PRIO_PROCESS, spinner.pid)
            assert weights[spinner.pid] == pytest.approx(min(1.0, 1.25 ** -nice))
        assert os.getpriority(os.PRIO_PROCESS, spinners[1].pid) == 19
        assert weights[spinners[1].pid] < weights[spinners[0].pid] / 5
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_the_demo_runs_one_thread_unless_asked(monkeypatch):
    from click.testing import CliRunner

    from lpconvert.cli import main

    seen = []
    monkeypatch.setattr("lpconvert.demo.run_demo", lambda output, **kwargs: seen.append(kwargs["threads"]) or "table")
    for args in ([], ["--threads", "3"], ["--threads", "0"]):
        assert CliRunner().invoke(main, ["demo", *args], catch_exceptions=False).output == "table\n"
    assert seen == [1, 3, None]  # 0: finetune's default (the CPUs and the load)
