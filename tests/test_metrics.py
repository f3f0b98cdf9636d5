import math

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import log_loss, top_k_accuracy_score
from torch import nn
from torchmetrics.functional.classification import multiclass_calibration_error

from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.evaluation import evaluate_model, flatness
from lpconvert.evaluate.metrics import (
    ClassificationMeter,
    auroc,
    ece,
    nll,
    ood_auroc,
    predictive_entropy,
    topk_accuracy,
)

# Four examples, three classes, no ties. True-class probabilities 0.7, 0.3, 0.25, 0.8; the label is ranked 1st, 2nd,
# 3rd and 1st; confidences (max prob) 0.7, 0.6, 0.4, 0.8 with predictions right, wrong, wrong, right.
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.35, 0.4], [0.05, 0.15, 0.8]])
LABELS = torch.tensor([0, 2, 0, 2])
NLL = (0.356675 + 1.203973 + 1.386294 + 0.223144) / 4  # -(ln 0.7 + ln 0.3 + ln 0.25 + ln 0.8) / 4
ECE = (0.3 + 0.6 + 0.4 + 0.2) / 4  # every example alone in its bin: mean |correct - confidence|


def test_topk_accuracy_by_hand():
    assert topk_accuracy(PROBS, LABELS, k=1) == pytest.approx(50.0)
    assert topk_accuracy(PROBS, LABELS, k=2) == pytest.approx(75.0)
    assert topk_accuracy(PROBS, LABELS, k=3) == pytest.approx(100.0)
    assert topk_accuracy(PROBS.log(), LABELS, k=2) == pytest.approx(75.0)  # logits rank the same


def test_topk_is_clamped_to_the_number_of_classes():
    assert topk_accuracy(PROBS, LABELS, k=5) == pytest.approx(100.0)
    meter = ClassificationMeter()
    meter.update(PROBS, LABELS)
    assert meter.compute()["top5"] == pytest.approx(100.0)


def test_nll_by_hand():
    assert nll(PROBS, LABELS) == pytest.approx(NLL, abs=1e-6)


def test_nll_clamps_zero_probabilities():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert nll(probs, torch.tensor([1, 0])) == pytest.approx((-math.log(1e-12) + math.log(2)) / 2)


def test_ece_by_hand():
    assert ece(PROBS, LABELS) == pytest.approx(ECE, abs=1e-6)
    # 0.91 (right) and 0.92 (wrong) share the bin (13/15, 14/15]; 0.55 (right) is alone in (8/15, 9/15].
    probs = torch.tensor([[0.91, 0.09], [0.92, 0.08], [0.55, 0.45]])
    expected = 2 / 3 * abs(0.5 - 0.915) + 1 / 3 * abs(1.0 - 0.55)
    assert ece(probs, torch.tensor([0, 1, 0])) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ece_bins_are_closed_on_the_right(dtype):
    # A confidence of exactly 12/15 = 0.8 belongs to (11/15, 12/15], together with 0.75: one bin, accuracy 1/2.
    # With [lo, hi) bins the two would be apart and the ECE would be (0.2 + 0.75) / 2.
    probs = torch.tensor([[0.8, 0.2], [0.75, 0.25]], dtype=dtype)
    labels = torch.tensor([0, 1])
    assert ece(probs, labels) == pytest.approx(abs(0.5 - 0.775), abs=1e-6)
    meter = ClassificationMeter()
    meter.update(probs, labels)
    assert meter.compute()["ece"] == pytest.approx(abs(0.5 - 0.775), abs=1e-6)


def _ece_loop(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i, p in enumerate(probs) if (lo < p.max() <= hi) or (b == 0 and p.max() == 0)]
        if members:
            accuracy = np.mean([probs[i].argmax() == labels[i] for i in members])
            confidence = np.mean([probs[i].max() for i in members])
            total += len(members) / len(probs) * abs(accuracy - confidence)
    return total


