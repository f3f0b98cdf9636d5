"""scripts/cifar10_10k_scratch.py is a recipe over `lpconvert compare`: its arms, the comparison they make, the zoo
recipe that is its late-phase arm and the command of zoo/results/cifar10_10k_scratch.md. (Branching, pairing,
evaluation and the report are compare's, tested on real runs in tests/test_compare.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_module import compare_commands, load_script, planned_by_cli, resolved

from lpconvert.compare.plan import LATE_SETTINGS, Comparison, arm_config, branches
from lpconvert.config import FinetuneConfig
from lpconvert.zoo import read_recipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "zoo" / "results" / "cifar10_10k_scratch"


@pytest.fixture(scope="module")
def script():
    return load_script("cifar10_10k_scratch")


def _configs(comparison: Comparison) -> dict[str, FinetuneConfig]:
    return {a.name: arm_config(comparison.base, a, seed=0, output=Path("run")) for a in comparison.arms}


def test_the_arms_branch_at_t0_and_differ_only_after_it(script, tmp_path):
    comparison = script.comparison(script.parse_args(["--output", str(tmp_path / "c"), "--ood", str(tmp_path)]))
    assert [a.name for a in comparison.arms] == list(script.ARMS) and comparison.seeds == [0, 1, 2]
    assert all(branches(a, comparison.base) for a in comparison.arms)  # one trunk per seed, epochs 1..20
    base = comparison.base
    assert (base.t0, base.epochs, base.train_subset, base.val_subset, base.val_split) == (20, 25, 10000, None, 0.0)
    assert (base.anneal_start, base.anneal_end, base.lr, base.lr_end) == (12.5, 22.5, 0.1, 0.001)
    configs = _configs(comparison)
    summary = {name: (c.K, c.accumulate, c.gamma_theta, c.swa_start, c.swa_lr) for name, c in configs.items()}
    assert summary == {
        "plain": (1, 1, 1.0, None, None),
        "late-phase-BN": (10, 1, 1.0, None, None),
        "plain+SWA": (1, 1, 1.0, 20, 0.02),
        "late-phase-BN+SWA": (10, 1, 1.0, 20, 0.02),
        "accumulation-control": (1, 10, 1.0, None, None),
    }
    late = LATE_SETTINGS | {"swa_start", "swa_lr"}
    early = {k: v for k, v in base.to_dict().items() if k not in late}
    for config in configs.values():  # everything that acts before T0 is the base's in every arm
        assert {k: v for k, v in config.to_dict().items() if k not in late | {"seed", "select", "output"}} == {
            k: v for k, v in early.items() if k not in {"seed", "select", "output"}}
        assert config.select == "last" and config.seed == 0 and config.val_split == 0.0


def test_the_settings_follow_the_fractions_and_bad_ones_are_refused(script, tmp_path):
    args = script.parse_args(["--epochs", "10", "--t0-fraction", "0.6", "--gamma-theta", "0.1", "--seeds", "0",
                              "--arms", "plain", "late-phase-BN", "--eval-subset", "2000"])
    comparison = script.comparison(_elsewhere(args, tmp_path))
    configs = _configs(comparison)
    assert list(configs) == ["plain", "late-phase-BN"] and comparison.seeds == [0]
    assert (comparison.base.t0, comparison.base.val_subset, configs["late-phase-BN"].gamma_theta) == (6, 2000, 0.1)
    assert (comparison.base.anneal_start, comparison.base.anneal_end) == (5.0, 9.0)
    for bad in (["--t0-fraction", "0"], ["--swa-fraction", "0.5"], ["--swa-fraction", "1"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


def _elsewhere(args, tmp_path):
    """`args` writing under tmp_path (the OOD set only has to exist: nothing is evaluated)."""
    args.output, args.ood = str(tmp_path / "c"), str(tmp_path)
    return args


def test_main_runs_exactly_the_planned_comparison(script, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(script, "run_comparison", lambda c: ran.append(c) or {"arms": {}})
    assert script.main(["--output", str(tmp_path / "c"), "--ood", str(tmp_path), "--seeds", "3"]) == {"arms": {}}
    (comparison,) = ran
    assert comparison.folder == tmp_path / "c" and comparison.seeds == [3] and comparison.ood == [str(tmp_path)]


def test_zoo_recipe_is_the_late_phase_arm_of_the_experiment(script, tmp_path):
    """zoo/cifar10_10k_scratch_resnet20.yaml trains, in one invocation, exactly the late-phase BN arm (seed 0) of the
    script's experiment (a branched arm equals the run in one go: tests/test_compare.py)."""
    comparison = script.comparison(_elsewhere(script.parse_args([]), tmp_path))
    arm = _configs(comparison)["late-phase-BN"].to_dict()
    recipe = FinetuneConfig.from_dict(read_recipe(ROOT / "zoo" / "cifar10_10k_scratch_resnet20.yaml")).to_dict()
    # where the data is, how it is loaded, and how many test images are evaluated: not part of the trained weights
    environment = {"data", "workers", "threads", "quiet", "output", "val_subset"}
    assert {k: v for k, v in recipe.items() if k not in environment} == {
        k: v for k, v in arm.items() if k not in environment}


def test_the_results_file_names_the_compare_command_of_the_experiment(script, shared_dir, monkeypatch):
    """The first line of zoo/results/cifar10_10k_scratch.md (and the JSON's provenance) is the script's default
    experiment as one `lpconvert compare` command; the numbers below it are the old script's."""
    monkeypatch.chdir(ROOT)  # the command's paths are relative to the repository (../shared)
    (command,) = compare_commands(RESULTS.with_suffix(".md"))
    assert json.loads(RESULTS.with_suffix(".json").read_text())["provenance"] in RESULTS.with_suffix(".md").read_text()
    from_cli = planned_by_cli(command, monkeypatch)
    args = script.parse_args(["--data", "../shared/data/cifar10", "--ood", "../shared/data/cifar100/test.tar.gz",
                              "--output", "runs/cifar10_10k_scratch"])
    assert resolved(from_cli) == resolved(script.comparison(args))
