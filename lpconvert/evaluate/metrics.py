"""Evaluation metrics: accuracy, NLL, calibration and OOD detection; :mod:`lpconvert.evaluate.evaluation` runs them over a
model.

Conventions (N examples, C classes, ``probs`` of shape (N, C), integer ``labels`` of shape (N,)):

* Metrics take *probabilities*, because an ensemble's prediction is the mean of its members' softmax outputs; only
  :func:`topk_accuracy` also accepts logits (it only ranks). Rows must be non-negative and sum to 1 (±1e-2).
* Accuracies are percentages; NLL and entropies are in nats; ECE and AUROC are fractions in [0, 1].
* Top-k with k ≥ C is clamped to k = C (the label is then always among the top k, so top-5 on a 3-class problem is
  100 %). Ties in the ranking are broken as :func:`torch.topk` breaks them.
* Log-probabilities are taken of ``max(p, 1e-12)``, so one example contributes at most −log(1e-12) ≈ 27.6 nats.

AUROC is scikit-learn's ``roc_auc_score``. Top-k, NLL, Brier, ECE and entropy stay written here (tested against scikit-learn
and torchmetrics): :class:`ClassificationMeter` keeps their sums on the device, without a host sync per batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lpconvert.errors import LatePhaseError

METRIC_NAMES = ("top1", "top5", "nll", "ece")  # what a run records per epoch and a model card shows
PROB_FLOOR = 1e-12
ECE_BINS = 15
_SUM_TOLERANCE = 1e-2
#: Per-batch sums of a ClassificationMeter before its ECE bins: n, top1, top5, nll, labels, rows, non-finite rows,
#: Brier score.
_HEAD = 8

__all__ = [
    "METRIC_NAMES",
    "ClassificationMeter",
    "auroc",
    "brier",
    "ece",
    "nll",
    "max_probability",
    "ood_auroc",
    "predictive_entropy",
    "topk_accuracy",
]


def _check_shapes(probs: Tensor, labels: Tensor | None = None) -> None:
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise LatePhaseError(f"predictions must have shape (N, C) with C >= 1, got {tuple(probs.shape)}")
    if labels is None:
        return
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise LatePhaseError(f"labels must have shape ({probs.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise LatePhaseError(f"labels must be integer class indices, got dtype {labels.dtype}")


def _bad_labels(labels: Tensor, num_classes: int) -> Tensor:
    return (labels < 0) | (labels >= num_classes)


def _bad_rows(probs: Tensor) -> Tensor:
    """Rows that are not probability vectors: a negative or non-finite entry, or a sum off 1 by more than 1e-2."""
    return ~torch.isfinite(probs).all(1) | (probs < 0).any(1) | ((probs.sum(1) - 1).abs() > _SUM_TOLERANCE)


def _floating(probs: Tensor) -> Tensor:
    """Detached probabilities in float32, or float64 when given in float64."""
    return probs.detach() if probs.dtype == torch.float64 else probs.detach().float()


def _validated(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes and values (this synchronises with the device) and return float probabilities and labels."""
    _check_shapes(probs, labels)
    probs = _floating(probs)
    if probs.numel() == 0:
        raise LatePhaseError("no examples: predictions are empty")
    bad = int(_bad_labels(labels, probs.shape[1]).sum())
    if bad:
        raise LatePhaseError(f"{bad} labels are outside [0, {probs.shape[1]})")
    bad = int(_bad_rows(probs).sum())
    if bad:
        raise LatePhaseError(f"{bad} rows are not probability vectors; pass softmax outputs, not logits")
    return probs, labels.to(probs.device)


def topk_accuracy(scores: Tensor, labels: Tensor, k: int = 1) -> float:
    """Top-k accuracy in percent: 100 · mean_i 1[y_i ∈ top-k(scores_i)], with k clamped to C.

    ``scores`` may be probabilities or logits.
    """
    _check_shapes(scores, labels)
    if k < 1:
        raise LatePhaseError(f"k must be at least 1, got {k}")
    if scores.shape[0] == 0:
        raise LatePhaseError("no examples: predictions are empty")
    bad = int(_bad_labels(labels, scores.shape[1]).sum())
    if bad:
        raise LatePhaseError(f"{bad} labels are outside [0, {scores.shape[1]})")
    top = scores.detach().topk(min(k, scores.shape[1]), dim=1).indices
    return 100.0 * top.eq(labels.to(top.device)[:, None]).any(1).double().mean().item()


def nll(probs: Tensor, labels: Tensor) -> float:
    """Negative log-likelihood, mean over examples: −(1/N) Σ_i log max(p_{i, y_i}, 1e-12)."""
    probs, labels = _validated(probs, labels)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    return -p_true.double().clamp_min(PROB_FLOOR).log().mean().item()