def test_ece_matches_a_loop_on_random_data():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 10, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 10, (500,), generator=gen)
    expected = _ece_loop(probs.numpy(), labels.numpy())
    assert ece(probs, labels) == pytest.approx(expected, abs=1e-12)
    meter = ClassificationMeter()
    for chunk in range(0, 500, 128):
        meter.update(probs[chunk:chunk + 128], labels[chunk:chunk + 128])
    assert meter.compute()["ece"] == pytest.approx(expected, abs=1e-6)


def test_predictive_entropy_by_hand():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert predictive_entropy(probs).tolist() == pytest.approx([0.693147, 0.0, 1.386294], abs=1e-6)


def test_auroc_by_hand_with_a_tie():
    # Pairs (positive, negative) ranked right: 0.9 beats all 4; 0.4 beats 0.1 and 0.35 and ties 0.4 (1/2);
    # 0.65 beats 0.1, 0.4, 0.35. (4 + 2.5 + 3) / 12.
    negatives = torch.tensor([0.1, 0.4, 0.35, 0.8])
    positives = torch.tensor([0.9, 0.4, 0.65])
    assert auroc(negatives, positives) == pytest.approx(9.5 / 12)


def test_auroc_extremes_and_all_ties():
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert auroc(torch.ones(5), torch.ones(3)) == 0.5


def _pairwise_auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """The definition: the share of (positive, negative) pairs ranked right, a tie counting 1/2."""
    neg, pos = negatives[:, None], positives[None, :]
    return ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (neg.size * pos.size)


def test_auroc_with_many_ties_keeps_the_numbers_of_the_rank_formula():
    # 0.5633333333333334 and 0.646024375 are what the earlier hand-written Mann-Whitney rank formula gave.
    rng = np.random.default_rng(7)
    negatives, positives = rng.integers(0, 6, 40).astype(float), rng.integers(1, 7, 30).astype(float)
    assert auroc(torch.tensor(negatives, dtype=torch.float32), torch.tensor(positives)) == pytest.approx(
        0.5633333333333334, abs=1e-15)
    assert _pairwise_auroc(negatives, positives) == pytest.approx(0.5633333333333334, abs=1e-15)
    negatives, positives = rng.normal(0.0, 1.0, 1000).round(1), rng.normal(0.5, 1.0, 800).round(1)
    assert auroc(torch.from_numpy(negatives), torch.from_numpy(positives)) == pytest.approx(0.646024375, abs=1e-15)
    assert _pairwise_auroc(negatives, positives) == pytest.approx(0.646024375, abs=1e-15)


def _random_probs(seed: int, n: int = 600, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, classes, generator=gen, dtype=torch.float64), dim=1)
    return probs, torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_and_nll_match_scikit_learn(seed):
    probs, labels = _random_probs(seed)
    y, p = labels.numpy(), probs.numpy()
    for k in (1, 2, 5):
        expected = 100 * top_k_accuracy_score(y, p, k=k, labels=np.arange(10))
        assert topk_accuracy(probs, labels, k) == pytest.approx(expected, abs=1e-12)
    assert nll(probs, labels) == pytest.approx(log_loss(y, p, labels=np.arange(10)), abs=1e-12)
    meter = ClassificationMeter()
    meter.update(probs, labels)
    result = meter.compute()
    assert result["top5"] == pytest.approx(100 * top_k_accuracy_score(y, p, k=5, labels=np.arange(10)), abs=1e-9)
    assert result["nll"] == pytest.approx(log_loss(y, p, labels=np.arange(10)), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_torchmetrics_off_the_bin_edges(seed):
    probs, labels = _random_probs(seed)
    expected = multiclass_calibration_error(probs, labels, num_classes=10, n_bins=15, norm="l1").item()
    assert ece(probs, labels) == pytest.approx(expected, abs=1e-6)  # torchmetrics sums in float32


def test_ece_puts_a_confidence_on_an_edge_in_the_bin_below_as_scikit_learn_does():
    # Per bin (b-1)/15 < c <= b/15, b = 8..15: one confidence exactly on the edge b/15 and one 0.01 below it, the
    # first predicted right, the second wrong — two examples in each of 8 bins, in scikit-learn's binning too.
    edges = np.arange(8, 16) / 15
    confidence = np.concatenate([edges, edges - 0.01])
    correct = np.concatenate([np.ones(8), np.zeros(8)])
    probs = torch.tensor(np.stack([confidence, 1 - confidence], axis=1))
    labels = torch.tensor(1 - correct, dtype=torch.long)  # class 0 holds the confidence: label 0 = right
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=15, strategy="uniform")
    assert len(accuracy) == 8  # every bin holds its edge and the point below it
    expected = np.sum(2 / 16 * np.abs(accuracy - mean_confidence))
    assert expected == pytest.approx(np.mean(np.abs(0.5 - (edges - 0.005))), abs=1e-15)
    assert ece(probs, labels) == pytest.approx(expected, abs=1e-12)
    meter = ClassificationMeter()
    meter.update(probs, labels)
    assert meter.compute()["ece"] == pytest.approx(expected, abs=1e-6)
    # [lo, hi) bins would part each pair and count every example alone
    assert expected != pytest.approx(np.mean(np.abs(correct - confidence)), abs=0.1)


