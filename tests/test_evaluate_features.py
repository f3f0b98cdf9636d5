"""`lpconvert evaluate` around the metrics: OOD sets by name, sharded under torchrun with the numbers of one process,
and data-loading workers that fit the CPUs the process may use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
from evaluation_sets import cifar_tree, invoke, noise_tree, tar_tree
from test_finetune import _free_port

from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.command import default_workers, ood_names


@pytest.fixture(scope="module")
def tiny_test(cifar10_test_dir, tmp_path_factory):
    """4 CIFAR-10 test images per class (40), an ImageFolder tree."""
    return cifar_tree(cifar10_test_dir, tmp_path_factory.mktemp("features") / "test", 4)


def test_ood_names_come_from_the_folder_above_a_split():
    names = ood_names(["../shared/data/cifar100/test.tar.gz", "/data/svhn/test", "/data/imagenet-o",
                       "/elsewhere/cifar100/test.tgz", "far=/data/x/val.tar", "/q/cifar100/val"])
    assert list(names) == ["cifar100", "svhn", "imagenet-o", "cifar100-2", "far", "cifar100-3"]
    assert names["far"] == "/data/x/val.tar" and names["cifar100-2"] == "/elsewhere/cifar100/test.tgz"
    with pytest.raises(LatePhaseError, match="'a' is given twice"):
        ood_names(["a=/x/test", "a=/y/test"])


def test_two_ood_archives_with_the_same_layout_keep_separate_names(tiny_test, tmp_path, monkeypatch):
    """noise/test.tar.gz and same/test.tar.gz both hold test/<class>/…: two columns, each its own set's AUROC
    (noise images are told apart; copies of the evaluation images score exactly 0.5)."""
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path / "cache"))
    noise = tar_tree(noise_tree(tmp_path / "noise-tree", 40, seed=0), tmp_path / "noise" / "test.tar.gz")
    same = tar_tree(tiny_test, tmp_path / "same" / "test.tar.gz")
    from conftest import SHARED

    result = invoke("evaluate", "cifar_resnet20", "--weights", SHARED / "weights/cifar10_resnet/resnet20-12fca82f.th",
                    "--data", tiny_test, "--ood", noise, "--ood", same, "-j", 0, "--device", "cpu",
                    "--json", tmp_path / "rows.json")
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "rows.json").read_text())[0]
    assert row["auroc/same"] == pytest.approx(0.5, abs=1e-12) and row["auroc_msp/same"] == pytest.approx(0.5, abs=1e-12)
    assert row["auroc/noise"] > 0.6 and row["auroc_msp/noise"] > 0.6
    assert row["auroc/mean"] == pytest.approx((row["auroc/noise"] + 0.5) / 2)
    header = result.stdout.splitlines()[0].split()
    assert {"auroc/noise", "auroc/same", "auroc_msp/noise", "auroc_msp/same"} <= set(header)


def _evaluate_args(tiny_test, out):
    from conftest import SHARED

    return ["evaluate", "cifar_resnet20", "--weights", str(SHARED / "weights/cifar10_resnet/resnet20-12fca82f.th"),
            "--data", str(tiny_test), "--ood", f"self={tiny_test}", "--calibration-split", "0.5", "--corruptions",
            "--corruption-types", "contrast", "--severities", "2", "--batch-size", "12", "-j", "0", "--threads", "1",
            "--device", "cpu", "--json", str(out)]


@pytest.mark.slow  # torchrun of the CLI (22 s on 2 cores); tests/test_distributed.py evaluates on 2 ranks in-process
def test_torchrun_two_processes_evaluate_what_one_process_evaluates_and_print_once(tiny_test, tmp_path,
                                                                                  monkeypatch):
    """`torchrun --nproc_per_node 2 -m lpconvert evaluate` (gloo on the CPU; 40 images in batches of 12: the shards
    differ in size): the same rows as one process — clean metrics, OOD AUROC, temperature scaling, a corrupted set —
    and the table printed once."""
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path / "cache"))
    one = invoke(*_evaluate_args(tiny_test, tmp_path / "one.json"))
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LPCONVERT_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "lpconvert", *_evaluate_args(tiny_test, tmp_path / "two.json")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("top1") == 2 and done.stdout.count("temperature scaling") == 1, done.stdout
    assert "mCE" in done.stdout and "Traceback" not in done.stderr
    (single,), (sharded,) = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert single.keys() == sharded.keys() and single["count"] == 40
    for key, value in single.items():
        assert sharded[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-6, abs=1e-6)), key


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_default_workers_never_exceed_a_one_cpu_affinity(tiny_test, tmp_path, monkeypatch):
    """Pinned to one CPU, the default starts no worker process and torch's "suggested max number of worker" warning
    never shows (it does for -j 2); with more CPUs the default is one less, at most 4."""
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path / "cache"))
    from conftest import SHARED

    weights = SHARED / "weights/cifar10_resnet/resnet20-12fca82f.th"
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        assert default_workers() == 0 and default_workers(processes_on_node=2) == 0
        caught = {}
        for workers in ((), ("-j", "2")):
            with warnings.catch_warnings(record=True) as caught[workers]:
                warnings.simplefilter("always")
                result = invoke("evaluate", "cifar_resnet20", "--weights", weights, "--data", tiny_test,
                                "--subset", 10, "--device", "cpu", *workers)
            assert result.exit_code == 0, result.output
    finally:
        os.sched_setaffinity(0, before)
    said = {key: [str(w.message) for w in found if "number of worker" in str(w.message)] for key, found in
            caught.items()}
    assert said[()] == [] and said[("-j", "2")]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert (default_workers(), default_workers(processes_on_node=8), default_workers(processes_on_node=16)) == (4, 1, 0)
