"""Issue #31: weight-space selection that returns the original architecture — greedy soups of the late-phase members
(lpconvert.greedy_soup) and interpolation with the starting model (lpconvert.interpolate / choose_alpha), in the
library, at the end of `lpconvert finetune` and in `lpconvert collapse --soup greedy --interpolate auto`."""

import copy
import json
import math

import pytest
import safetensors.torch
import timm
import torch
from click.testing import CliRunner

import lpconvert
from lpconvert.collapse.soup import (
    ALPHA_GRID,
    choose_alpha,
    collapse_members,
    greedy_soup,
    interpolate,
    keep_members,
)
from lpconvert.config import FinetuneConfig
from lpconvert.data import digits_datasets
from lpconvert.errors import LatePhaseError
from lpconvert.publish.loading import ModelSource
from lpconvert.publish.model_card import render_model_card
from lpconvert.train.finetune import DIGITS, run

BN_FOLD_TEXT = "running statistics are the members' mean statistics"


# --------------------------------------------------------------------------------------------------------------------
# a tiny trained model and a late-phase model with deliberately different members
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    """900 training digits, 300 more held out (the selection set), as tensors."""
    x, y = digits_datasets()[0].tensors
    return (x[:900], y[:900]), (x[900:], y[900:])


@pytest.fixture(scope="module")
def trained(digits):
    """digits_cnn trained for 2 epochs: the starting model (T0)."""
    (x, y), _ = digits
    torch.manual_seed(0)
    model = timm.create_model("digits_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for i in range(0, len(x), 50):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
            optimizer.step()
    return model.eval()


def top1(model, data):
    x, y = data
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).double().mean().item()


def late_model(trained, digits, kinds=("batchnorm", "classifier"), sigma0=0.5, sabotage=True):
    """K = 4 members of `kinds` (Eq. 2 with a large σ0), each with BatchNorm statistics of its own; member 3's
    classifier reversed (-3 W), so that averaging it in hurts."""
    (x, _), _ = digits
    late = lpconvert.convert(copy.deepcopy(trained), K=4, targets=kinds, sigma0=sigma0, seed=0)
    late.train()
    with torch.no_grad():
        for k in range(4):
            lpconvert.select_members(late, k)
            late(x[100 * k:100 * k + 100] * (1 + 0.2 * k))
        if sabotage:
            late.fc.weight[3].mul_(-3.0)
    lpconvert.select_members(late, 0)
    return late.eval()