def test_ood_auroc_per_set_and_mean():
    result = ood_auroc(torch.tensor([0.1, 0.2]), {"far": torch.tensor([0.5, 0.6]), "same": torch.tensor([0.1, 0.2])})
    assert result == pytest.approx({"far": 1.0, "same": 0.5, "mean": 0.75})
    with pytest.raises(LatePhaseError):
        ood_auroc(torch.tensor([0.1]), {"mean": torch.tensor([0.5])})


def test_meter_matches_the_functions_across_batches():
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(2 * torch.randn(300, 7, generator=gen), dim=1)
    labels = torch.randint(0, 7, (300,), generator=gen)
    meter = ClassificationMeter()
    for chunk in range(0, 300, 64):
        meter.update(probs[chunk:chunk + 64], labels[chunk:chunk + 64])
    result = meter.compute()
    assert result["count"] == 300
    assert result["top1"] == pytest.approx(topk_accuracy(probs, labels, 1))
    assert result["top5"] == pytest.approx(topk_accuracy(probs, labels, 5))
    assert result["nll"] == pytest.approx(nll(probs, labels), rel=1e-5)
    assert result["ece"] == pytest.approx(ece(probs, labels), abs=1e-5)
    assert result["entropy"] == pytest.approx(predictive_entropy(probs).mean().item(), rel=1e-5)
    assert torch.allclose(meter.entropies(), predictive_entropy(probs))


