"""The README's first command: the offline demo runs the whole pipeline on the scikit-learn digits."""

import json

import safetensors.torch
import timm

from lpconvert.demo import run_demo


def test_demo_pretrains_fine_tunes_both_arms_and_saves(tmp_path):
    table = run_demo(tmp_path / "demo", K=3, seeds=2)
    pretrained = json.loads((tmp_path / "demo" / "pretrained" / "report.json").read_text())
    late = json.loads((tmp_path / "demo" / "late-phase-seed0" / "report.json").read_text())
    plain = json.loads((tmp_path / "demo" / "plain-seed0" / "report.json").read_text())
    # both arms start from the T0 checkpoint, validated on the same held-out training digits whatever the seed
    start = pretrained["final_top1"]
    assert late["start_top1"] == plain["start_top1"] == start
    assert json.loads((tmp_path / "demo" / "late-phase-seed1" / "report.json").read_text())["start_top1"] == start
    assert {r["validation"] for r in (pretrained, late, plain)} == {"held-out"}  # selection never on the test digits
    assert 80.0 < pretrained["test_top1"] < 100.0 and late["test_top1"] > 90.0 and plain["test_top1"] > 90.0
    assert late["K"] == 3 and plain["K"] == 1
    reports = {arm: [json.loads((tmp_path / "demo" / f"{arm}-seed{seed}" / "report.json").read_text())["test_top1"]
                     for seed in (0, 1)] for arm in ("plain", "late-phase")}
    means = (pretrained["test_top1"], sum(reports["plain"]) / 2, sum(reports["late-phase"]) / 2)
    for line, value in zip(table.splitlines()[3:], means):
        assert f"{value:7.2f}" in line
    state = safetensors.torch.load_file(str(tmp_path / "demo" / "late-phase-seed0" / "model" / "model.safetensors"))
    timm.create_model("digits_cnn").load_state_dict(state, strict=True)
