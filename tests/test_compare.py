"""`lpconvert compare` on the digits data: paired seeds, arms branched at T0, the report's numbers."""

import json

import pytest
import safetensors.torch
import torch

from lpconvert.compare import command as compare_module
from lpconvert.compare.command import run_comparison
from lpconvert.compare.plan import parse_arm, plan_comparison
from lpconvert.compare.stats import paired_difference
from lpconvert.config import FinetuneConfig
from lpconvert.errors import LatePhaseError
from lpconvert.train.finetune import DIGITS, run

BASE = dict(model="digits_cnn", pretrained=False, data=DIGITS, batch_size=40, workers=0, quiet=True, lr=0.05,
            schedule="constant", K=3, t0=1, epochs=2, late_phase=("batchnorm", "classifier"))


def _rows(path):
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_compare_branches_at_t0_exactly_and_reports_the_runs_numbers(tmp_path, monkeypatch):
    base = FinetuneConfig(**BASE)
    arms = [parse_arm("plain"), parse_arm("late: K=3 sigma0=0.1")]
    report = run_comparison(plan_comparison(base, arms, [0, 1], tmp_path / "cmp"))
    folder = tmp_path / "cmp"
    assert {p.name for p in (folder / "seed0").iterdir()} == {"trunk", "plain", "late"}
    # the branch is bitwise the run in one go
    alone = run(FinetuneConfig(**{**BASE, "sigma0": 0.1, "seed": 0, "select": "last", "val_split": 0.0,
                                  "output": str(tmp_path / "alone")}))
    assert alone["K"] == 3
    branched = safetensors.torch.load_file(str(folder / "seed0" / "late" / "model" / "model.safetensors"))
    one_go = safetensors.torch.load_file(str(tmp_path / "alone" / "model" / "model.safetensors"))
    assert branched.keys() == one_go.keys() and all(torch.equal(branched[k], one_go[k]) for k in one_go)
    assert _rows(folder / "seed0" / "late") == _rows(tmp_path / "alone")
    # the report's numbers are the runs' own (last epoch, averaged model), paired differences from them
    for arm in ("plain", "late"):
        per_seed = report["arms"][arm]["per_seed"]["averaged"]["top1"]
        assert per_seed == [_rows(folder / f"seed{s}" / arm)[-1]["val_top1"] for s in (0, 1)]
    assert "ensemble" in report["arms"]["late"]["per_seed"] and "ensemble" not in report["arms"]["plain"]["per_seed"]
    top1 = next(p for p in report["pairs"] if p["metric"] == "top1" and p["variant"] == "averaged")
    expected = paired_difference(report["arms"]["plain"]["per_seed"]["averaged"]["top1"],
                                 report["arms"]["late"]["per_seed"]["averaged"]["top1"])
    assert (top1["a"], top1["b"]) == ("plain", "late") and top1["mean"] == pytest.approx(expected["mean"])
    assert json.loads((folder / "report.json").read_text()) == json.loads(json.dumps(report))
    assert "| late − plain | averaged | top1 |" in (folder / "report.md").read_text()
    # the digits' evaluation split is their test set (compare holds nothing out): the report says so
    assert report["evaluated_on"] == "test split, last epoch" and "last epoch on the test split" in \
        (folder / "report.md").read_text()
    assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG"
    # rerunning the same command trains nothing again
    monkeypatch.setattr(compare_module, "run", lambda *a, **k: pytest.fail("retrained a finished arm"))
    again = run_comparison(plan_comparison(base, arms, [0, 1], folder))
    assert again == report
    fewer = run_comparison(plan_comparison(base, arms, [1], folder))  # a subset of the seeds: nothing trained
    assert fewer["arms"]["late"]["per_seed"]["averaged"]["top1"] == report["arms"]["late"]["per_seed"]["averaged"]["top1"][1:]
    with pytest.raises(LatePhaseError, match="other settings"):
        plan_comparison(FinetuneConfig(**{**BASE, "lr": 0.01}), arms, [0, 1], folder)