def test_meter_reports_bad_input_at_compute():
    meter = ClassificationMeter()
    meter.update(PROBS.log(), LABELS)  # logits, not probabilities
    with pytest.raises(LatePhaseError, match="not probability vectors"):
        meter.compute()
    meter = ClassificationMeter()
    meter.update(PROBS, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(LatePhaseError, match="outside"):
        meter.compute()
    with pytest.raises(LatePhaseError, match="no examples"):
        ClassificationMeter().compute()
    meter = ClassificationMeter()
    meter.update(PROBS, LABELS)
    with pytest.raises(LatePhaseError, match="number of classes"):
        meter.update(torch.full((2, 4), 0.25), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "call",
    [
        lambda: nll(PROBS.log(), LABELS),
        lambda: ece(PROBS, LABELS.float()),
        lambda: topk_accuracy(PROBS, LABELS[:3]),
        lambda: topk_accuracy(PROBS, LABELS, k=0),
        lambda: topk_accuracy(PROBS, torch.tensor([0, 1, 2, 3])),
        lambda: nll(PROBS[0], LABELS),
        lambda: auroc(torch.tensor([]), torch.tensor([1.0])),
    ],
)
def test_user_errors(call):
    with pytest.raises(LatePhaseError):
        call()


def _logit_model() -> nn.Module:
    """Identity linear layer (so softmax(model(log p)) = p) followed by dropout, which eval mode must switch off."""
    linear = nn.Linear(3, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(3))
        linear.bias.zero_()
    return nn.Sequential(linear, nn.Dropout(0.5))


def test_evaluate_model_on_known_outputs():
    model = _logit_model()
    model.train()
    model[0].eval()  # mixed modes must come back as they were
    x = PROBS.log()
    loader = [(x[:2], LABELS[:2]), (x[2:], LABELS[2:])]
    uniform = torch.zeros(4, 3)  # entropy ln 3, above every in-distribution example
    result = evaluate_model(model, loader, ood_loaders={"uniform": [uniform], "same": [(x, LABELS)]})
    assert result["count"] == 4
    assert result["top1"] == pytest.approx(50.0)
    assert result["top5"] == pytest.approx(100.0)
    assert result["nll"] == pytest.approx(NLL, abs=1e-6)
    assert result["ece"] == pytest.approx(ECE, abs=1e-6)
    assert result["auroc/uniform"] == 1.0
    assert result["auroc/same"] == pytest.approx(0.5)
    assert result["auroc/mean"] == pytest.approx(0.75)
    assert model.training and not model[0].training and model[1].training


def test_evaluate_model_with_predict_fn_and_amp():
    loader = [(PROBS.log(), LABELS)]
    result = evaluate_model(None, loader, predict_fn=lambda x: torch.softmax(x, dim=1))
    assert result["nll"] == pytest.approx(NLL, abs=1e-6)
    result = evaluate_model(_logit_model(), loader, amp_dtype=torch.bfloat16)
    assert result["top1"] == pytest.approx(50.0)
    assert result["nll"] == pytest.approx(NLL, abs=2e-2)


def test_evaluate_model_errors():
    with pytest.raises(LatePhaseError):
        evaluate_model(None, [])
    with pytest.raises(LatePhaseError, match="no examples"):
        evaluate_model(_logit_model(), [])
    with pytest.raises(LatePhaseError, match=r"\(x, y\)"):
        evaluate_model(_logit_model(), [PROBS])
    with pytest.raises(LatePhaseError, match="not probability vectors"):
        evaluate_model(None, [(PROBS, LABELS)], predict_fn=lambda x: x.log())


def _fitted_linear_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = (x[:, 0] + 0.5 * torch.randn(64, generator=gen) > 0).long() + (x[:, 1] > 1).long()
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, [(x[:32], y[:32]), (x[32:], y[32:])]


def test_flatness_on_a_linear_model():
    model, batches = _fitted_linear_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sigmas = [0.0, 0.1, 0.3, 1.0]
    result = flatness(model, batches, sigmas, draws=8, seed=3)
    assert set(result) == set(sigmas)
    assert result[0.0] == {"mean": 0.0, "std": 0.0}
    means = [result[s]["mean"] for s in sigmas]
    assert all(a < b for a, b in zip(means, means[1:]))  # convex loss: E δL grows with σz
    assert result[1.0]["std"] > 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])  # bitwise
    assert flatness(model, batches, sigmas, draws=8, seed=3) == result


def test_flatness_uses_eval_mode_and_restores_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    flatness(model, batches, [0.0, 0.5], draws=2)
    assert model.training and model[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])  # weights and BatchNorm running statistics untouched


@pytest.mark.parametrize(
    "kwargs", [{"sigmas": []}, {"sigmas": [-0.1]}, {"sigmas": [float("nan")]}, {"sigmas": [0.1], "draws": 0}]
)
def test_flatness_errors(kwargs):
    model, batches = nn.Linear(4, 3), [(torch.randn(2, 4), torch.tensor([0, 1]))]
    with pytest.raises(LatePhaseError):
        flatness(model, batches, **kwargs)
    with pytest.raises(LatePhaseError):
        flatness(model, [], [0.1])
