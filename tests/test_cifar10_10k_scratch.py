"""Smoke test of scripts/cifar10_10k_scratch.py: its --tiny mode end to end on real CIFAR-10 images (a 128-image
training subset, 100 test and 100 CIFAR-100 images), K = 2, 4 epochs, T0 = 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from script_module import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cifar10_10k_scratch.py"


@pytest.fixture(scope="module")
def script():
    return load_script("cifar10_10k_scratch")


def test_tiny_experiment_end_to_end(script, shared_dir, lpconvert_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("LPCONVERT_CACHE", str(lpconvert_cache))
    threads = torch.get_num_threads()
    argv = ["--tiny", "--data", str(shared_dir / "data/cifar10"),
            "--ood", str(shared_dir / "data/cifar100/test.tar.gz"),
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]
    try:
        report = script.main(argv)
    finally:
        torch.set_num_threads(threads)

    # every arm, evaluated as its averaged model; the late-phase arms also as the non-averaged ensemble
    evaluated = {(r["arm"], r["eval"]) for r in report["rows"]}
    assert {arm for arm, _ in evaluated} == set(script.ARMS)
    for arm in script.LATE:
        assert any(e.startswith("ensemble of 2 members") for a, e in evaluated if a == arm)
    for row in report["rows"]:
        assert row["seed"] == 0 and row["count"] == 100
        assert 0 <= row["top1"] <= 100 and math.isfinite(row["nll"]) and 0 <= row["ood_auroc"] <= 1

    # the branched plain and late-phase arms equal the same arms trained in one go (t0 switching), bitwise
    assert [(c["arm"], c["identical"]) for c in report["branch_check"]] == [("plain", True), ("late-phase BN", True)]

    # the arms share the plain epochs 1..T0 and differ after: K = 2 from T0 in the late-phase arms only
    runs = tmp_path / "runs" / "s0"
    shared = [json.loads(line) for line in (runs / "shared" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in shared] == [0, 1]  # stopped after epoch 2's last batch, before its evaluation
    at_t0 = set()
    for arm in script.ARMS:
        history = report["curves"][f"{arm} / 0"]
        assert [r["K"] for r in history[1:]] == [1, 1] + ([2, 2] if arm in script.LATE else [1, 1])
        assert [r["val_top1"] for r in history[:2]] == [r["val_top1"] for r in shared]
        at_t0.add((history[2]["val_top1"], history[2]["val_nll"]))
    assert len(at_t0) == 1  # every arm starts its late phase from the same weights
    swa = script.read_checkpoint(runs / script.slug("plain + SWA") / "checkpoints" / "last.pt")["swa"]
    assert swa["n_averaged"].item() == 1  # SWA from epoch index 3: the last epoch averaged
    control = json.loads((runs / script.slug("accumulation control") / "model" / "lpconvert.json").read_text())
    assert control["provenance"]["config"]["accumulate"] == 2 and control["provenance"]["config"]["K"] == 1

    # paired differences against plain, and both report files
    pairs = {(c["arm"], c["baseline"]) for c in report["comparisons"]}
    assert ("late-phase BN", "plain") in pairs and ("accumulation control", "plain") in pairs
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"] == report["rows"]
    markdown = (tmp_path / "report.md").read_text()
    for arm in script.ARMS:
        assert f"| {arm} |" in markdown
    assert "bitwise equal" in markdown and script.NOTES in markdown

    # --append resumes: rows already in the report are kept, a missing arm is redone from its finished run,
    # and notes after the marker survive the rewrite
    saved["rows"] = [r for r in saved["rows"] if r["arm"] != "accumulation control"]
    (tmp_path / "report.json").write_text(json.dumps(saved))
    (tmp_path / "report.md").write_text(markdown + "hand-written analysis\n")
    try:
        again = script.main(argv + ["--append"])  # (the branching check is not repeated)
    finally:
        torch.set_num_threads(threads)
    assert [r for r in again["rows"] if r["arm"] == "accumulation control"] == [
        r for r in report["rows"] if r["arm"] == "accumulation control"]
    assert len(again["rows"]) == len(report["rows"]) and len(again["invocations"]) == 2
    assert (tmp_path / "report.md").read_text().endswith("hand-written analysis\n")


def test_zoo_recipe_is_the_late_phase_arm_of_the_experiment(script):
    """zoo/cifar10_10k_scratch_resnet20.yaml trains, in one invocation, exactly the late-phase BN arm (seed 0) of the
    script's default experiment (the branching of that arm equals a run in one go: see the test above)."""
    from lpconvert.config import FinetuneConfig, read_recipe

    recipe = read_recipe(SCRIPT.parents[1] / "zoo" / "cifar10_10k_scratch_resnet20.yaml")
    args = script.parse_args([])
    arm = dict(script.common_settings(args), **script.arm_settings("late-phase BN", args), seed=0)
    environment = {"data", "workers", "quiet"}  # where the data is and how it is loaded: not part of the result
    expected = {k: v for k, v in FinetuneConfig(**arm).to_dict().items() if k not in environment}
    assert {k: v for k, v in FinetuneConfig.from_dict(recipe).to_dict().items() if k not in environment} == expected
