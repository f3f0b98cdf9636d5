"""Every way a model enters lpconvert.

:func:`load_model` builds an original-architecture model from a timm name (``resnet50``, ``resnet50.tv_in1k``),
a Hugging Face Hub repo (``hf-hub:ORG/NAME``), a torchvision name (``tv:resnet18``) or a local directory
(``local-dir:DIR`` or a plain path) written by :func:`lpconvert.publish.model_folder.save_pretrained` or
``timm.models.save_for_hf``, and says where it came from (:class:`ModelSource`); optionally it loads a local weights
file on top (:mod:`lpconvert.publish.weights`). Downloads that cannot happen fail at once, in one line
(:mod:`lpconvert.publish.downloads`); weights that are not floating point or not finite are refused.

Only safe formats are read: safetensors, or ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import difflib
import inspect
import json
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lpconvert.errors import LatePhaseError, is_network_error, one_line
from lpconvert.files import CONFIG_NAME, WEIGHTS_NAME, json_default, read_json_object
from lpconvert.publish.downloads import (
    check_timm_download,
    describe_hub_error,
    download_failed,
    ensure_downloadable,
    force_weights_only_loads,
    hub_cached,
    hub_endpoint,
    torch_hub_cached,
    torch_hub_file,
)
from lpconvert.publish.weights import check_weights, copy_all_but_head, load_checked, load_weights, read_state_dict

__all__ = ["ModelSource", "load_model"]


# ---------------------------------------------------------------------------------------------------------------------
# Provenance of a loaded model


@dataclass
class ModelSource:
    """Where a model came from; feeds the model card and ``lpconvert.json``.

    ``library`` is the framework that rebuilds the architecture (``"timm"`` or ``"torchvision"``); ``origin`` says
    where it was found (``"timm"`` registry, ``"hf-hub"``, ``"torchvision"`` or ``"local-dir"``).
    """

    spec: str
    library: str
    origin: str
    architecture: str
    num_classes: int | None = None
    pretrained: bool = False
    weights: str | None = None
    hub_id: str | None = None
    license: str | None = None
    pretrained_cfg: dict[str, Any] | None = None
    model_args: dict[str, Any] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        """Hub repo id of the base weights, when they came from the Hub and no local file replaced them."""
        return self.hub_id if self.pretrained and self.weights is None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return json.loads(json.dumps(asdict(self), default=json_default))



def _timm():
    import timm

    return timm



def _torchvision_models():
    import torchvision.models

    return torchvision.models



def source_from_timm(spec: str, model: nn.Module, origin: str, pretrained: bool, hub_id: str | None) -> ModelSource:
    cfg = {k: v for k, v in dict(getattr(model, "pretrained_cfg", {}) or {}).items() if k != "state_dict"}
    if hub_id is None and pretrained and origin == "timm":
        hub_id = (cfg.get("hf_hub_id") or "").split("@")[0] or None
    return ModelSource(
        spec=spec,
        library="timm",
        origin=origin,
        architecture=cfg.get("architecture") or type(model).__name__,
        num_classes=getattr(model, "num_classes", None),
        pretrained=pretrained,
        hub_id=hub_id,
        license=cfg.get("license"),
        pretrained_cfg=json.loads(json.dumps(cfg, default=json_default)),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_model(
    spec: str,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    pretrained: bool = True,
) -> tuple[nn.Module, ModelSource]:
    """Build an original-architecture model and describe where it came from.

    ``spec`` is a timm name (``resnet152``, ``resnet152.tv_in1k``, or a model lpconvert registered with timm),
    ``hf-hub:ORG/NAME``, ``tv:NAME`` (torchvision), or ``local-dir:DIR`` / a directory path. Pretrained weights are
    downloaded only when ``pretrained`` and no ``weights`` file is given; ``weights`` is then loaded on top (see
    :func:`lpconvert.publish.weights.load_weights`). ``num_classes`` replaces the classifier (randomly initialised) when it
    differs, whatever the source of the weights.
    """
    if num_classes is not None and (type(num_classes) is not int or num_classes < 1):
        raise LatePhaseError(f"num_classes must be a positive integer, got {num_classes!r}")
    spec = str(spec).strip()
    download = pretrained and weights is None
    kind, target = _parse_spec(spec)
    if kind == "local-dir":
        model, source = _load_local_dir(spec, Path(target).expanduser(), num_classes, load=download)
    elif kind == "torchvision":
        model, source = _load_torchvision(spec, target, num_classes, download)
    else:
        model, source = _load_timm(spec, kind, target, num_classes, download)
    if weights is not None:
        load_weights(model, weights, new_head=num_classes is not None)
        source.weights = str(Path(weights).expanduser().resolve())
    if weights is not None or download:
        check_weights(model, str(weights) if weights is not None else f"the weights of '{spec}'")
    return model, source


def _parse_spec(spec: str) -> tuple[str, str]:
    """Return (kind, target) with kind in {"timm", "hf-hub", "torchvision", "local-dir"}."""
    if not spec:
        raise LatePhaseError("empty model name; give a timm name (resnet50), tv:NAME, hf-hub:ORG/NAME or a directory")
    prefix, sep, rest = spec.partition(":")
    prefix = prefix.lower()
    if sep and prefix in ("local-dir", "hf-hub", "hf_hub", "tv", "torchvision"):
        if not rest:
            raise LatePhaseError(f"model name '{spec}' has nothing after '{prefix}:'; add the name or path")
        kind = {"hf_hub": "hf-hub", "tv": "torchvision"}.get(prefix, prefix)
        return kind, rest
    if Path(spec).expanduser().is_dir():
        return "local-dir", spec
    if any(c in spec for c in "/\\") or spec.startswith(("~", ".")):
        raise LatePhaseError(
            f"'{spec}' is neither a timm model name nor an existing directory; "
            f"use hf-hub:{spec} for a Hub repo or local-dir:PATH for a local folder"
        )
    return "timm", spec


def _unknown_model(spec: str, candidates: Sequence[str]) -> LatePhaseError:
    close = difflib.get_close_matches(spec, candidates, n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return LatePhaseError(
        f"unknown model '{spec}'; {hint}(timm names: timm.list_models('PATTERN'); torchvision names take a tv: prefix)"
    )


def _all_model_names() -> list[str]:
    timm = _timm()
    tv = _torchvision_models()
    return timm.list_models() + timm.list_pretrained() + ["tv:" + n for n in tv.list_models(module=tv)]


def _load_timm(
    spec: str, kind: str, target: str, num_classes: int | None, download: bool
) -> tuple[nn.Module, ModelSource]:
    timm = _timm()
    from timm.models import get_pretrained_cfg, is_model, split_model_name_tag

    hub_id = None
    if kind == "hf-hub":
        repo_id, _, revision = target.partition("@")
        hub_id = repo_id
        needed = [("config.json",)] + ([("model.safetensors", "pytorch_model.bin")] if download else [])
        ensure_downloadable(spec, hub_endpoint(), hub_cached(repo_id, revision or None, needed))
        name = f"hf-hub:{target}"
    else:
        arch, tag = split_model_name_tag(target)
        if not is_model(arch):
            raise _unknown_model(target, _all_model_names())
        if tag and target not in timm.list_pretrained(f"{arch}.*"):
            tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
            raise LatePhaseError(f"timm has no pretrained tag '{tag}' for {arch}; available: {tags}")
        if download:
            cfg = get_pretrained_cfg(target)
            check_timm_download(spec, cfg)
        name = target
    try:
        model = timm.create_model(name, pretrained=download, num_classes=num_classes)
    except Exception as err:
        if is_network_error(err):
            raise LatePhaseError(download_failed(spec, describe_hub_error(err))) from err
        raise
    return model, source_from_timm(spec, model, kind if kind == "hf-hub" else "timm", download, hub_id)


def _load_torchvision(spec: str, name: str, num_classes: int | None, download: bool) -> tuple[nn.Module, ModelSource]:
    tv = _torchvision_models()
    if name not in tv.list_models(module=tv):
        raise _unknown_model(spec, _all_model_names())
    if not download:
        model = tv.get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}))
        n = num_classes or inspect.signature(type(model)).parameters["num_classes"].default
        return model, _torchvision_source(spec, name, model, n, pretrained=False)

    enum = tv.get_model_weights(name).DEFAULT
    ensure_downloadable(spec, enum.url, torch_hub_cached(enum.url))
    try:
        with force_weights_only_loads():
            model = tv.get_model(name, weights=enum)
    except pickle.UnpicklingError as err:
        raise LatePhaseError(
            f"the torchvision weights file {torch_hub_file(enum.url)} is not a plain weights file; delete it "
            "so that it is downloaded again"
        ) from err
    except Exception as err:
        if is_network_error(err):
            raise LatePhaseError(download_failed(spec, one_line(err))) from err
        raise
    n_pretrained = len(enum.meta["categories"])
    if num_classes is not None and num_classes != n_pretrained:
        target = tv.get_model(name, weights=None, num_classes=num_classes, **_torchvision_extra_args(model))
        copy_all_but_head(model.state_dict(), target, spec)
        model = target
    return model, _torchvision_source(spec, name, model, num_classes or n_pretrained, pretrained=True)


def _torchvision_extra_args(model: nn.Module) -> dict[str, bool]:
    # googlenet / inception_v3: torchvision's pretrained builders change these constructor flags
    flags = ("transform_input", "aux_logits")
    return {k: getattr(model, k) for k in flags if isinstance(getattr(model, k, None), bool)}


def _torchvision_source(spec: str, name: str, model: nn.Module, num_classes: int, pretrained: bool) -> ModelSource:
    return ModelSource(
        spec=spec,
        library="torchvision",
        origin="torchvision",
        architecture=name,
        num_classes=num_classes,
        pretrained=pretrained,
        model_args={"num_classes": num_classes, **_torchvision_extra_args(model)},
    )


def _load_local_dir(spec: str, path: Path, num_classes: int | None, load: bool) -> tuple[nn.Module, ModelSource]:
    config_path = path / CONFIG_NAME
    if not path.is_dir():
        raise LatePhaseError(f"model directory not found: {path}; pass an existing directory")
    if not config_path.is_file():
        raise LatePhaseError(f"{path} has no {CONFIG_NAME}; pass a directory written by lpconvert or timm save_for_hf")
    config = read_json_object(config_path)
    library = config.get("library", "timm")
    if library == "torchvision":
        tv = _torchvision_models()
        arch = config.get("architecture")
        if arch not in tv.list_models(module=tv):
            raise LatePhaseError(f"{config_path} names an unknown torchvision architecture {arch!r}")
        saved_args = dict(config.get("model_args") or {"num_classes": config.get("num_classes")})
        model_args = {**saved_args, **({"num_classes": num_classes} if num_classes else {})}
        model = tv.get_model(arch, weights=None, **model_args)
        source = ModelSource(
            spec=spec, library="torchvision", origin="local-dir", architecture=arch,
            num_classes=model_args.get("num_classes"), pretrained=load, model_args=model_args,
        )
        saved_classes = saved_args.get("num_classes")
    elif library == "timm":
        if "architecture" not in config:
            raise LatePhaseError(f"{config_path} has no 'architecture'; it is not a timm model config")
        try:
            model = _timm().create_model(f"local-dir:{path}", pretrained=False, num_classes=num_classes)
        except RuntimeError as err:
            raise LatePhaseError(f"cannot build the model described by {config_path}: {one_line(err)}") from err
        source = source_from_timm(spec, model, "local-dir", load, None)
        saved_classes = config.get("num_classes")
    else:
        raise LatePhaseError(f"{config_path} has unknown library {library!r}; expected 'timm' or 'torchvision'")
    if load:
        weights_file = _find_dir_weights(path)
        state_dict = read_state_dict(weights_file)
        if saved_classes is not None and source.num_classes != saved_classes:
            copy_all_but_head(state_dict, model, spec)
        else:
            load_checked(model, state_dict, weights_file, source.architecture)
    return model, source


def _find_dir_weights(path: Path) -> Path:
    for name in (WEIGHTS_NAME, "pytorch_model.bin", "pytorch_model.pth", "model.pth"):
        if (path / name).is_file():
            return path / name
    raise LatePhaseError(f"{path} has no weights file ({WEIGHTS_NAME} or pytorch_model.bin); re-export the directory")


