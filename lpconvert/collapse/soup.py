"""Weight-space selection that returns ONE model of the original architecture: a greedy soup of the late-phase
members, and interpolation with the starting checkpoint (WiSE-FT).

- :func:`greedy_soup` (Wortsman et al., *Model soups*, ICML 2022): the members ranked by their held-out score, then
  added best first, each kept only if the average does not score lower; the soup is Eq. 1 over the kept members,
  w̄ = h(θ, mean_{k ∈ S} φ_k), with :func:`lpconvert.collapse`'s BatchNorm modes.
- :func:`interpolate` (Wortsman et al., *Robust fine-tuning of zero-shot models*, CVPR 2022): θ = (1 − α) θ_start +
  α θ_ft over every floating-point tensor; :func:`choose_alpha` takes α from a grid on held-out data.
- :func:`soup_and_interpolate`: both, as ``lpconvert collapse --soup/--interpolate`` and ``finetune`` apply them.

Selection is only as honest as the data it chooses on: pass a validation set, never the test set.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lpconvert.collapse.average import collapse, recalibrate_batch_norm
from lpconvert.convert.late_phase_config import ATTRIBUTE, late_phase_config
from lpconvert.convert.members import late_phase_layers, num_members
from lpconvert.errors import LatePhaseError
from lpconvert.layers import BN_STATS_MODES

#: How the members are averaged: all of them (Eq. 1), or those a greedy soup keeps.
SOUPS = ("uniform", "greedy")
#: The α grid of :func:`choose_alpha`: 0, 0.1, …, 1.0 (α = 0 is the start, α = 1 the fine-tuned model).
ALPHA_GRID = tuple(i / 10 for i in range(11))

__all__ = ["ALPHA_GRID", "SOUPS", "Selection", "choose_alpha", "collapse_members", "describe", "greedy_soup",
           "interpolate", "keep_members", "parse_alpha", "soup_and_interpolate"]


# --------------------------------------------------------------------------------------------------------------------
# a subset of the members
# --------------------------------------------------------------------------------------------------------------------
def keep_members(model: nn.Module, members: Sequence[int]) -> nn.Module:
    """A copy of the late-phase `model` reduced to `members` (in that order): every late-phase layer keeps those rows
    of its member tensors (:meth:`~lpconvert.layers.LatePhaseLayer.keep_members`), the configuration says K =
    ``len(members)``. The copy is a late-phase model like any other (collapse, ensemble, unload); `model` is
    untouched."""
    if not late_phase_layers(model):
        raise LatePhaseError("this model was never converted (it has no late-phase layers); nothing to choose from")
    members = _members(members, num_members(model))
    reduced = copy.deepcopy(model)
    layers = late_phase_layers(reduced)
    for layer in layers.values():
        layer.keep_members(members)
    for selection in {id(layer.selection): layer.selection for layer in layers.values()}.values():
        selection.num_members = len(members)
        selection.select([0])
    setattr(reduced, ATTRIBUTE, dataclasses.replace(late_phase_config(model), K=len(members)))
    return reduced


def collapse_members(model: nn.Module, members: Sequence[int], bn_stats: str = "fold", data: Iterable | None = None,
                     *, num_batches: int | None = None, input_fn: Callable[[Any], Any] | None = None) -> nn.Module:
    """Eq. 1 over `members` only: w̄ = h(θ, mean_{k ∈ S} φ_k), the original architecture, with the BatchNorm
    statistics of ``collapse(bn_stats=...)`` computed from those members (``fold``: in eval mode each BatchNorm outputs
    the average of the kept members' outputs). The members are averaged in index order, so a subset's soup does not
    depend on the order they were chosen in; all K members give :func:`lpconvert.collapse` bit for bit, one member
    :func:`lpconvert.unload` bit for bit (``fold`` and ``mean``)."""
    reduced = keep_members(model, sorted(_members(members, num_members(model))))
    return collapse(reduced, bn_stats=bn_stats, data=data, inplace=True, input_fn=input_fn, num_batches=num_batches)


def _members(members: Sequence[int], K: int) -> list[int]:
    chosen = list(members)
    if not chosen or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < K for k in chosen):
        raise LatePhaseError(f"members must be integers in [0, {K - 1}], got {chosen}")
    if len(set(chosen)) != len(chosen):
        raise LatePhaseError(f"members must be distinct, got {chosen}")
    return chosen


def _score(score: Callable[[nn.Module], float], model: nn.Module, what: str) -> float:
    value = score(model)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LatePhaseError(f"the score of {what} is {value!r}; the score function must return a finite number "
                             "(higher is better, e.g. held-out top-1)")
    return float(value)


def _check_bn_stats(bn_stats: str, data: Iterable | None) -> None:
    if bn_stats not in BN_STATS_MODES:
        raise LatePhaseError(f"unknown bn_stats {bn_stats!r}; choose from {', '.join(BN_STATS_MODES)}")
    if bn_stats == "recalibrate" and data is None:
        raise LatePhaseError("bn_stats='recalibrate' needs data to re-estimate the statistics (pass data=loader)")
    _check_reiterable(data)


def _check_reiterable(data: Iterable | None) -> None:
    """Statistics are re-estimated once per candidate: `data` must give its batches again on every pass."""
    if data is not None and iter(data) is data:
        raise LatePhaseError("data is a one-pass iterator, and a soup or an α grid passes over it once per candidate; "
                             "pass a DataLoader or a list of batches")


# --------------------------------------------------------------------------------------------------------------------
# greedy soup
# --------------------------------------------------------------------------------------------------------------------
def greedy_soup(late_model: nn.Module, score: Callable[[nn.Module], float], *, bn_stats: str = "fold",
                data: Iterable | None = None, num_batches: int | None = None,
                input_fn: Callable[[Any], Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The greedy soup of the members (Wortsman et al. 2022), in the original architecture.

    Each member k is scored alone — ``score(collapse_members(late_model, [k]))``, which for ``fold`` and ``mean`` is
    ``unload(late_model, k)`` bit for bit; with ``recalibrate`` the member's statistics are re-estimated like the
    soup's — and the members are ranked by that score (higher is better; ties by index). The soup S starts with the
    best member; each next member k joins when the soup of S ∪ {k} scores at least as high as S. The soup is Eq. 1
    over S (:func:`collapse_members`: w̄ = h(θ, mean_{k ∈ S} φ_k), BatchNorm by `bn_stats`; `data` for
    ``recalibrate``, passed over once per candidate: a DataLoader or a list, not a one-pass iterator). So its score
    never falls below the best single member's on the set `score` measures.

    Returns the soup and ``{"members": S in the order they entered, "ranking": [[k, score], …] best first, "score":
    the soup's score, "uniform_score": the score of all K members averaged (Eq. 1)}``. `score` must measure held-out
    data — a validation set, never the test set. Costs 2K evaluations (K when every member is kept)."""
    _check_bn_stats(bn_stats, data)
    if not late_phase_layers(late_model):
        raise LatePhaseError("this model was never converted (it has no late-phase layers); there are no members to "
                             "make a soup of")
    K = num_members(late_model)

    def soup_of(members: Sequence[int]) -> nn.Module:
        return collapse_members(late_model, members, bn_stats, data, num_batches=num_batches, input_fn=input_fn)

    alone = {k: _score(score, soup_of([k]), f"member {k}") for k in range(K)}
    order = sorted(range(K), key=lambda k: (-alone[k], k))
    kept, best = [order[0]], alone[order[0]]
    for k in order[1:]:
        candidate = _score(score, soup_of([*kept, k]), f"the soup of members {[*kept, k]}")
        if candidate >= best:
            kept.append(k)
            best = candidate
    uniform = best if len(kept) == K else _score(score, collapse(late_model, bn_stats, data, input_fn=input_fn,
                                                                 num_batches=num_batches), "all members")
    record = {"members": kept, "ranking": [[k, alone[k]] for k in order], "score": best, "uniform_score": uniform}
    return soup_of(kept), record


# --------------------------------------------------------------------------------------------------------------------
# interpolation with the start (WiSE-FT)
# --------------------------------------------------------------------------------------------------------------------
def parse_alpha(value: Any) -> float | str | None:
    """``--interpolate``: None (no interpolation), ``"auto"`` (α chosen by :func:`choose_alpha`) or α, a number in
    [0, 1] (also as text); anything else is a one-line error."""
    if value is None or value == "auto":
        return value
    alpha = value
    if isinstance(value, str):
        try:
            alpha = float(value)
        except ValueError:
            alpha = None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise LatePhaseError(f"--interpolate takes auto or a number α in [0, 1] (θ = (1 − α) θ_start + α θ_averaged), "
                             f"got {value!r}")
    return float(alpha)


def _alpha(value: Any) -> float:
    alpha = parse_alpha(value)
    if not isinstance(alpha, float):
        raise LatePhaseError(f"α must be a number in [0, 1], got {value!r}")
    return alpha


def _check_pair(start: nn.Module, finetuned: nn.Module) -> None:
    """Both original architectures with the same class and state_dict keys, shapes and dtypes."""
    for name, model in (("start", start), ("finetuned", finetuned)):
        if late_phase_layers(model):
            raise LatePhaseError(f"interpolate: the {name} model is late-phase (converted); collapse it first")
    if type(start) is not type(finetuned):
        raise LatePhaseError(f"interpolate needs two models of one architecture, got {type(start).__name__} and "
                             f"{type(finetuned).__name__}")
    a, b = start.state_dict(), finetuned.state_dict()
    problem = next((f"{k} is missing from the start" for k in b if k not in a), None) \
        or next((f"{k} is not part of the fine-tuned model" for k in a if k not in b), None) \
        or next((f"{k} has shape {tuple(a[k].shape)} in the start, {tuple(b[k].shape)} fine-tuned" for k in b
                 if a[k].shape != b[k].shape), None) \
        or next((f"{k} is {a[k].dtype} in the start, {b[k].dtype} fine-tuned" for k in b if a[k].dtype != b[k].dtype),
                None)
    if problem:
        raise LatePhaseError(f"interpolate needs the same architecture on both sides: {problem}; pass the model the "
                             "fine-tuning started from")


@torch.no_grad()
def interpolate(start: nn.Module, finetuned: nn.Module, alpha: float, *, data: Iterable | None = None,
                num_batches: int | None = None, input_fn: Callable[[Any], Any] | None = None) -> nn.Module:
    """WiSE-FT: θ = (1 − α) θ_start + α θ_ft (``torch.lerp``) over every floating-point tensor of the state dict, a
    copy of `finetuned` (its class: the original architecture, strict-loadable). Integer buffers such as
    ``num_batches_tracked`` come from `finetuned` (from `start` at α = 0). α = 0 gives `start` and α = 1 `finetuned`
    bit for bit, every tensor.

    BatchNorm running statistics are interpolated like every other tensor by default; with `data` (training images
    with their augmentation, as for :func:`lpconvert.collapse`'s ``recalibrate``) they are re-estimated for
    0 < α < 1 (:func:`lpconvert.recalibrate_batch_norm`, the first `num_batches` batches); the end points stay exact.
    Both models must have one class and the same state_dict keys, shapes and dtypes (one-line error otherwise)."""
    alpha = _alpha(alpha)
    _check_pair(start, finetuned)
    begin, end = start.state_dict(), finetuned.state_dict()
    merged = {}
    for key, b in end.items():
        a = begin[key].to(b.device)
        if alpha == 0.0:
            merged[key] = a
        elif alpha == 1.0 or not b.is_floating_point():
            merged[key] = b
        else:
            merged[key] = torch.lerp(a, b, alpha)
    model = copy.deepcopy(finetuned)
    model.load_state_dict(merged, strict=True)
    if data is not None and 0.0 < alpha < 1.0:
        recalibrate_batch_norm(model, data, input_fn=input_fn, num_batches=num_batches)
    return model


def choose_alpha(start: nn.Module, finetuned: nn.Module, score: Callable[[nn.Module], float],
                 grid: Sequence[float] = ALPHA_GRID, *, data: Iterable | None = None, num_batches: int | None = None,
                 input_fn: Callable[[Any], Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """α of :func:`interpolate` from `grid` (default 0, 0.1, …, 1.0) by held-out `score` (higher is better): the
    best α, ties to the smaller one. With α = 0 in the grid the chosen model never scores below `start` on that set.
    `data`: BatchNorm statistics re-estimated for 0 < α < 1 (see :func:`interpolate`). Returns the model and
    ``{"alpha": α, "scores": [[α, score], …]}``; `score` must measure a validation set, never the test set."""
    alphas = sorted({_alpha(a) for a in grid})
    if not alphas:
        raise LatePhaseError("choose_alpha needs at least one α in the grid")
    _check_reiterable(data)
    _check_pair(start, finetuned)
    scores = [[a, _score(score, interpolate(start, finetuned, a, data=data, num_batches=num_batches,
                                            input_fn=input_fn), f"α = {a:g}")] for a in alphas]
    alpha = max(scores, key=lambda row: (row[1], -row[0]))[0]
    return (interpolate(start, finetuned, alpha, data=data, num_batches=num_batches, input_fn=input_fn),
            {"alpha": alpha, "scores": scores})


# --------------------------------------------------------------------------------------------------------------------
# both, as the fine-tuner and `lpconvert collapse` apply them
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """How an exported model is made beyond the Eq.-1 average (``--soup``, ``--interpolate``): `evaluate` measures a
    model on the run's validation set (metric name → number; ``"top1"`` is the score), `start` builds the run's
    starting model. `record` is filled in by :func:`lpconvert.publish.export.export_model`."""

    soup: str = "uniform"
    interpolate: float | str | None = None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    start: Callable[[], nn.Module] | None = None
    record: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.soup not in SOUPS:
            raise LatePhaseError(f"--soup must be one of {', '.join(SOUPS)}, got {self.soup!r}")
        self.interpolate = parse_alpha(self.interpolate)

    @property
    def changes(self) -> bool:
        """Whether the model differs from (or may differ from) the uniform average."""
        return self.soup != "uniform" or self.interpolate is not None

    @property
    def needs_data(self) -> bool:
        """Whether it chooses on validation data (a greedy soup, or α = auto)."""
        return self.soup == "greedy" or self.interpolate == "auto"


def soup_and_interpolate(late_model: nn.Module, selection: Selection, *, bn_stats: str = "fold",
                         data: Iterable | None = None,
                         num_batches: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The members averaged as `selection` says — all of them (Eq. 1) or a :func:`greedy_soup` — then, with
    ``selection.interpolate``, interpolated with the run's start (:func:`interpolate`, α given, or
    :func:`choose_alpha` for ``"auto"``). `data` are recalibration batches for ``bn_stats="recalibrate"``; then the
    interpolated model's BatchNorm statistics are re-estimated too, else interpolated.

    Returns the model and the record the model card and ``lpconvert.json`` state: ``{"soup", "K"}`` with
    :func:`greedy_soup`'s record for a greedy soup, and ``"interpolation": {"alpha", "chosen": "auto" | "given",
    "scores" (auto), "batchnorm": "interpolated" | "re-estimated" | None (no BatchNorm statistics, or α 0 or 1)}``."""
    _check_bn_stats(bn_stats, data)
    if selection.needs_data and selection.evaluate is None:
        raise LatePhaseError("--soup greedy and --interpolate auto choose on a validation set; none was given")
    score = (lambda model: selection.evaluate(model)["top1"]) if selection.evaluate is not None else None
    K = num_members(late_model)
    record: dict[str, Any] = {"soup": "uniform", "K": K}
    if selection.soup == "greedy" and K > 1:
        model, soup = greedy_soup(late_model, score, bn_stats=bn_stats, data=data, num_batches=num_batches)
        record = {"soup": "greedy", "K": K, **soup}
    else:
        if selection.soup == "greedy":
            record["note"] = "--soup greedy: the exported model has one member (K = 1), nothing to choose"
        model = collapse(late_model, bn_stats=bn_stats, data=data, num_batches=num_batches)
    if selection.interpolate is None:
        return model, record
    if selection.start is None:
        raise LatePhaseError("--interpolate needs the run's starting model; none was given")
    start = selection.start()
    recalibration = data if bn_stats == "recalibrate" else None
    if selection.interpolate == "auto":
        model, chosen = choose_alpha(start, model, score, data=recalibration, num_batches=num_batches)
        interpolation = {**chosen, "chosen": "auto"}
    else:
        model = interpolate(start, model, selection.interpolate, data=recalibration, num_batches=num_batches)
        interpolation = {"alpha": selection.interpolate, "chosen": "given"}
    has_statistics = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                         for m in model.modules())
    interior = 0.0 < interpolation["alpha"] < 1.0
    interpolation["batchnorm"] = (("re-estimated" if recalibration is not None else "interpolated")
                                  if has_statistics and interior else None)
    record["interpolation"] = interpolation
    return model, record


def describe(record: dict[str, Any] | None) -> str:
    """The record of :func:`soup_and_interpolate` in a few words, for protocols and logs."""
    if not record:
        return "all members averaged (Eq. 1)"
    if record.get("soup") == "greedy":
        text = (f"a greedy soup of members {', '.join(map(str, record['members']))} of K = {record['K']}")
    else:
        text = "all members averaged (Eq. 1)"
    interpolation = record.get("interpolation")
    if interpolation:
        how = "chosen on the validation set" if interpolation["chosen"] == "auto" else "given"
        text += f", interpolated with the starting model at α = {interpolation['alpha']:g} ({how})"
    return text
