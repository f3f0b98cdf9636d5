"""A converted model at run time: its late-phase layers, K, which members the next forward pass runs, and swapping a
layer in by qualified name."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from lpconvert.convert.late_phase_config import late_phase_config
from lpconvert.errors import LatePhaseError
from lpconvert.layers import LatePhaseLayer


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def late_phase_layers(model: nn.Module) -> dict[str, LatePhaseLayer]:
    """The late-phase layers of a converted model by qualified name (empty for a model never converted)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LatePhaseLayer)}


def num_members(model: nn.Module) -> int:
    """K of a converted model."""
    return late_phase_config(model).K


def select_members(model: nn.Module, members: int | Sequence[int], sizes: Sequence[int] | None = None) -> None:
    """Choose the member(s) that the next forward runs: one index, or G indices for a batch of G slices (equal, or
    ``sizes[g]`` rows for member ``members[g]``)."""
    layers = late_phase_layers(model)
    if not layers:
        raise LatePhaseError("this model has no late-phase layers; run lpconvert.convert(model, K=...) first")
    members = [members] if isinstance(members, int) else list(members)
    for selection in {id(layer.selection): layer.selection for layer in layers.values()}.values():
        selection.select(members, sizes)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in `model` under the qualified name `name` (a late-phase layer in, or the original layer back)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