def brier(probs: Tensor, labels: Tensor) -> float:
    """Brier score, mean over examples of the squared distance to the one-hot label (Brier 1950, summed over the C
    classes as in Ovadia et al. 2019): (1/N) Σ_i Σ_c (p_ic − 1[c = y_i])², in [0, 2]."""
    probs, labels = _validated(probs, labels)
    return _brier_terms(probs.double(), labels).mean().item()


def _brier_terms(probs: Tensor, labels: Tensor) -> Tensor:
    """Per example Σ_c (p_c − 1[c = y])² = Σ_c p_c² − 2 p_y + 1."""
    return probs.square().sum(1) - 2 * probs.gather(1, labels[:, None]).squeeze(1) + 1


def max_probability(probs: Tensor) -> Tensor:
    """Per-example maximum softmax probability (MSP, Hendrycks & Gimpel 2017), shape (N,)."""
    _check_shapes(probs)
    return _floating(probs).max(1).values


def _bin_index(confidence: Tensor, n_bins: int) -> Tensor:
    """Bin b = 0..n_bins−1 holds confidences in (b/n_bins, (b+1)/n_bins]; bin 0 also holds 0."""
    edges = torch.arange(1, n_bins, device=confidence.device, dtype=confidence.dtype) / n_bins
    return torch.bucketize(confidence.contiguous(), edges, right=False)


def _calibration_sums(confidence: Tensor, correct: Tensor, n_bins: int, dtype: torch.dtype) -> Tensor:
    """(3, n_bins) in ``dtype``: per bin the number of examples, the sum of confidences and the number correct.

    Bins are found in the confidences' own dtype, so a float32 confidence of 0.8 lands in (11/15, 12/15].
    """
    index = _bin_index(confidence, n_bins)
    sums = torch.zeros(3, n_bins, device=confidence.device, dtype=dtype)
    sums[0].index_add_(0, index, torch.ones_like(confidence, dtype=dtype))
    sums[1].index_add_(0, index, confidence.to(dtype))
    sums[2].index_add_(0, index, correct.to(dtype))
    return sums


