"""Evaluating a model: the metrics of :mod:`lpconvert.evaluate.metrics` over a loader (:func:`evaluate_model`, with OOD
AUROC), and the flatness score δL(σz) of the late-phase paper's Fig. 3 (:func:`flatness`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.metrics import ClassificationMeter, max_probability, ood_auroc, predictive_entropy
from lpconvert.train.distributed import active, gather, shard

__all__ = ["evaluate_model", "flatness"]


def _model_device(model: nn.Module | None) -> torch.device:
    tensor = next(chain(model.parameters(), model.buffers()), None) if model is not None else None
    return tensor.device if tensor is not None else torch.device("cpu")


def _inputs(batch: object, need_labels: bool) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor) and not need_labels:
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    expected = "(x, y) pairs" if need_labels else "(x, y) pairs or input tensors"
    raise LatePhaseError(f"the loader must yield {expected}, got {type(batch).__name__}")


def _progress(loader: Iterable, description: str | None) -> Iterable:
    if description is None:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=description, disable=None, leave=False, unit=" batches")


def evaluate_model(
    model: nn.Module | None,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    ood_loaders: Mapping[str, Iterable] | None = None,
    predict_fn: Callable[[Tensor], Tensor] | None = None,
    progress: str | None = None,
    distributed: bool = False,
    outputs: list[tuple[Tensor, Tensor]] | None = None,
) -> dict[str, float]:
    """Evaluate a classifier: :class:`ClassificationMeter` metrics, "auroc/<name>" per OOD set and "auroc/mean" (OOD
    score: the predictive entropy, as in the late-phase paper), and "auroc_msp/<name>", "auroc_msp/mean" (score: one
    minus the maximum softmax probability, Hendrycks & Gimpel 2017).

    Runs under ``torch.no_grad`` with every module in eval mode (each module's mode is restored afterwards) and, with
    ``amp_dtype``, under ``torch.autocast``. Probabilities are ``softmax(model(x))`` in float32, or ``predict_fn(x)``
    when given (e.g. the mean of the members' softmax outputs of an ensemble; ``model`` may then be None). ``device``
    defaults to the model's; when given, the model is moved there. ``loader`` yields (x, y); OOD loaders yield (x, y)
    or x, and their labels are ignored. The OOD score is the predictive entropy (OOD = positive class). With
    ``progress`` (a description), a progress bar shows on a terminal. With ``distributed`` (in a process group of
    several ranks, every rank calling), each rank evaluates its contiguous shard of every loader
    (:func:`lpconvert.train.distributed.shard`: DataLoaders with a ``batch_size``) and every rank returns the metrics of
    the whole sets, equal to one process's up to the order of float64 sums. With ``outputs`` (a list), the
    log-probabilities (float32 log-softmax of the logits, or the log of ``predict_fn``'s probabilities) and labels of
    the evaluation set (on the CPU, in the loader's order; all of them on every rank) are appended to it as one
    (log_probs, labels) pair.
    """
    if model is None and predict_fn is None:
        raise LatePhaseError("pass a model or a predict_fn")
    device = _model_device(model) if device is None else torch.device(device)
    if model is not None:
        model.to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext

    def predict(x: Tensor, log: bool = False) -> tuple[Tensor, Tensor | None]:
        """(probabilities, and with `log` their logarithm: the log-softmax of the logits, or the log of predict_fn's
        probabilities with 0 raised to float32's smallest normal)."""
        x = x.to(device, non_blocking=True)
        with autocast():
            if predict_fn is not None:
                probs = predict_fn(x).float()
                return probs, probs.clamp_min(torch.finfo(torch.float32).tiny).log() if log else None
            logits = model(x).float()
            return logits.softmax(-1), logits.log_softmax(-1) if log else None

    modes = [(module, module.training) for module in model.modules()] if model is not None else []
    if model is not None:
        model.eval()
    split = distributed and active()
    try:
        with torch.no_grad():
            meter, kept = ClassificationMeter(), []
            for batch in _progress(shard(loader) if split else loader, progress):
                x, y = _inputs(batch, need_labels=True)
                probs, log_probs = predict(x, log=outputs is not None)
                meter.update(probs, y.to(device, non_blocking=True))
                if log_probs is not None:
                    kept.append(torch.cat([log_probs.detach().cpu(), y.cpu().to(log_probs.dtype)[:, None]], 1))
            if split:
                meter.all_reduce()
                kept = gather(kept) if outputs is not None else kept
            result: dict[str, float] = meter.compute()
            if outputs is not None:
                table = torch.cat(kept)
                outputs.append((table[:, :-1], table[:, -1].long()))
            if ood_loaders:
                ood, msp = {}, {}
                for name, ood_loader in ood_loaders.items():
                    scores = []
                    for batch in shard(ood_loader) if split else ood_loader:
                        probs = predict(_inputs(batch, need_labels=False)[0])[0]
                        scores.append(torch.stack([predictive_entropy(probs), max_probability(probs)], 1))
                    if split:
                        scores = gather(scores)
                    if not scores:
                        raise LatePhaseError(f"OOD loader {name!r} yielded no batches")
                    ood[name], msp[name] = torch.cat(scores).unbind(1)
                result.update({f"auroc/{name}": value for name, value in ood_auroc(meter.entropies(), ood).items()})
                msp_auroc = ood_auroc(1 - meter.confidences(), {name: 1 - value for name, value in msp.items()})
                result.update({f"auroc_msp/{name}": value for name, value in msp_auroc.items()})
    finally:
        for module, training in modes:
            module.training = training
    return result


def flatness(
    model: nn.Module,
    batches: Iterable[Sequence[Tensor]],
    sigmas: Iterable[float],
    *,
    draws: int = 10,
    seed: int = 0,
) -> dict[float, dict[str, float]]:
    """Flatness score of Fig. 3: δL(σz) = E_z[L(w + z) − L(w)], z_i ~ N(0, w_i² σz²), for each σz in ``sigmas``.

    Every parameter entry is perturbed multiplicatively, w_i ← w_i (1 + σz ε_i) with ε_i ~ N(0, 1); L is the mean
    cross-entropy over all examples of ``batches`` ((x, y) pairs, read once and kept on the model's device). The same
    ``draws`` noise draws (from a CPU generator seeded with ``seed``) are used for every σz. Modules are in eval mode
    (BatchNorm uses its running statistics). Returns {σz: {"mean": δL averaged over draws, "std": its sample std over
    draws (0 for one draw)}}; the model's weights and modes are restored exactly.
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(not (s >= 0 and s < float("inf")) for s in sigmas):
        raise LatePhaseError(f"sigmas must be a non-empty list of finite values >= 0, got {sigmas}")
    if draws < 1:
        raise LatePhaseError(f"draws must be at least 1, got {draws}")
    params = list(model.parameters())
    if not params:
        raise LatePhaseError("the model has no parameters to perturb")
    device = params[0].device
    data = [tuple(t.to(device) for t in _inputs(batch, need_labels=True)) for batch in batches]
    if not data:
        raise LatePhaseError("flatness needs at least one batch")

    def loss() -> float:
        total, count = 0.0, 0
        for x, y in data:
            total += F.cross_entropy(model(x).float(), y, reduction="sum").item()
            count += y.shape[0]
        return total / count

    generator = torch.Generator().manual_seed(seed)
    original = [p.detach().clone() for p in params]
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    deltas = torch.zeros(draws, len(sigmas), dtype=torch.float64)
    try:
        with torch.no_grad():
            base = loss()
            for d in range(draws):
                noise = [torch.randn(p.shape, generator=generator).to(device=p.device, dtype=p.dtype) for p in params]
                for j, sigma in enumerate(sigmas):
                    for p, w, eps in zip(params, original, noise):
                        p.copy_(w * (sigma * eps + 1))
                    deltas[d, j] = loss() - base
    finally:
        with torch.no_grad():
            for p, w in zip(params, original):
                p.copy_(w)
        for module, training in modes:
            module.training = training
    std = deltas.std(0) if draws > 1 else torch.zeros(len(sigmas), dtype=torch.float64)
    return {s: {"mean": deltas[:, j].mean().item(), "std": std[j].item()} for j, s in enumerate(sigmas)}