def same_tensors(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def same_outputs(a, b, x):
    """Equal outputs in eval mode and in train mode (batch statistics), on copies."""
    with torch.no_grad():
        return all(torch.equal(copy.deepcopy(a).train(mode)(x), copy.deepcopy(b).train(mode)(x))
                   for mode in (False, True))


# --------------------------------------------------------------------------------------------------------------------
# greedy soup
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bn_stats", ["fold", "recalibrate"])
def test_greedy_soup_never_scores_below_its_best_member_and_leaves_a_harmful_one_out(trained, digits, bn_stats):
    (x, _), held = digits
    late = late_model(trained, digits)
    before = copy.deepcopy(late.state_dict())
    data = [x[i:i + 100] for i in range(0, 900, 100)] if bn_stats == "recalibrate" else None
    soup, record = greedy_soup(late, lambda m: top1(m, held), bn_stats=bn_stats, data=data)

    ranking = record["ranking"]
    scores = [score for _, score in ranking]
    assert sorted(k for k, _ in ranking) == [0, 1, 2, 3] and scores == sorted(scores, reverse=True)
    assert scores[0] - scores[-1] > 20  # the members really differ: member 3 is far worse
    if bn_stats == "fold":  # a member scored alone is unload(k) bit for bit
        assert all(score == top1(lpconvert.unload(late, k), held) for k, score in ranking)
    assert record["members"][0] == ranking[0][0]
    assert 3 not in record["members"]
    assert top1(soup, held) == record["score"] >= max(scores)
    assert record["uniform_score"] == top1(lpconvert.collapse(late, bn_stats=bn_stats, data=data), held)
    assert record["uniform_score"] < record["score"]
    # the soup is Eq. 1 over the kept members, the original architecture; the late-phase model is untouched
    assert same_tensors(soup, collapse_members(late, record["members"], bn_stats, data))
    assert type(soup) is type(trained) and soup.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, late.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kinds", [("batchnorm", "classifier"), ("rank1",)])
@pytest.mark.parametrize("bn_stats", ["fold", "mean"])
def test_a_soup_of_every_member_is_collapse_and_of_one_member_unload_bit_for_bit(trained, digits, kinds, bn_stats):
    late = late_model(trained, digits, kinds, sabotage=False)
    soup, record = greedy_soup(late, lambda m: 1.0, bn_stats=bn_stats)  # no member lowers a constant score
    assert record["members"] == [0, 1, 2, 3] and record["score"] == record["uniform_score"] == 1.0
    collapsed = lpconvert.collapse(late, bn_stats=bn_stats)
    assert same_tensors(soup, collapsed) and not same_tensors(collapsed, lpconvert.unload(late, 0))
    assert same_tensors(collapse_members(late, [2, 0, 3, 1], bn_stats), collapsed)  # the order does not matter
    for k in range(4):
        assert same_tensors(collapse_members(late, [k], bn_stats), lpconvert.unload(late, k))
    reduced = keep_members(late, [3, 1])
    assert lpconvert.num_members(reduced) == 2 and lpconvert.num_members(late) == 4
    assert same_tensors(lpconvert.unload(reduced, 0), lpconvert.unload(late, 3))


def test_soup_errors_are_one_line(trained, digits):
    late = late_model(trained, digits)
    problems = [
        (lambda: greedy_soup(trained, lambda m: 1.0), "never converted"),
        (lambda: greedy_soup(late, lambda m: math.nan), "finite number"),
        (lambda: greedy_soup(late, lambda m: 1.0, bn_stats="recalibrate"), "needs data"),
        (lambda: greedy_soup(late, lambda m: 1.0, bn_stats="recalibrate", data=iter([digits[0][0]])), "one-pass"),
        (lambda: collapse_members(late, [0, 0]), "distinct"),
        (lambda: collapse_members(late, [4]), "[0, 3]"),
    ]
    for call, fragment in problems:
        with pytest.raises(LatePhaseError) as err:
            call()
        assert fragment in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------------------------
# interpolation with the start
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def start_and_finetuned(trained, digits):
    """The start and a "fine-tuned" model that differs from it in every tensor, num_batches_tracked included."""
    start = copy.deepcopy(trained)
    finetuned = lpconvert.collapse(late_model(trained, digits, sabotage=False))
    with torch.no_grad():
        for name, p in finetuned.named_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    for m in start.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.num_batches_tracked.fill_(7)
    return start, finetuned


def test_interpolation_end_points_are_the_two_models_bit_for_bit(start_and_finetuned, digits):
    start, finetuned = start_and_finetuned
    (x, _), _ = digits
    batches = [x[i:i + 100] for i in range(0, 900, 100)]
    for data in (None, batches):  # recalibration never touches the end points
        at0, at1 = interpolate(start, finetuned, 0, data=data), interpolate(start, finetuned, 1.0, data=data)
        assert same_tensors(at0, start) and same_tensors(at1, finetuned)
        assert same_outputs(at0, start, x[:64]) and same_outputs(at1, finetuned, x[:64])
        assert type(at0) is type(at1) is type(finetuned)
    a, b = start.state_dict(), finetuned.state_dict()
    assert all(not torch.equal(a[k], b[k]) for k in a)
    middle = interpolate(start, finetuned, 0.25).state_dict()
    for key, value in middle.items():
        expected = torch.lerp(a[key], b[key], 0.25) if value.is_floating_point() else b[key]
        assert torch.equal(value, expected), key
    weight = "features.0.1.weight"
    assert torch.allclose(middle[weight], 0.75 * a[weight] + 0.25 * b[weight], rtol=0, atol=1e-6)
    # with data, BatchNorm statistics are re-estimated: the weights are the same, the statistics are not
    recalibrated = interpolate(start, finetuned, 0.25, data=batches).state_dict()
    assert torch.equal(recalibrated["fc.weight"], middle["fc.weight"])
    assert not torch.allclose(recalibrated["features.0.1.running_var"], middle["features.0.1.running_var"])


def test_choose_alpha_never_below_the_start_on_its_set_and_ties_go_to_the_smaller_alpha(start_and_finetuned, digits):
    start, finetuned = start_and_finetuned
    _, held = digits
    model, record = choose_alpha(start, finetuned, lambda m: 1.0)
    assert record["alpha"] == 0.0 and [a for a, _ in record["scores"]] == list(ALPHA_GRID)
    assert same_tensors(model, start)
    target = interpolate(start, finetuned, 0.3).fc.weight[0, 0].item()
    model, record = choose_alpha(start, finetuned, lambda m: -abs(m.fc.weight[0, 0].item() - target))
    assert record["alpha"] == 0.3 and same_tensors(model, interpolate(start, finetuned, 0.3))
    model, record = choose_alpha(start, finetuned, lambda m: top1(m, held), grid=(1.0, 0.5, 0.0))
    scores = dict(record["scores"])
    assert list(scores) == [0.0, 0.5, 1.0] and scores[0.0] == top1(start, held) and scores[1.0] == top1(finetuned, held)
    assert top1(model, held) == scores[record["alpha"]] == max(scores.values()) >= scores[0.0]


def test_interpolation_errors_are_one_line(start_and_finetuned, trained, digits):
    start, finetuned = start_and_finetuned
    problems = [
        (lambda: interpolate(start, late_model(trained, digits), 0.5), "collapse it first"),
        (lambda: interpolate(start, timm.create_model("digits_cnn", num_classes=5), 0.5), "fc.weight has shape"),
        (lambda: interpolate(start, torch.nn.Linear(2, 2), 0.5), "one architecture"),
        (lambda: interpolate(start, finetuned, 1.5), "[0, 1]"),
        (lambda: interpolate(start, finetuned, "auto"), "[0, 1]"),
        (lambda: choose_alpha(start, finetuned, lambda m: 1.0, grid=()), "at least one"),
        (lambda: FinetuneConfig(interpolate="half"), "--interpolate takes auto or a number"),
        (lambda: FinetuneConfig(soup="best"), "--soup"),
    ]
    for call, fragment in problems:
        with pytest.raises(LatePhaseError) as err:
            call()
        assert fragment in str(err.value) and "\n" not in str(err.value)


def test_soups_and_interpolations_save_as_the_original_architecture_that_timm_strict_loads(
        start_and_finetuned, trained, digits, tmp_path):
    start, finetuned = start_and_finetuned
    (x, _), held = digits
    soup, _ = greedy_soup(late_model(trained, digits), lambda m: top1(m, held))
    for name, model in (("soup", soup), ("interpolated", interpolate(start, finetuned, 0.6))):
        folder = lpconvert.save_pretrained(model, tmp_path / name)
        fresh = timm.create_model("digits_cnn", pretrained=False)
        fresh.load_state_dict(safetensors.torch.load_file(str(folder / "model.safetensors")), strict=True)
        assert same_tensors(fresh, model) and same_outputs(fresh, model, x[:64])


# --------------------------------------------------------------------------------------------------------------------
# the model card says what happened
# --------------------------------------------------------------------------------------------------------------------
def _what_it_is(averaging):
    source = ModelSource(spec="digits_cnn", library="timm", origin="timm", architecture="digits_cnn")
    card = render_model_card(source, averaging={"K": 4, "late_phase": "batchnorm", "bn_stats": "fold", "epoch": 2,
                                                "select": "best", **averaging})
    return card.split("## What this checkpoint is\n", 1)[1].split("\n## ", 1)[0], card


def test_the_card_states_the_soup_and_the_interpolation_as_they_happened():
    greedy = {"soup": "greedy", "K": 4, "members": [2, 0], "ranking": [[2, 91.5], [0, 90.0], [1, 88.25], [3, 40.0]],
              "score": 92.5, "uniform_score": 80.0}
    text, _ = _what_it_is({})
    assert "average of K = 4 late-phase members" in text and BN_FOLD_TEXT in text and "soup" not in text
    text, card = _what_it_is({"selection": greedy})
    assert "average of 2 of the K = 4 late-phase members" in text and "members 2, 0" in text
    assert "member 3: 40.00" in text and "92.50 %" in text and "80.00 %" in text and BN_FOLD_TEXT in text
    assert "greedy soup kept" in card and "interpolat" not in card
    auto = {"alpha": 0.3, "chosen": "auto", "scores": [[0.0, 90.0], [0.3, 93.0], [1.0, 92.5]],
            "batchnorm": "interpolated"}
    text, card = _what_it_is({"selection": {**greedy, "interpolation": auto}})
    assert "α = 0.3" in text and "α 0: 90.00" in text and "interpolated likewise" in text
    assert BN_FOLD_TEXT not in text  # no longer the members' average outputs
    text, _ = _what_it_is({"selection": {"soup": "uniform", "K": 4, "interpolation": {**auto, "alpha": 1.0}}})
    assert "α = 1" in text and "averaged model unchanged" in text and BN_FOLD_TEXT in text
    text, _ = _what_it_is({"selection": {"soup": "uniform", "K": 4, "interpolation": {"alpha": 0.0, "chosen": "given",
                                                                                      "batchnorm": None}}})
    assert "starting model, unchanged" in text and "late-phase members" not in text and BN_FOLD_TEXT not in text


# --------------------------------------------------------------------------------------------------------------------
# end to end: `lpconvert finetune` and `lpconvert collapse` on the digits
# --------------------------------------------------------------------------------------------------------------------
def invoke(*args):
    from lpconvert.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A T0 checkpoint (1 epoch on the digits), a late-phase run from it with --soup greedy --interpolate auto (K = 3,
    σ0 = 0.5, 120 training digits held out for validation; BatchNorm statistics of every candidate re-estimated on 3
    training batches) and one without a validation set (--val-split 0)."""
    root = tmp_path_factory.mktemp("soup")
    common = dict(data=DIGITS, batch_size=100, workers=0, quiet=True, schedule="constant", epochs=1, select="last",
                  device="cpu")
    pretrained = run(FinetuneConfig(model="digits_cnn", pretrained=False, K=1, lr=0.05, output=str(root / "t0"),
                                    **common))
    late = dict(model=f"local-dir:{pretrained['model_dir']}", K=3, sigma0=0.5, late_phase=("batchnorm", "classifier"),
                lr=0.02, **common)
    chosen = run(FinetuneConfig(soup="greedy", interpolate="auto", bn_stats="recalibrate", recalibrate_batches=3,
                                output=str(root / "late"), **late))
    no_validation = run(FinetuneConfig(val_split=0, output=str(root / "no-val"), **late))
    return root, chosen, no_validation


def test_finetune_with_a_greedy_soup_and_auto_alpha_records_what_it_chose(runs):
    root, report, _ = runs
    selection = report["selection"]
    assert selection["soup"] == "greedy" and selection["K"] == 3 and len(selection["ranking"]) == 3
    assert selection["members"][0] == selection["ranking"][0][0]
    assert selection["score"] >= max(score for _, score in selection["ranking"])
    alpha, scores = selection["interpolation"]["alpha"], dict(selection["interpolation"]["scores"])
    assert list(scores) == list(ALPHA_GRID) and selection["interpolation"]["chosen"] == "auto"
    # α = 0 is the start rebuilt from the run's source: it scores what the run measured at epoch 0
    assert scores[0.0] == report["start_top1"]
    assert selection["interpolation"]["batchnorm"] == ("re-estimated" if 0 < alpha < 1 else None)
    assert scores[1.0] == selection["score"]  # α = 1 is the soup
    assert report["final_top1"] == scores[alpha] == max(scores.values()) >= report["start_top1"]
    info = json.loads((root / "late" / "model" / "lpconvert.json").read_text())
    assert info["averaging"]["selection"] == selection and info["metrics"]["final"]["top1"] == report["final_top1"]
    assert "optimistic" in info["metrics"]["protocol"]
    card = (root / "late" / "model" / "README.md").read_text()
    assert f"members {', '.join(map(str, selection['members']))}" in card and "greedy soup" in card


def test_collapse_command_greedy_soup_and_auto_alpha_end_to_end(runs, tmp_path, monkeypatch):
    root, report, _ = runs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # float32 on the CPU, as the run chose
    result = invoke("collapse", root / "late", "--checkpoint", "last", "--soup", "greedy", "--interpolate", "auto",
                    "--bn-stats", "recalibrate", "--data", DIGITS, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "greedy soup of members" in result.output
    info = json.loads((tmp_path / "out" / "lpconvert.json").read_text())
    selection = info["averaging"]["selection"]
    # the run's own validation set, the same choice as at the end of the run
    assert selection["members"] == report["selection"]["members"]
    assert selection["interpolation"]["alpha"] == report["selection"]["interpolation"]["alpha"]
    assert [k for k, _ in selection["ranking"]] == [k for k, _ in report["selection"]["ranking"]]
    assert [s for _, s in selection["ranking"]] == pytest.approx([s for _, s in report["selection"]["ranking"]])
    assert info["metrics"]["final"]["top1"] == pytest.approx(report["final_top1"])
    assert info["metrics"]["dataset"]["num_images"] == 120 and "test" not in info["metrics"]
    body = (tmp_path / "out" / "README.md").read_text()
    assert "greedy soup" in body and f"α = {selection['interpolation']['alpha']:g}" in body
    fresh = timm.create_model("digits_cnn", pretrained=False)
    fresh.load_state_dict(safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors")), strict=True)


def test_selection_on_data_is_refused_without_a_validation_set_and_a_fixed_alpha_is_not(runs, tmp_path):
    root, _, no_validation = runs
    assert no_validation["validation"] == "test" and "selection" not in no_validation
    for flags in (["--soup", "greedy"], ["--interpolate", "auto"]):
        result = invoke("collapse", root / "no-val", "--checkpoint", "last", *flags, "--out", tmp_path / "x")
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "validation set" in lines[0] and "--val-split 0" in lines[0], result.output
        assert not (tmp_path / "x").exists()
    with pytest.raises(LatePhaseError, match="no validation split and --val-split is 0"):
        run(FinetuneConfig(model="digits_cnn", pretrained=False, data=DIGITS, K=2, epochs=1, val_split=0,
                           select="last", soup="greedy", workers=0, quiet=True, output=str(tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()
    result = invoke("collapse", root / "no-val", "--checkpoint", "last", "--interpolate", "0.5",
                    "--out", tmp_path / "y")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "y" / "lpconvert.json").read_text())
    assert info["averaging"]["selection"]["interpolation"] == {"alpha": 0.5, "chosen": "given",
                                                               "batchnorm": "interpolated"}
    assert info["metrics"] is None  # nothing measured, nothing claimed
    assert "α = 0.5, which was given" in (tmp_path / "y" / "README.md").read_text()