def test_compare_refuses_bad_arms_and_foreign_folders(tmp_path):
    base = FinetuneConfig(**BASE)
    with pytest.raises(LatePhaseError, match="at least two"):
        plan_comparison(base, [parse_arm("plain")], [0], tmp_path / "c")
    with pytest.raises(LatePhaseError, match="not SETTING=VALUE"):
        parse_arm("late: K10")
    with pytest.raises(LatePhaseError, match="same for every arm"):
        parse_arm("late: seed=3")
    with pytest.raises(LatePhaseError, match="K"):
        plan_comparison(base, [parse_arm("plain"), parse_arm("late: K=0")], [0], tmp_path / "c")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(LatePhaseError, match="not an lpconvert comparison"):
        plan_comparison(base, [parse_arm("plain"), parse_arm("late")], [0], tmp_path / "mine")
    assert not (tmp_path / "c").exists() and [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_paired_difference_matches_a_hand_computation():
    d = paired_difference([1.0, 2.0, 3.0], [1.5, 2.0, 4.0])  # differences 0.5, 0, 1: mean 0.5, std 0.5
    assert d["mean"] == pytest.approx(0.5) and d["std"] == pytest.approx(0.5)
    half = 4.302652729911275 * 0.5 / 3 ** 0.5  # t_{0.975, 2}
    assert (d["low"], d["high"]) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    assert d["p"] == pytest.approx(0.2254, abs=1e-4)


def test_seeds_to_resolve_and_the_verdict_lines_from_known_numbers():
    from lpconvert.compare.report import verdict_lines
    from lpconvert.compare.stats import seeds_to_resolve

    # spread 0.2 of the paired differences: n seeds resolve 0.1 points once t_{0.975, n−1} · 0.2/√n ≤ 0.1
    assert seeds_to_resolve(0.2, 0.1) == 18  # t_{0.975,17} = 2.110: 2.110 · 0.2/√18 = 0.0995; n = 17 gives 0.1028
    assert seeds_to_resolve(0.0, 0.1) is None and seeds_to_resolve(0.2, 0.0) is None
    start = {"per_seed": {"top1": [91.73] * 3}, "summary": {"top1": {"mean": 91.73}}}
    late = {"versus_start": {"averaged": {"top1": {"mean": 0.06, "low": -0.11, "high": 0.22, "verdict":
                                                   "no difference shown"}}}}
    pair = {"a": "plain", "b": "late", "variant": "averaged", "metric": "top1", "mean": 0.0567, "low": -0.1087,
            "high": 0.2221, "verdict": "no difference shown", "seeds_to_resolve": 12}
    lines = verdict_lines({"seeds": [0, 1, 2], "start": start, "arms": {"late": late}, "pairs": [pair],
                           "evaluated_on": "test split, last epoch"})
    assert lines == ["Your checkpoint (the start): top-1 91.73 on the test split.",
                     "late, averaged: +0.06 [-0.11, +0.22] points against the start over 3 seeds.",
                     "No arm beat your checkpoint by more than the seed noise.",
                     "late − plain (averaged): +0.06 [-0.11, +0.22] points: no difference shown; about 12 seeds would "
                     "resolve 0.1 points."]


def test_compare_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from lpconvert.cli import main

    common = ["digits_cnn", "--no-pretrained", "--data", DIGITS, "--batch-size", "40", "--workers", "0", "--quiet",
              "--lr", "0.05", "--epochs", "1", "--late-phase", "batchnorm,classifier"]
    bad = CliRunner().invoke(main, ["compare", *common, "--arm", "plain", "--arm", "late: K=3", "--seeds", "0,x",
                                    "--output", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "--seeds takes comma-separated integers" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
    result = CliRunner().invoke(main, ["compare", *common, "--arm", "plain", "--arm", "late: K=3", "--seeds", "0",
                                       "--output", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "| late − plain | averaged | top1 |" in result.output
    assert {p.name for p in (tmp_path / "c" / "seed0").iterdir()} == {"plain", "late"}  # T0 = 0: no trunk
    # one seed has no spread and no interval: null in strict JSON (never NaN), said so in the Markdown
    report = json.loads((tmp_path / "c" / "report.json").read_text(),
                        parse_constant=lambda name: pytest.fail(f"{name} in report.json"))
    top1 = next(p for p in report["pairs"] if p["metric"] == "top1" and p["variant"] == "averaged")
    assert (top1["low"], top1["high"], top1["p"], top1["verdict"]) == (None, None, None, "needs 2 or more seeds")
    assert report["arms"]["plain"]["summary"]["averaged"]["top1"]["std"] is None
    assert "Seed 0 (paired" in result.output and "| — | — | needs 2 or more seeds |" in result.output


def test_each_seed_may_start_from_its_own_checkpoint():
    base = FinetuneConfig(**{**BASE, "model": "local-dir:runs/seed{seed}/plain/model", "t0": 0})
    configs = [compare_module.arm_config(base, parse_arm("late: sigma0=0.25"), seed=s, output=compare_module.Path("o"))
               for s in (0, 3)]
    assert [c.model for c in configs] == ["local-dir:runs/seed0/plain/model", "local-dir:runs/seed3/plain/model"]
    assert [c.seed for c in configs] == [0, 3] and configs[0].sigma0 == 0.25 and configs[0].select == "last"


def test_selection_split_chooses_on_one_part_and_reports_on_the_other_against_the_start(tmp_path):
    """--selection-split 0.5 of the 597 test digits: soups and α chosen on 298, everything reported on 299, the start
    evaluated like every arm and leading the report."""
    base = FinetuneConfig(**{**BASE, "t0": 0, "epochs": 1})
    arms = [parse_arm("plain"), parse_arm("late: K=3 sigma0=0.3")]
    folder = tmp_path / "cmp"
    report = run_comparison(plan_comparison(base, arms, [0, 1], folder, selection_split=0.5))
    evaluations = json.loads((folder / "evaluations.json").read_text())
    for seed in (0, 1):
        late, plain = evaluations[f"seed{seed}/late"], evaluations[f"seed{seed}/plain"]
        assert late["selection"] == {"fraction": 0.5, "selection_images": 298, "report_images": 299, "seed": 0}
        assert late["averaged"]["count"] == 299 and evaluations[f"seed{seed}/start"]["averaged"]["count"] == 299
        # the greedy soup of the 3 members and α: chosen on the selection part, never below what they started from
        soup = late["soup_record"]
        assert 1 <= len(soup["members"]) <= 3 and soup["score"] >= max(score for _, score in soup["ranking"])
        for record in (late["interpolation_record"], plain["interpolation_record"]):
            scores = dict(record["scores"])
            assert record["alpha"] in scores and scores[record["alpha"]] == max(scores.values())
            assert scores[record["alpha"]] >= scores[0.0]  # α = 0 is the start
        assert "soup" not in plain and "ensemble" not in plain and "interpolated" in plain
        # calibration compared fairly: one temperature fitted on the selection part, reported on the other
        for variant in ("averaged", "ensemble", "soup"):
            metrics = late[variant]
            assert metrics["temperature"] > 0 and {"nll_ts", "ece_ts", "brier_ts", "brier"} <= set(metrics)
    # every arm against the start, paired per seed
    start = [evaluations[f"seed{s}/start"]["averaged"]["top1"] for s in (0, 1)]
    plain = report["arms"]["plain"]["per_seed"]["averaged"]["top1"]
    versus = report["arms"]["plain"]["versus_start"]["averaged"]["top1"]
    assert versus["mean"] == pytest.approx(paired_difference(start, plain)["mean"])
    assert report["start"]["per_seed"]["top1"] == start
    assert report["arms"]["late"]["choices"]["alpha"] == [evaluations[f"seed{s}/late"]["interpolation_record"]["alpha"]
                                                          for s in (0, 1)]
    markdown = (folder / "report.md").read_text()
    assert markdown.splitlines()[2].startswith("- Your checkpoint (the start): top-1 ")
    assert "report part (299 images)" in report["evaluated_on"] and "## greedy soup of the members" in markdown
    assert report["verdict"][-1].startswith("late − plain (averaged): ")
    assert any(p["metric"] == "nll_ts" and p["variant"] == "averaged" for p in report["pairs"])
    # display settings may change when continuing; a real difference is named
    again = run_comparison(plan_comparison(FinetuneConfig(**{**BASE, "t0": 0, "epochs": 1, "quiet": False,
                                                             "log_every": 7}), arms, [0, 1], folder,
                                           selection_split=0.5))
    assert {k: v for k, v in again.items() if k != "base"} == {k: v for k, v in report.items() if k != "base"}
    with pytest.raises(LatePhaseError, match=r"other settings \(--lr, --selection-split\)"):
        plan_comparison(FinetuneConfig(**{**BASE, "t0": 0, "epochs": 1, "lr": 0.01}), arms, [0, 1], folder,
                        selection_split=0.25)


def test_compare_survives_interruption_and_tampering(tmp_path, monkeypatch):
    base = FinetuneConfig(**BASE)
    arms = [parse_arm("plain"), parse_arm("late: K=3 sigma0=0.1")]
    folder = tmp_path / "cmp"
    # a stop while the shared trunk trains stops the comparison (no arm trains), and says how to continue
    monkeypatch.setattr(compare_module, "run", lambda config, **kw: run(config, stop_after=2, **kw))
    with pytest.raises(compare_module.RunInterrupted) as stop:
        run_comparison(plan_comparison(base, arms, [0], folder))
    assert stop.value.how == "the same `lpconvert compare` command" and "arm plain" in str(stop.value)
    assert {p.name for p in (folder / "seed0").iterdir()} == {"trunk"}
    monkeypatch.undo()
    # killed before the trunk's first checkpoint: it starts again
    import shutil

    shutil.rmtree(folder / "seed0" / "trunk" / "checkpoints")
    report = run_comparison(plan_comparison(base, arms, [0], folder))
    top1 = report["arms"]["late"]["per_seed"]["averaged"]["top1"]
    # evaluations are derived from the runs: a corrupted file is evaluated again, to the same numbers
    (folder / "evaluations.json").write_text("{not json")
    assert run_comparison(plan_comparison(base, arms, [0], folder))["arms"]["late"]["per_seed"]["averaged"]["top1"] == top1
    # an arm folder deleted after it finished is trained again, not reported from memory
    shutil.rmtree(folder / "seed0" / "plain")
    run_comparison(plan_comparison(base, arms, [0], folder))
    assert (folder / "seed0" / "plain" / "report.json").is_file()
    # an arm folder trained with other settings is refused, naming them
    config = json.loads((folder / "seed0" / "late" / "config.json").read_text())
    (folder / "seed0" / "late" / "config.json").write_text(json.dumps({**config, "sigma0": 0.3}))
    (folder / "evaluations.json").unlink()
    with pytest.raises(LatePhaseError, match=r"trained with other settings than arm late \(--sigma0\)"):
        run_comparison(plan_comparison(base, arms, [0], folder))
    with pytest.raises(LatePhaseError, match="lpconvert's temporary folders"):
        plan_comparison(base, [parse_arm("plain"), parse_arm("late.branching: K=3")], [0], tmp_path / "other")


def test_twin_arms_are_refused_and_each_run_is_announced(tmp_path, caplog):
    base = FinetuneConfig(**{**BASE, "t0": 0, "epochs": 1})
    with pytest.raises(LatePhaseError, match="arms plain and one have the same settings"):
        plan_comparison(base, [parse_arm("plain"), parse_arm("one: K=1")], [0], tmp_path / "twins")
    with caplog.at_level("INFO", logger="lpconvert"):
        run_comparison(plan_comparison(base, [parse_arm("plain"), parse_arm("late: K=3")], [0, 1], tmp_path / "c"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compare: ")]
    assert lines[0] == "compare: seed 0 (1/2), arm plain (1/2): 4 runs to go"
    assert lines[3].startswith("compare: seed 1 (2/2), arm late (2/2): 1 run to go, about ") and lines[3].endswith(" min left")
    assert not (tmp_path / "twins").exists()
