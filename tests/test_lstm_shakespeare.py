"""Smoke test of scripts/lstm_shakespeare.py: its --tiny mode end to end on the first 4,000 characters of the shared
tiny-shakespeare text (a 16-unit LSTM, 10 epochs of 3 minibatches, T0 = epoch 6, K = 3)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from script_module import load_script
from torch import nn

import lpconvert


@pytest.fixture(scope="module")
def script():
    return load_script("lstm_shakespeare")


def _main(script, argv):
    threads = torch.get_num_threads()
    try:
        return script.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_tiny_experiment_end_to_end(script, shared_dir, tmp_path):
    data = shared_dir / "data/tinyshakespeare/input.txt"
    out, models = tmp_path / "report", tmp_path / "models"
    report = _main(script, ["--tiny", "--data", str(data), "--out", str(out), "--save-models", str(models)])

    # the report files, every arm with its final and SWA evaluation, the late-phase arm also as an ensemble
    assert out.with_suffix(".md").is_file() and json.loads(out.with_suffix(".json").read_text()) == report
    vocab = report["data"]["vocab"]
    assert report["data"]["chars"] == 4000 and report["data"]["test_chars"] == 400
    evaluated = {(r["arm"], r["eval"].split(" (")[0]) for r in report["rows"]}
    assert evaluated == {(arm, e) for arm in script.ARMS for e in ("final", "SWA")} | {
        (script.LATE, "ensemble of 3 members"), (script.LATE, "members alone")}
    (label,) = report["configs"]
    curves = report["curves"][label]
    for row in report["rows"]:
        assert row["seed"] == 0 and row["epochs"] == 10
        for key in ("train_bpc", "test_bpc"):
            assert math.isfinite(row[key]) and 0 < row[key] < math.log2(vocab), row
        start = curves[row["arm"]][0]
        assert start["epoch"] == 0 and row["train_bpc"] < start["train_bpc"] - 0.3  # it learned something
    md = out.with_suffix(".md").read_text()
    for arm in script.ARMS:
        assert f"| {arm} | final |" in md and f"| {arm} | SWA (2 epochs) |" in md

    # the arms share epochs 0..T0 where they should: K = 1 before T0, K = 3 after it in the late-phase arm only
    for arm in script.ARMS:
        assert [p["K"] for p in curves[arm]] == [1] * 7 + [3 if arm == script.LATE else 1] * 4
    # branching the late-phase arm off the base + rank-1 run at T0 is exact: trained alone, it gives the same numbers
    alone = _main(script, ["--tiny", "--data", str(data), "--out", str(tmp_path / "alone"), "--arms", script.LATE])
    late_rows = [r for r in report["rows"] if r["arm"] == script.LATE]
    assert [r["eval"] for r in alone["rows"]] == [r["eval"] for r in late_rows]
    for mine, theirs in zip(alone["rows"], late_rows):
        assert mine["test_bpc"] == pytest.approx(theirs["test_bpc"], abs=1e-5)
        assert mine["train_bpc"] == pytest.approx(theirs["train_bpc"], abs=1e-5)
    assert [p["test_bpc"] for p in curves[script.LATE][:7]] == pytest.approx(
        [p["test_bpc"] for p in curves["base + rank-1"][:7]], abs=1e-6)

    # the collapsed models are plain CharLSTMs (strict load into a fresh one) with the reported test BPC
    cfg = report["configs"][label]
    fresh = lambda: script.CharLSTM(vocab, cfg["embed"], cfg["hidden"])  # noqa: E731
    text, _ = script.load_text(str(data), 4000)
    _, test = script.split(script.encode(text)[0], 0.1)
    chunks = script.test_chunks(test, cfg["seq_len"])
    for arm in script.ARMS:
        stem = arm.replace(" + ", "+").replace(" ", "-")
        for kind, ev in (("final", "final"), ("swa", "SWA")):
            model = fresh()
            model.load_state_dict(torch.load(models / f"{stem}-s0-{kind}.pt", weights_only=True), strict=True)
            assert type(model.lstm) is nn.LSTM
            row = next(r for r in report["rows"] if r["arm"] == arm and r["eval"].startswith(ev))
            assert script.bpc(model, chunks) == pytest.approx(row["test_bpc"], abs=1e-4)

    # the late-phase model: K = 3 distinct members whose Eq.-1 average is the final collapsed model, and whose
    # non-averaged ensemble is lpconvert.ensemble_predict's
    members = torch.load(models / "late-phase-rank-1-s0-members.pt", weights_only=True)
    u = members["lstm.rank1_u_weight_hh_l0"]
    assert u.shape == (3, 4 * cfg["hidden"]) and (u[0] - u[1]).abs().max() > 1e-3
    lp = lpconvert.convert(fresh(), K=3, targets="rank1", include="lstm")
    lp.load_state_dict(members, strict=True)
    final = torch.load(models / "late-phase-rank-1-s0-final.pt", weights_only=True)
    for key, value in lpconvert.collapse(lp).state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=1e-5, atol=1e-6)
    rows = chunks[0]
    probs = lpconvert.ensemble_predict(lp, rows[:, :-1])
    nll = -probs.double().gather(1, rows[:, 1:].reshape(-1, 1)).log().sum().item()
    ens_full, _ = script.member_bpc(lp, [rows])
    assert nll / rows[:, 1:].numel() / math.log(2) == pytest.approx(ens_full, abs=1e-4)
    late = next(r for r in report["rows"] if r["arm"] == script.LATE and r["eval"] == "final")
    assert late["K_after_t0"] == 3 and late["uv_at_t0"]["std"] > 0

    # --append keeps the finished runs and trains nothing new
    again = _main(script, ["--tiny", "--data", str(data), "--out", str(out), "--append"])
    assert again["rows"] == report["rows"] and len(again["invocations"]) == 2


def test_report_statistics_are_lpconvert_stats(script):
    """mean ± std over seeds and the paired differences of the report come from lpconvert.compare.stats (summary,
    paired_difference); rendering the committed results JSON reproduces the committed report byte for byte."""
    from pathlib import Path

    from lpconvert.compare.stats import paired_difference, summary

    assert not hasattr(script, "mean_std")  # no own copy of the statistics
    assert script.show(summary([2.0, 2.5, 3.0])) == "2.500 ± 0.500"
    assert script.show(summary([2.25])) == "2.250" and script.show(None) == "–"
    assert script.show(paired_difference([2.0, 2.2], [2.1, 2.4]), signed=True) == "+0.150 ± 0.071"
    results = Path(__file__).resolve().parents[1] / "zoo" / "results" / "lstm_shakespeare"
    report = json.loads(results.with_suffix(".json").read_text())
    markdown = results.with_suffix(".md").read_text()
    keep = markdown.split(script.ANALYSIS_MARKER, 1)[1].lstrip("\n")
    assert script.render(report, keep) == markdown
