"""Every way a model enters lpconvert.

:func:`load_model` builds an original-architecture model from a timm name (``resnet50``, ``resnet50.tv_in1k``),
a Hugging Face Hub repo (``hf-hub:ORG/NAME``), a torchvision name (``tv:resnet18``) or a local directory
(``local-dir:DIR`` or a plain path) written by :func:`lpconvert.checkpoint.save_pretrained` or
``timm.models.save_for_hf``, and says where it came from (:class:`ModelSource`); optionally it loads a local weights
file on top (:func:`load_weights`, :func:`read_state_dict`). Downloads that cannot happen fail at once, in one line.

Only safe formats are read: safetensors, or ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import os
import pickle
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from lpconvert.errors import LatePhaseError, is_network_error, one_line
from lpconvert.files import json_default, read_json_object, torch_load_weights_only
from lpconvert.model_card import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["ModelSource", "load_model", "load_weights", "read_state_dict"]


#: Seconds to wait when checking that a download host answers before handing the download to timm/torchvision.
PROBE_TIMEOUT_S = 5.0

_TORCH_SUFFIXES = (".pth", ".pt", ".th", ".bin")
_STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TRUE = {"1", "on", "yes", "true"}


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
    :func:`load_weights`). ``num_classes`` replaces the classifier (randomly initialised) when it differs.
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
        load_weights(model, weights)
        source.weights = str(Path(weights).expanduser().resolve())
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
        _ensure_downloadable(spec, _hub_endpoint(), _hub_cached(repo_id, revision or None, needed))
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
            _check_timm_download(spec, cfg)
        name = target
    try:
        model = timm.create_model(name, pretrained=download, num_classes=num_classes)
    except Exception as err:
        if is_network_error(err):
            raise LatePhaseError(_download_failed(spec, _describe_hub_error(err))) from err
        raise
    return model, source_from_timm(spec, model, kind if kind == "hf-hub" else "timm", download, hub_id)


def _check_timm_download(spec: str, cfg: Any) -> None:
    """Fail fast when timm has no weights for ``cfg`` or cannot download them."""
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        raise LatePhaseError(
            f"timm has no pretrained weights for '{spec}'; pass --weights PATH, a local directory, "
            "or disable pretrained weights to start from random initialisation"
        )
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
        _ensure_downloadable(spec, _hub_endpoint(), _hub_cached(repo_id, revision or None, [files]))
    elif cfg.url:
        _ensure_downloadable(spec, cfg.url, _torch_hub_cached(cfg.url))


def _load_torchvision(spec: str, name: str, num_classes: int | None, download: bool) -> tuple[nn.Module, ModelSource]:
    tv = _torchvision_models()
    if name not in tv.list_models(module=tv):
        raise _unknown_model(spec, _all_model_names())
    if not download:
        model = tv.get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}))
        n = num_classes or inspect.signature(type(model)).parameters["num_classes"].default
        return model, _torchvision_source(spec, name, model, n, pretrained=False)

    enum = tv.get_model_weights(name).DEFAULT
    _ensure_downloadable(spec, enum.url, _torch_hub_cached(enum.url))
    try:
        with _force_weights_only_loads():
            model = tv.get_model(name, weights=enum)
    except pickle.UnpicklingError as err:
        raise LatePhaseError(
            f"the torchvision weights file {_torch_hub_file(enum.url)} is not a plain weights file; delete it "
            "so that it is downloaded again"
        ) from err
    except Exception as err:
        if is_network_error(err):
            raise LatePhaseError(_download_failed(spec, one_line(err))) from err
        raise
    n_pretrained = len(enum.meta["categories"])
    if num_classes is not None and num_classes != n_pretrained:
        target = tv.get_model(name, weights=None, num_classes=num_classes, **_torchvision_extra_args(model))
        _copy_all_but_head(model.state_dict(), target, spec)
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


def _copy_all_but_head(state_dict: Mapping[str, torch.Tensor], model: nn.Module, spec: str) -> None:
    """Copy every tensor whose shape matches; only the (re-initialised) classifier may differ."""
    target = model.state_dict()
    if set(target) != set(state_dict):
        raise LatePhaseError(f"cannot give '{spec}' a new number of classes; load it with its original num_classes")
    same = {k: v for k, v in state_dict.items() if v.shape == target[k].shape}
    model.load_state_dict(same, strict=False)


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
            _copy_all_but_head(state_dict, model, spec)
        else:
            _load_checked(model, state_dict, weights_file, source.architecture)
    return model, source


def _find_dir_weights(path: Path) -> Path:
    for name in (WEIGHTS_NAME, "pytorch_model.bin", "pytorch_model.pth", "model.pth"):
        if (path / name).is_file():
            return path / name
    raise LatePhaseError(f"{path} has no weights file ({WEIGHTS_NAME} or pytorch_model.bin); re-export the directory")


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


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local weights file (see :func:`read_state_dict`) into ``model``; keys and shapes must match."""
    return _load_checked(model, read_state_dict(path), Path(path), type(model).__name__)


def _load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str) -> nn.Module:
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


# ---------------------------------------------------------------------------------------------------------------------
# Downloads: fail fast and in one line


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_cached(repo_id: str, revision: str | None, needed: Sequence[Sequence[str]]) -> bool:
    """True when, for every group of alternative file names, one is in the local Hub cache."""
    from huggingface_hub import try_to_load_from_cache

    return all(
        any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str) for f in group) for group in needed
    )


def _torch_hub_file(url: str) -> Path:
    """Where torch.hub (used by torchvision and timm URL weights) caches ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)


def _torch_hub_cached(url: str) -> bool:
    return _torch_hub_file(url).is_file()


def _download_failed(spec: str, reason: str) -> str:
    return (
        f"cannot download the pretrained weights of '{spec}' ({reason}); "
        "pass --weights PATH with a local .safetensors/.pth file, or a local model directory"
    )


def _ensure_downloadable(spec: str, url: str, cached: bool) -> None:
    """Raise at once, instead of after minutes of retries, when a needed download cannot happen."""
    if cached:
        return
    if _offline():
        raise LatePhaseError(_download_failed(spec, "offline mode is on (HF_HUB_OFFLINE) and they are not cached"))
    parts = urllib.parse.urlparse(url)
    root = f"{parts.scheme}://{parts.netloc}/"
    try:
        urllib.request.urlopen(urllib.request.Request(root, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the host answered
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise LatePhaseError(_download_failed(spec, f"{parts.netloc} is unreachable: {one_line(reason)}")) from err


def _describe_hub_error(err: BaseException) -> str:
    from huggingface_hub import errors

    if isinstance(err, errors.RepositoryNotFoundError):
        return "the Hub repository does not exist, or it is private or gated and no valid token was given"
    if isinstance(err, errors.RevisionNotFoundError):
        return "the requested revision does not exist"
    if isinstance(err, errors.RemoteEntryNotFoundError):
        name = str(err.response.url).rsplit("/", 1)[-1] if err.response is not None else "a file"
        return f"the repository has no {name}; it is not a timm model repository"
    if isinstance(err, errors.LocalEntryNotFoundError):
        return "the Hub is unreachable and the files are not cached"
    return one_line(err)


@contextlib.contextmanager
def _force_weights_only_loads() -> Iterator[None]:
    """Make torch.load weights-only inside library code that asks for a full unpickle (torchvision downloads)."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