def ece(probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: Σ_b |B_b|/N · |acc(B_b) − conf(B_b)| over ``n_bins`` equal-width bins.

    The confidence of an example is max_c p_ic, its prediction the arg-max; with M = n_bins, bin b covers
    (b/M, (b+1)/M] (bin 0 includes 0): a confidence exactly on an edge b/M counts in the bin below it, as in
    scikit-learn's ``calibration_curve(strategy="uniform")``. Returned as a fraction in [0, 1].
    """
    if n_bins < 1:
        raise LatePhaseError(f"n_bins must be at least 1, got {n_bins}")
    probs, labels = _validated(probs, labels)
    confidence, prediction = probs.max(1)
    _, conf_sum, correct_sum = _calibration_sums(confidence, prediction == labels, n_bins, torch.float64)
    return ((correct_sum - conf_sum).abs().sum() / probs.shape[0]).item()


def predictive_entropy(probs: Tensor) -> Tensor:
    """Per-example predictive entropy in nats, shape (N,): H_i = −Σ_c p_ic log p_ic, with 0 log 0 = 0."""
    _check_shapes(probs)
    return torch.special.entr(_floating(probs)).sum(1)


def auroc(negatives: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve for "higher score = positive" (scikit-learn's ``roc_auc_score``): the probability
    that a positive scores above a negative, a tie counting ½."""
    neg = negatives.detach().flatten().double().cpu()
    pos = positives.detach().flatten().double().cpu()
    if neg.numel() == 0 or pos.numel() == 0:
        raise LatePhaseError(f"AUROC needs both classes, got {neg.numel()} negatives and {pos.numel()} positives")
    scores = torch.cat([neg, pos])
    if not torch.isfinite(scores).all():
        raise LatePhaseError("AUROC scores must be finite")
    from sklearn.metrics import roc_auc_score

    is_positive = torch.cat([torch.zeros(neg.numel()), torch.ones(pos.numel())])
    return float(roc_auc_score(is_positive.numpy(), scores.numpy()))


def ood_auroc(in_scores: Tensor, ood_scores: Mapping[str, Tensor]) -> dict[str, float]:
    """OOD-detection AUROC per OOD set, in-distribution = negative, OOD = positive, plus their mean under "mean".

    Scores are typically :func:`predictive_entropy` values (higher = more likely OOD).
    """
    if not ood_scores:
        raise LatePhaseError("no OOD sets given")
    if "mean" in ood_scores:
        raise LatePhaseError('an OOD set may not be called "mean"; rename it')
    result = {name: auroc(in_scores, scores) for name, scores in ood_scores.items()}
    result["mean"] = sum(result.values()) / len(result)
    return result


class ClassificationMeter:
    """Streaming top-1/top-5 accuracy, NLL, Brier score, ECE (15 bins) and predictive entropy over batches of probabilities.

    :meth:`update` does not synchronise with the device: per-batch sums (and the per-example entropies, for AUROC)
    stay where the probabilities are until :meth:`compute`, which also reports invalid labels, non-finite rows (the
    model's outputs overflowed) or non-probability rows seen in any batch.
    """

    def __init__(self) -> None:
        self._sums: list[Tensor] = []
        self._entropies: list[Tensor] = []
        self._confidences: list[Tensor] = []
        self._num_classes: int | None = None

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch: ``probs`` (B, C) probabilities, ``labels`` (B,) class indices."""
        _check_shapes(probs, labels)
        if self._num_classes is not None and probs.shape[1] != self._num_classes:
            raise LatePhaseError(f"batches disagree on the number of classes: {self._num_classes} vs {probs.shape[1]}")
        self._num_classes = probs.shape[1]
        if probs.shape[0] == 0:
            return
        probs = probs.detach().float()
        labels = labels.to(probs.device)
        bad_labels = _bad_labels(labels, self._num_classes)
        labels = labels.clamp(0, self._num_classes - 1)  # invalid labels are counted and reported by compute()
        top_p, top_i = probs.topk(min(5, self._num_classes), dim=1)
        hits = top_i.eq(labels[:, None])
        p_true = probs.gather(1, labels[:, None]).squeeze(1)
        head = [
            torch.ones_like(p_true).sum(),
            hits[:, 0].sum(),
            hits.any(1).sum(),
            -p_true.clamp_min(PROB_FLOOR).log().sum(),
            bad_labels.sum(),
            _bad_rows(probs).sum(),
            (~torch.isfinite(probs).all(1)).sum(),
            _brier_terms(probs, labels).sum(),
        ]
        bins = _calibration_sums(top_p[:, 0], hits[:, 0], ECE_BINS, torch.float32).flatten()
        self._sums.append(torch.cat([torch.stack([value.float() for value in head]), bins]))
        self._entropies.append(predictive_entropy(probs))
        self._confidences.append(top_p[:, 0])

    def all_reduce(self) -> None:
        """Combine the meters of all ranks of the process group (each fed a contiguous shard, in rank order): every
        rank's meter then holds the sums over all examples and every example's entropy, in the order of one
        process."""
        from lpconvert.train.distributed import all_reduce_sum, gather

        local = torch.stack(self._sums).to("cpu", torch.float64).sum(0) if self._sums else \
            torch.zeros(_HEAD + 3 * ECE_BINS, dtype=torch.float64)
        seen = self._num_classes is not None
        classes, ranks = all_reduce_sum(torch.tensor([self._num_classes or 0, int(seen)], dtype=torch.long)).tolist()
        total = all_reduce_sum(local)
        self._num_classes = classes // ranks if ranks else None
        self._sums = [total] if total[0] > 0 else []
        self._entropies = gather(self._entropies)
        self._confidences = gather(self._confidences)

    def compute(self) -> dict[str, float]:
        """{"count", "top1", "top5" (percent), "nll", "brier", "ece", "entropy" (mean predictive entropy)} over all
        batches."""
        if not self._sums:
            raise LatePhaseError("no examples to evaluate")
        sums = torch.stack(self._sums).to("cpu", torch.float64).sum(0)
        n, top1, top5, nll_sum, bad_labels, bad_rows, non_finite, brier_sum = sums[:_HEAD].tolist()
        if bad_labels:
            raise LatePhaseError(f"{int(bad_labels)} labels are outside [0, {self._num_classes})")
        if non_finite:
            raise LatePhaseError(
                f"the model's outputs are not finite (NaN or inf for {int(non_finite)} of {int(n)} examples); its "
                "weights or inputs overflow: check the weights for NaN/inf or huge values, or lower --lr / --sigma0"
            )
        if bad_rows:
            raise LatePhaseError(f"{int(bad_rows)} rows are not probability vectors; pass softmax outputs, not logits")
        _, conf_sum, correct_sum = sums[_HEAD:].view(3, ECE_BINS)
        return {
            "count": int(n),
            "top1": 100.0 * top1 / n,
            "top5": 100.0 * top5 / n,
            "nll": nll_sum / n,
            "brier": brier_sum / n,
            "ece": ((correct_sum - conf_sum).abs().sum() / n).item(),
            "entropy": self.entropies().double().mean().item(),
        }

    def confidences(self) -> Tensor:
        """Maximum softmax probability of every example seen so far, on the CPU, shape (N,)."""
        if not self._confidences:
            return torch.empty(0)
        return torch.cat(self._confidences).cpu()

    def entropies(self) -> Tensor:
        """Predictive entropy of every example seen so far, on the CPU, shape (N,)."""
        if not self._entropies:
            return torch.empty(0)
        return torch.cat(self._entropies).cpu()
