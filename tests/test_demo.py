"""The README's first command: the offline demo runs the whole pipeline on the scikit-learn digits."""

import json

import safetensors.torch
import timm

from lpconvert.demo import run_demo


def test_demo_pretrains_fine_tunes_both_arms_and_saves(tmp_path):
    table = run_demo(tmp_path / "demo", K=3, seeds=1)
    start = json.loads((tmp_path / "demo" / "pretrained" / "report.json").read_text())["final_top1"]
    late = json.loads((tmp_path / "demo" / "late-phase-seed0" / "report.json").read_text())
    plain = json.loads((tmp_path / "demo" / "plain-seed0" / "report.json").read_text())
    assert late["start_top1"] == plain["start_top1"] == start  # both arms start from the T0 checkpoint
    assert 80.0 < start < 100.0 and late["final_top1"] > 90.0 and plain["final_top1"] > 90.0
    assert late["K"] == 3 and plain["K"] == 1
    for line, value in zip(table.splitlines()[3:], (start, plain["final_top1"], late["final_top1"])):
        assert f"{value:7.2f}" in line
    state = safetensors.torch.load_file(str(tmp_path / "demo" / "late-phase-seed0" / "model" / "model.safetensors"))
    timm.create_model("digits_cnn").load_state_dict(state, strict=True)
