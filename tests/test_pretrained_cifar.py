"""scripts/pretrained_cifar.py is a recipe over `lpconvert compare`: one comparison per schedule, its arms, the
commands --plan prints and the commands of the zoo/results files it produced. (Training, evaluation, statistics
and the report are compare's: tests/test_compare.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from script_module import compare_commands, load_script, planned_by_cli, resolved

from lpconvert.compare.plan import arm_config, branches

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "../shared/weights/cifar10_resnet"
PATHS = ["--data", "../shared/data/cifar10", "--ood", "../shared/data/cifar100/test.tar.gz"]
#: results file → the script's arguments of the old invocations (the command lines in the file)
RESULTS = {
    "cifar10.md": [
        ["--depth", "20", "--weights", f"{WEIGHTS}/resnet20-12fca82f.th", "--epochs", "1", "--workers", "2",
         "--schedules", "cifar", "--gammas", "1/K", "1", "--arms", "plain", "late-phase-BN", "accumulation-control",
         "--output", "runs/cifar10"],
        ["--depth", "20", "--weights", f"{WEIGHTS}/resnet20-12fca82f.th", "--epochs", "1", "--workers", "2",
         "--schedules", "imagenet", "--gammas", "1", "--arms", "plain", "late-phase-BN", "--output", "runs/cifar10"]],
    "cifar10_subset.md": [
        ["--depth", "20", "--weights", f"{WEIGHTS}/resnet20-12fca82f.th", "--epochs", "4", "--train-subset", "5000",
         "--workers", "2", "--schedules", "cifar", "--gammas", "1", "--output", "runs/cifar10_subset"]],
    "cifar10_resnet32.md": [
        ["--depth", "32", "--weights", f"{WEIGHTS}/resnet32-d509ac18.th", "--epochs", "1", "--workers", "2",
         "--schedules", "cifar", "--gammas", "1/K", "--arms", "plain", "late-phase-BN", "--output",
         "runs/cifar10_resnet32"]],
}


@pytest.fixture(scope="module")
def script():
    return load_script("pretrained_cifar")


def test_one_comparison_per_schedule_with_every_arm_per_gamma(script, tmp_path):
    args = script.parse_args(["--weights", "w.th", "--ood", str(tmp_path), "--output", str(tmp_path / "c")])
    cifar, imagenet = script.comparisons(args)
    assert (cifar.folder, imagenet.folder) == (tmp_path / "c" / "cifar", tmp_path / "c" / "imagenet")
    configs = {a.name: arm_config(cifar.base, a, seed=0, output=Path("run")) for a in cifar.arms}
    summary = {name: (c.K, c.late_phase if c.K > 1 else None, c.accumulate, c.gamma_theta)
               for name, c in configs.items()}
    bn, both = ("batchnorm",), ("batchnorm", "classifier")
    assert summary == {
        "plain": (1, None, 1, None),
        "late-phase-BN-g1K": (10, bn, 1, 0.1), "late-phase-BN-g1": (10, bn, 1, 1.0),
        "late-phase-BN+classifier-g1K": (10, both, 1, 0.1), "late-phase-BN+classifier-g1": (10, both, 1, 1.0),
        "accumulation-control-g1K": (1, None, 10, 0.1), "accumulation-control-g1": (1, None, 10, 1.0),
    }
    assert [a.name for a in imagenet.arms] == list(configs)
    # from the pretrained state (T0 = 0, nothing to branch from), the last epoch, all training images
    for comparison in (cifar, imagenet):
        base = comparison.base
        assert base.t0 == 0 and not any(branches(a, base) for a in comparison.arms)
        assert (base.model, base.weights, base.val_split, base.train_subset) == ("cifar_resnet20", "w.th", 0.0, None)
        assert all(c.select == "last" for c in configs.values()) and comparison.seeds == [0, 1, 2]
    assert (cifar.base.lr, cifar.base.schedule, cifar.base.anneal_end, cifar.base.lr_end) == (0.01, "linear", 10, 0.001)
    assert (imagenet.base.lr, imagenet.base.schedule, imagenet.base.milestones) == (0.001, "multistep", (10,))


def test_plan_prints_the_lpconvert_compare_commands_of_the_experiment(script, shared_dir, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = [*PATHS, "--depth", "32", "--epochs", "3", "--train-subset", "100", "--K", "4", "--seeds", "5", "7",
            "--output", "runs/x"]
    monkeypatch.setattr(script, "run_comparison", lambda c: pytest.fail("--plan trained something"))
    assert script.main(["--plan", *argv]) == []
    lines = capsys.readouterr().out.splitlines()
    planned = script.comparisons(script.parse_args(argv))
    assert len(lines) == len(planned) == 2
    for line, comparison in zip(lines, planned):
        assert resolved(planned_by_cli(line, monkeypatch)) == resolved(comparison)


def test_main_runs_every_planned_comparison(script, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(script, "run_comparison", lambda c: ran.append(c) or {"folder": str(c.folder)})
    reports = script.main(["--weights", "w.th", "--ood", str(tmp_path), "--output", str(tmp_path), "--schedules",
                           "imagenet"])
    assert reports == [{"folder": str(tmp_path / "imagenet")}] and len(ran) == 1


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_the_results_files_name_the_compare_commands_of_their_experiment(script, name, shared_dir, monkeypatch):
    """The first line of each results file the old script wrote: the same experiment as `lpconvert compare`
    commands (the numbers below it are the old script's)."""
    monkeypatch.chdir(ROOT)
    commands = compare_commands(ROOT / "zoo" / "results" / name)
    planned = [c for argv in RESULTS[name] for c in script.comparisons(script.parse_args([*PATHS, *argv]))]
    assert len(commands) == len(planned)
    for command, comparison in zip(commands, planned):
        assert resolved(planned_by_cli(command, monkeypatch)) == resolved(comparison)
