"""Back to the original architecture: weight averaging (Eq. 1), single members, and non-averaged ensembles."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lpconvert.convert.late_phase_config import ATTRIBUTE
from lpconvert.convert.members import late_phase_layers, num_members, select_members, set_submodule
from lpconvert.errors import LatePhaseError
from lpconvert.layers import BN_STATS_MODES


def _layers_or_error(model: nn.Module) -> dict:
    layers = late_phase_layers(model)
    if not layers:
        raise LatePhaseError("this model was never converted (it has no late-phase layers); nothing to collapse")
    return layers


def _default_input(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise LatePhaseError(
        f"cannot find the model input in a batch of type {type(batch).__name__}; pass input_fn=lambda batch: ..."
    )


def first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The layer a model's input enters, where it can be found: timm's ``pretrained_cfg["first_conv"]``, else the
    first convolution the model holds, else (a model without one) its first linear layer; None without either."""
    layers = dict(model.named_modules())
    stated = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    for kind in (nn.modules.conv._ConvNd, nn.Linear):
        for name in ([stated] if isinstance(stated, str) else list(stated or ())):
            if isinstance(layers.get(name), kind):
                return name, layers[name]
    for kind in (nn.modules.conv._ConvNd, nn.Linear):
        found = next(((name, layer) for name, layer in layers.items() if isinstance(layer, kind)), None)
        if found is not None:
            return found
    return None


def input_mismatch(model: nn.Module, shape: Sequence[int]) -> str | None:
    """Why one input of `shape` (C, H, W) cannot enter `model`, or None: its first layer (:func:`first_layer`) takes
    another number of channels (a convolution) or of features (a linear layer, of the flattened input)."""
    found = first_layer(model)
    if found is None:
        return None
    name, layer = found
    if isinstance(layer, nn.Linear):
        wanted, given, what = layer.in_features, math.prod(shape), "input features"
    else:
        wanted, given, what = layer.in_channels, shape[0], "channels"
    if wanted in (0, given):  # 0: a lazy layer, which takes what comes
        return None
    return f"its first layer {name} takes {wanted} {what}, not {given}"


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module,
    data: Iterable,
    *,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm layer with one pass over `data` (cumulative average of
    the first `num_batches` batches, all when None).

    Like ``torch.optim.swa_utils.update_bn`` but for any ``_BatchNorm`` subclass (timm's norm-act layers included),
    with the rest of the model in eval mode (dropout off) and any batch structure through `input_fn`. The fine-tuner,
    ``lpconvert collapse`` and ``lpconvert evaluate`` all pass :func:`lpconvert.data.recalibration_loader`: the
    run's training images with their training augmentation, epoch 0's order of the run's seed, the run's batch size,
    ``--recalibrate-batches`` (default 100) batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    input_fn = input_fn or _default_input
    batches = iter(data)
    first = next(batches, None)
    if first is not None:  # images that cannot enter the model: one line, before any statistic is touched
        _check_recalibration_input(model, input_fn(first))
        batches = itertools.chain([first], batches)
    device = next(model.parameters()).device
    was_training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            x = input_fn(batch)
            model(x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x)
            seen += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in was_training.items():
            m.training = training
    if seen == 0:
        raise LatePhaseError("bn_stats='recalibrate' got no batches from the data; pass a non-empty loader")
    return model


def _check_recalibration_input(model: nn.Module, x: Any) -> None:
    """Refuse a batch of images (N, C, H, W) that the model's first layer does not take (:func:`input_mismatch`)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return
    problem = input_mismatch(model, tuple(x.shape[1:]))
    if problem is not None:
        raise LatePhaseError(f"BatchNorm recalibration: the data gives {'×'.join(map(str, x.shape[1:]))} images, which "
                             f"do not fit the model ({problem}); recalibrate on images like its training images "
                             "(--data: the run's training data), or use --bn-stats fold")


def collapse(
    model: nn.Module,
    bn_stats: str = "fold",
    data: Iterable | None = None,
    *,
    inplace: bool = False,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
) -> nn.Module:
    """Average the members into ONE model of the original architecture (Eq. 1: w̄ = h(θ, mean_k φ_k)).

    The result has the original classes and exactly the state_dict keys of the model before :func:`convert`, so it
    loads with ``strict=True`` into a freshly constructed model. Each layer's members are averaged by its kind, as
    φ_1 + mean_k(φ_k − φ_1) in float64: identical members give back the original tensors bit for bit. BatchNorm
    statistics of the averaged model:

    - ``"fold"`` (default): the members' mean statistics μ' = mean_k μ_k, v' = mean_k v_k, and
      γ' = mean_k γ_k √(v'+ε)/√(v_k+ε), β' = mean_k (β_k + γ_k (μ' − μ_k)/√(v_k+ε)): in eval mode each BN outputs
      exactly the average of its members' outputs, in train mode it normalises with batch statistics like the
      Eq.-1 model (:meth:`~lpconvert.layers.LatePhaseBatchNorm.fold_tensors`);
    - ``"mean"``: γ, β and the members' running statistics are averaged;
    - ``"recalibrate"``: statistics re-estimated with a pass over `data` (every BN layer of the model); give it
      training images WITH the training augmentation — statistics of un-augmented images cost the shared CIFAR-10
      ResNet-20 3 points of test accuracy.

    Works on a copy unless ``inplace=True``.

    >>> averaged = lpconvert.collapse(model, bn_stats="recalibrate", data=train_loader)
    """
    if bn_stats not in BN_STATS_MODES:
        raise LatePhaseError(f"unknown bn_stats {bn_stats!r}; choose from {', '.join(BN_STATS_MODES)}")
    if bn_stats == "recalibrate" and data is None:
        raise LatePhaseError("bn_stats='recalibrate' needs data to re-estimate the statistics (pass data=loader)")
    layers = _layers_or_error(model)
    if not inplace:
        model = copy.deepcopy(model)
        layers = late_phase_layers(model)
    originals = {name: layer.collapse(bn_stats=bn_stats) for name, layer in layers.items()}
    for name, module in originals.items():
        set_submodule(model, name, module)
    model.__dict__.pop(ATTRIBUTE, None)
    if bn_stats == "recalibrate":
        recalibrate_batch_norm(model, data, input_fn=input_fn, num_batches=num_batches)
    return model


def unload(model: nn.Module, k: int, *, inplace: bool = False) -> nn.Module:
    """The original architecture holding member k alone (``collapse`` for a single member)."""
    layers = _layers_or_error(model)
    K = num_members(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < K:
        raise LatePhaseError(f"member index must be an integer in [0, {K - 1}], got {k!r}")
    if not inplace:
        model = copy.deepcopy(model)
        layers = late_phase_layers(model)
    for name, layer in layers.items():
        set_submodule(model, name, layer.unload(k))
    model.__dict__.pop(ATTRIBUTE, None)
    return model


@torch.no_grad()
def ensemble_predict(model: nn.Module, x: torch.Tensor, members: Iterable[int] | None = None) -> torch.Tensor:
    """Non-averaged ensemble (paper Table 4): the mean of the members' softmax outputs, in eval mode."""
    _layers_or_error(model)
    members = list(range(num_members(model))) if members is None else list(members)
    was_training = model.training
    model.eval()
    try:
        probs = None
        for k in members:
            select_members(model, k)
            p = model(x).float().softmax(-1)
            probs = p if probs is None else probs + p
    finally:
        select_members(model, 0)
        model.train(was_training)
    return probs / len(members)
