"""Reading weights files into a model: safe formats only, with every mismatch explained in one line.

:func:`read_state_dict` reads ``.safetensors`` or a weights-only pickle (``.pth/.pt/.th/.bin``), unwrapping the usual
containers and prefixes; :func:`load_weights` loads it into a model — keys and shapes must match, except a classifier
of another size when the caller asks for a new head; :func:`check_weights` (a model) and :func:`check_tensors` (named
tensors, e.g. a file's) refuse non-finite values and negative BatchNorm variances.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from lpconvert.errors import LatePhaseError, one_line
from lpconvert.files import torch_load_weights_only

__all__ = ["broken_tensor", "check_tensors", "check_weights", "copy_all_but_head", "load_weights", "model_tensors",
           "read_state_dict"]

_TORCH_SUFFIXES = (".pth", ".pt", ".th", ".bin")
_STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def copy_all_but_head(state_dict: Mapping[str, torch.Tensor], model: nn.Module, spec: str) -> None:
    """Copy every tensor whose shape matches; only the (re-initialised) classifier — its weight and bias — may
    differ. BatchNorm counters absent from old checkpoints are fine."""
    target = model.state_dict()

    def keys(state: Mapping[str, torch.Tensor]) -> set[str]:
        return {k for k in state if not k.endswith("num_batches_tracked")}

    differing = [k for k in keys(target) & keys(state_dict) if state_dict[k].shape != target[k].shape]
    if keys(target) != keys(state_dict) or len(differing) > 2:
        raise LatePhaseError(
            f"the weights of '{spec}' do not fit this architecture with a new classifier (keys or more than the "
            "head's shapes differ); load it with its original num_classes"
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k in target and k not in differing}, strict=False)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a weights-only ``.pth/.pt/.th/.bin`` file, on CPU.

    Common wrappers (``{'state_dict': ...}``, ``{'model': ...}``, ``{'model_state_dict': ...}``) are unwrapped and
    ``module.`` / ``_orig_mod.`` prefixes (DataParallel, torch.compile) are stripped. Pickles holding anything but
    tensors and plain containers are refused.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LatePhaseError(f"weights file not found: {path}; pass an existing .safetensors or .pth file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(str(path), device="cpu")
        except (safetensors.SafetensorError, OSError, ValueError) as err:
            raise LatePhaseError(
                f"cannot read {path}: not a valid safetensors file ({one_line(err)}); it may be truncated, "
                "re-download or re-export it"
            ) from err
    elif suffix in _TORCH_SUFFIXES:
        state = _unwrap_state_dict(torch_load_weights_only(path), path)
    else:
        raise LatePhaseError(f"unsupported weights file {path}; use .safetensors, .pth, .pt, .th or .bin")
    return _strip_wrapper_prefixes(state)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _STATE_DICT_WRAPPERS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
        raise LatePhaseError(f"{path} holds no state dict (found: {keys}); save model.state_dict() and pass that file")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def load_weights(model: nn.Module, path: str | Path, *, new_head: bool = False) -> nn.Module:
    """Load a local weights file (see :func:`read_state_dict`) into ``model``; keys and shapes must match — with
    ``new_head`` (a ``num_classes`` asked for), tensors of another shape (the classifier) keep their new
    initialisation, as for the other model sources."""
    state = read_state_dict(path)
    parameters = dict(model.named_parameters())
    for key, tensor in state.items():
        if key in parameters and not tensor.is_floating_point():
            raise LatePhaseError(
                f"{path} holds {tensor.dtype} weights ({key}); lpconvert fine-tunes floating-point checkpoints, "
                "dequantize it first"
            )
    if new_head:
        copy_all_but_head(state, model, str(path))
        return model
    return load_checked(model, state, Path(path), type(model).__name__)


def check_weights(model: nn.Module, where: str, fix: str = "the checkpoint is broken") -> None:
    """Refuse a model whose parameters or buffers are broken (see :func:`broken_tensor`). (:func:`load_weights`
    refuses integer weights in the file: loading would silently turn a quantised checkpoint into a model at chance
    level.)"""
    check_tensors(model_tensors(model), where, fix)


def check_tensors(tensors: Iterable[tuple[str, torch.Tensor]], where: str, fix: str) -> None:
    """Refuse the first broken tensor (:func:`broken_tensor`) in one line: ``{where} holds … in NAME; {fix}``."""
    problem = broken_tensor(tensors)
    if problem is not None:
        raise LatePhaseError(f"{where} holds {problem}; {fix}")


def broken_tensor(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """What is wrong with the first broken tensor, naming it, or None: a floating-point tensor with a NaN or inf
    value, or a BatchNorm ``running_var`` (a late-phase layer's members alike) with a negative entry — normalising by
    its square root gives NaN outputs."""
    checked = [(name, tensor) for name, tensor in tensors if tensor.is_floating_point()]
    if not checked:
        return None
    device = checked[0][1].device
    no = torch.zeros((), dtype=torch.bool, device=device)
    flags = torch.stack([torch.stack((~torch.isfinite(tensor).all().to(device),
                                      (tensor < 0).any().to(device) if name.rsplit(".", 1)[-1] == "running_var" else no))
                         for name, tensor in checked]).tolist()  # one host sync for the whole model
    for (name, _), (non_finite, negative) in zip(checked, flags):
        if non_finite:
            return f"non-finite values (NaN or inf) in {name}"
        if negative:
            return f"a negative BatchNorm variance in {name}"
    return None


def model_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A model's parameters and buffers, by name."""
    return chain(model.named_parameters(), model.named_buffers())


def load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str) -> nn.Module:
    expected = model.state_dict()
    # BatchNorm counters are absent from old checkpoints and harmless to keep at their initial value
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        raise LatePhaseError(
            f"{path} does not fit {arch}: {'; '.join(parts)}; check that the file belongs to this architecture"
        )
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise LatePhaseError(
            f"{path} has tensors of the wrong shape for {arch} (file vs model: {_first(wrong)}); "
            "if only the classifier differs, pass the file's number of classes"
        )
    model.load_state_dict(state, strict=False)
    return model


def _first(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
