"""Calibration done fairly: one temperature fitted on held-out predictions, and NLL / ECE / Brier score before and
after it on other images.

Temperature scaling (Guo et al., ICML 2017) divides the logits by one scalar T > 0 chosen to minimise the NLL of
held-out data. Here it acts on log-probabilities, p_T = softmax(log p / T): for one model, log p is the log-softmax of
the logits and p_T exactly softmax(logits / T); for an ensemble, p is the mean of the members' softmax outputs, so T
scales the log of the ensemble's probability. The fit set must be data the model never trained on — a fixed stratified part of the
evaluation set (:func:`calibration_split`), the rest reporting — else T only learns how well the training images were
memorised (a model near 100 % training accuracy gets T < 1 and is made more over-confident).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lpconvert.data.selection import split_indices
from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.metrics import brier, ece, nll, topk_accuracy

__all__ = ["TEMPERATURE_BOUNDS", "apply_temperature", "calibrate", "calibration_split", "fit_temperature"]

#: The temperatures searched: beyond them the model is no classifier (T → ∞) or the data separable (T → 0).
TEMPERATURE_BOUNDS = (1e-2, 1e2)


def _nll_at(log_probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of softmax(log_probs / T): (1/N) Σ_i [logsumexp_c(z_ic / T) − z_{i,y_i} / T], in float64 NumPy (pairwise
    sums: the same value on any number of threads)."""
    from scipy.special import logsumexp

    z = log_probs / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]))


def fit_temperature(log_probs: Tensor, labels: Tensor) -> float:
    """The temperature T minimising the mean NLL of softmax(log p / T) over (`log_probs` (N, C), `labels` (N,)).

    The NLL is convex in 1/T (a log-sum-exp of functions linear in 1/T minus a linear term), so it has one minimum
    along log T: a bounded Brent search on log T over :data:`TEMPERATURE_BOUNDS` (scipy's ``minimize_scalar``, to
    1e-6 in log T) finds it without a learning rate or a starting point, and returns the bound when the minimum lies
    beyond it.
    """
    from scipy.optimize import minimize_scalar

    if log_probs.ndim != 2 or labels.ndim != 1 or len(log_probs) != len(labels) or len(labels) == 0:
        raise LatePhaseError("fit_temperature needs (N, C) log-probabilities and N labels, N > 0, got "
                             f"{tuple(log_probs.shape)} and {tuple(labels.shape)}")
    z, y = _finite(log_probs).numpy(), labels.cpu().numpy().astype(np.int64)
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda u: _nll_at(z, y, math.exp(u)), bounds=(low, high), method="bounded",
                             options={"xatol": 1e-6})
    return float(math.exp(result.x))


def _finite(log_probs: Tensor) -> Tensor:
    """float64 on the CPU, −∞ (a probability that underflowed to 0) raised to −10⁴ (e^(−10⁴/T) is 0 for every T
    searched; finite values are kept as they are, so that T(a·z) = a·T(z))."""
    return log_probs.detach().double().cpu().clamp_min(-1e4)


def apply_temperature(log_probs: Tensor, temperature: float) -> Tensor:
    """softmax(log p / T) in float64: the probabilities after temperature scaling (T = 1: the probabilities)."""
    if not temperature > 0:
        raise LatePhaseError(f"the temperature must be positive, got {temperature}")
    return torch.softmax(_finite(log_probs) / temperature, dim=1)


def calibration_split(labels: Sequence[int] | Tensor, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit indices, report indices): ``round(fraction · N)`` of the N examples, stratified by label and drawn with
    `seed` (:func:`lpconvert.data.selection.split_indices`), fit the temperature; the others report."""
    return split_indices([int(t) for t in labels], fraction, seed, flag="--calibration-split")


def calibrate(fit_log_probs: Tensor, fit_labels: Tensor, log_probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Fit T on (`fit_log_probs`, `fit_labels`) and report on (`log_probs`, `labels`): ``temperature``, the number of
    images of each (``fit_count``, ``count``), ``top1`` (unchanged by T) and ``nll``, ``ece``, ``brier`` before and
    after scaling (``*_ts``)."""
    temperature = fit_temperature(fit_log_probs, fit_labels)
    probs, scaled = apply_temperature(log_probs, 1.0), apply_temperature(log_probs, temperature)
    labels = labels.cpu()
    return {
        "temperature": temperature,
        "fit_count": int(len(fit_labels)),
        "count": int(len(labels)),
        "top1": topk_accuracy(probs, labels),
        "nll": nll(probs, labels),
        "nll_ts": nll(scaled, labels),
        "ece": ece(probs, labels),
        "ece_ts": ece(scaled, labels),
        "brier": brier(probs, labels),
        "brier_ts": brier(scaled, labels),
    }
