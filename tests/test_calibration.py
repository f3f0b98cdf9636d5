"""Temperature scaling, fairly: the fitted temperature minimises held-out NLL (it cools an over-confident model and
keeps its top-1), the split is stratified and the same for every model, the Brier score is the hand computation, and
fitting on training images is refused unless asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from evaluation_sets import cifar_tree, invoke, predict, tree_images

from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.calibration import (
    _nll_at,
    apply_temperature,
    calibrate,
    calibration_split,
    fit_temperature,
)
from lpconvert.evaluate.command import evaluate
from lpconvert.evaluate.metrics import ClassificationMeter, brier, nll


@pytest.fixture(scope="module")
def cifar_logits(cifar10_test_dir, pretrained_cifar_resnet, tmp_path_factory):
    """The shared ResNet-20's log-probabilities on 20 CIFAR-10 test images per class (200), and the labels."""
    tree = cifar_tree(cifar10_test_dir, tmp_path_factory.mktemp("calibration") / "test", 20)
    images, labels = tree_images(tree)
    return predict(pretrained_cifar_resnet(20), images, log=True).double(), torch.from_numpy(labels)


def test_temperature_cools_an_overconfident_model_and_keeps_its_top1(cifar_logits):
    """Logits × 4: the temperature fitted on one half lowers the other half's NLL, the arg-max of every example stays,
    the fit is the NLL's minimum, and T scales with the logits (T(4z) = 4 T(z))."""
    log_probs, labels = cifar_logits
    hot = torch.log_softmax(4 * log_probs, 1)  # the same ranking, 4x sharper: over-confident
    fit, rest = calibration_split(labels, 0.5)
    result = calibrate(hot[fit], labels[fit], hot[rest], labels[rest])
    assert result["nll_ts"] < 0.7 * result["nll"] and result["ece_ts"] < result["ece"]
    assert result["brier_ts"] < result["brier"]
    assert (apply_temperature(hot, result["temperature"]).argmax(1) == hot.argmax(1)).all()
    assert result["top1"] == pytest.approx(100 * (hot[rest].argmax(1) == labels[rest]).double().mean().item())
    base = fit_temperature(log_probs[fit], labels[fit])
    assert 1.0 < base < result["temperature"] == pytest.approx(4 * base, rel=1e-5)
    z, y = hot[fit].numpy(), labels[fit].numpy()
    best = _nll_at(z, y, result["temperature"])
    assert best < _nll_at(z, y, 1.0) and best <= min(_nll_at(z, y, result["temperature"] * f) for f in (0.97, 1.03))
    assert nll(apply_temperature(hot[fit], result["temperature"]), labels[fit]) == pytest.approx(best, rel=1e-6)


def test_the_split_is_stratified_fixed_and_disjoint():
    labels = [i % 4 for i in range(40)] + [0] * 10  # class 0: 20 images, the others 10
    fit, rest = calibration_split(labels, 0.5)
    assert sorted(fit + rest) == list(range(50)) and not set(fit) & set(rest)
    assert [sum(labels[i] == c for i in fit) for c in range(4)] == [10, 5, 5, 5]
    assert calibration_split(labels, 0.5) == (fit, rest)
    with pytest.raises(LatePhaseError, match="leaves images on both sides"):
        calibration_split(labels, 0.001)


def test_brier_is_the_hand_computation_and_the_meter_agrees():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    by_hand = ((0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2) + (0.1 ** 2 + 0.7 ** 2 + 0.6 ** 2) + (2 / 9 + 4 / 9)) / 3
    assert brier(probs, labels) == pytest.approx(by_hand, rel=1e-9)
    meter = ClassificationMeter()
    meter.update(probs[:2], labels[:2])
    meter.update(probs[2:], labels[2:])
    assert meter.compute()["brier"] == pytest.approx(by_hand, rel=1e-6)


@pytest.fixture(scope="module")
def tiny_root(cifar10_test_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration-root")
    cifar_tree(cifar10_test_dir, root / "test", 6)
    cifar_tree(cifar10_test_dir, root / "train", 3, skip=6)
    return root


def test_evaluate_reports_calibration_on_the_other_half(tiny_root, cifar_resnet_weights, pretrained_cifar_resnet,
                                                        tmp_path):
    """`--calibration-split 0.5`: 30 of the 60 test images fit T, the other 30 report, and the figures are those of
    the model's own log-probabilities (computed by hand) split the same way; the section is printed."""
    result = invoke("evaluate", "cifar_resnet20", "--weights", cifar_resnet_weights[20], "--data", tiny_root,
                    "--calibration-split", 0.5, "-j", 0, "--device", "cpu", "--json", tmp_path / "rows.json")
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "rows.json").read_text())[0]
    assert row["calibration/fit_count"] == row["calibration/count"] == 30 and row["count"] == 60
    assert "temperature scaling" in result.stdout and "nll (T)" in result.stdout
    images, labels = tree_images(tiny_root / "test")
    log_probs, labels = predict(pretrained_cifar_resnet(20), images, log=True), torch.from_numpy(labels)
    fit, rest = calibration_split(labels, 0.5)
    expected = calibrate(log_probs[fit], labels[fit], log_probs[rest], labels[rest])
    for key, value in expected.items():
        assert row[f"calibration/{key}"] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert row["calibration/temperature"] != pytest.approx(1.0, abs=0.05)


def test_fitting_on_training_images_is_refused_unless_asked(tiny_root, cifar_resnet_weights):
    kwargs = dict(data=str(tiny_root), weights=str(cifar_resnet_weights[20]), workers=0, device="cpu")
    for path in ("train", str(tiny_root / "train")):
        with pytest.raises(LatePhaseError, match="is the training split.*--calibration-on-train"):
            evaluate("cifar_resnet20", calibration_data=path, **kwargs)
    with pytest.raises(LatePhaseError, match="is the evaluation split itself"):
        evaluate("cifar_resnet20", calibration_data=str(tiny_root / "test"), **kwargs)
    row = evaluate("cifar_resnet20", calibration_data="train", calibration_on_train=True, **kwargs)[0]
    assert row["calibration/fit_count"] == 30 and row["calibration/count"] == 60
    # the pretrained model saw these training images: they look easier than the test images, so T comes out lower
    test_half = evaluate("cifar_resnet20", calibration_split=0.5, **kwargs)[0]
    assert row["calibration/temperature"] < test_half["calibration/temperature"]
    assert np.isfinite(row["calibration/nll_ts"])
