"""One dataclass for a fine-tuning run: every hyper-parameter of Algorithm 1 and of the loop around it.

Defaults are the paper's ImageNet recipe (§4, Table 5): SGD with momentum 0.9, weight decay 1e-4, batch 256,
lr 0.001 dropping ×0.1 at epoch 10, 20 epochs, K = 10, σ0 = 0, γθ = 1/K, late-phase BatchNorm only.
A recipe file (YAML or TOML, see ``zoo/``) sets any of these fields but ``force``; command-line flags override it.
Every value is coerced to its field's type or refused, then checked for range and against the other fields, whether
it came from a flag, a recipe or Python code.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LatePhaseError
from .layers import BN_STATS_MODES
from .surgery import DEFAULT_TARGETS, resolve_kinds

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "linear", "cosine", "constant")
MODES = ("auto", "sequential", "vectorized")
AMP_MODES = ("auto", "bf16", "fp16", "off")
SELECT = ("best", "last")
TRAIN_TRANSFORMS = ("auto", "timm", "cifar")
#: Settings that only the command line may set: a recipe cannot make lpconvert replace anything.
COMMAND_LINE_ONLY = ("force",)


@dataclass
class FinetuneConfig:
    # model
    model: str = "resnet152"
    weights: str | None = None
    num_classes: int | None = None
    pretrained: bool = True
    # data
    data: str | None = None
    train_dir: str | None = None
    val_dir: str | None = None
    train_subset: int | None = None
    val_subset: int | None = None
    subset_seed: int = 0
    train_transform: str = "auto"
    workers: int = 4
    # late-phase weights (Algorithm 1)
    K: int = 10
    late_phase: tuple[str, ...] = DEFAULT_TARGETS
    late_phase_options: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    sigma0: float = 0.0
    gamma_theta: float | None = None
    t0: int = 0
    accumulate: int = 1
    # optimisation: U_θ, and U_φ where the member_* fields differ
    epochs: int = 20
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.001
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    member_optimizer: str | None = None
    member_lr: float | None = None
    member_weight_decay: float | None = None
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (10,)
    lr_gamma: float = 0.1
    lr_end: float = 0.0
    anneal_start: float = 0.0
    anneal_end: float | None = None
    swa_start: int | None = None
    swa_lr: float | None = None
    # execution
    mode: str = "auto"
    group_size: int | None = None
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    sync_bn: bool = False
    # bookkeeping
    seed: int = 0
    output: str | None = None
    bn_stats: str = "fold"
    recalibrate_batches: int = 100
    select: str = "best"
    checkpoint_every: int = 0
    log_every: int = 50
    resume: str | None = None
    force: bool = False
    quiet: bool = False
    push_to_hub: str | None = None
    allow_regression: bool = False

    def __post_init__(self) -> None:
        """Coerce every field to its declared type (refusing what cannot be), then :meth:`validate`."""
        for name, hint in field_types().items():
            setattr(self, name, _coerce(name, getattr(self, name), hint))
        self.validate()

    def validate(self) -> FinetuneConfig:
        """Ranges, finiteness and rules between fields; a one-line :class:`LatePhaseError` naming the flag."""
        for name in ("K", "epochs", "batch_size", "log_every", "recalibrate_batches", "accumulate"):
            self._require(name, getattr(self, name) >= 1, "must be a positive integer")
        for name in ("t0", "checkpoint_every", "workers", "seed", "subset_seed"):
            self._require(name, getattr(self, name) >= 0, "must be 0 or more")
        for name in ("train_subset", "val_subset", "num_classes", "group_size"):
            self._require(name, getattr(self, name) is None or getattr(self, name) >= 1, "must be a positive integer")
        for name in ("lr", "member_lr", "gamma_theta", "lr_gamma", "swa_lr"):
            self._require(name, getattr(self, name) is None or getattr(self, name) > 0, "must be a positive number")
        for name in ("weight_decay", "member_weight_decay", "sigma0", "lr_end", "anneal_start"):
            self._require(name, getattr(self, name) is None or getattr(self, name) >= 0, "must be 0 or more")
        self._require("momentum", 0 <= self.momentum < 1, "must lie in [0, 1)")
        self._require("nesterov", not self.nesterov or self.momentum > 0, "needs --momentum > 0")
        self._require("t0", self.t0 < self.epochs, f"must be smaller than --epochs {self.epochs}")
        self._require("accumulate", self.accumulate == 1 or self.K == 1,
                      "is the K = 1 control (θ accumulated over M minibatches); use it with --K 1")
        self._require("milestones", all(m > 0 for m in self.milestones), "must be positive epochs")
        if self.schedule == "linear":
            self._require("anneal_end", self.anneal_end is None or self.anneal_start < self.anneal_end <= self.epochs,
                          f"must lie in (--anneal-start {self.anneal_start}, --epochs {self.epochs}]")
        self._require("swa_start", self.swa_start is None or 0 <= self.swa_start < self.epochs,
                      f"must lie in [0, {self.epochs})")
        self._require("swa_start", self.swa_start is None or self.swa_start >= self.t0,
                      f"must not come before --t0 {self.t0} (SWA averages the late-phase model)")
        self._require("swa_lr", self.swa_lr is None or self.swa_start is not None, "needs --swa-start")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            self._require(name, value is None or value in allowed, f"is not one of {', '.join(allowed)}")
        self._require("device", _is_device(self.device), "must be auto, cpu, cuda or cuda:N")
        kinds = resolve_kinds(self.late_phase)
        unused = [kind for kind in self.kind_options() if kind not in kinds]
        self._require("late_phase_options", not unused, f"name kinds that --late-phase converts ({', '.join(kinds)})")
        if self.push_to_hub is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.push_to_hub)
            except HFValidationError:
                self._require("push_to_hub", False, "is not a Hub repository id; use NAMESPACE/NAME (alice/resnet-lpw)")
        return self

    def kind_options(self) -> dict[str, dict[str, Any]]:
        """``--late-phase-options hypernet.rank=4,rank1.input_weights=true`` as ``{kind: {option: value}}`` (values
        read as int, float, true/false, else text)."""
        options: dict[str, dict[str, Any]] = {}
        for item in self.late_phase_options:
            key, sep, text = item.partition("=")
            kind, dot, name = key.strip().partition(".")
            if not (sep and dot and kind and name):
                raise LatePhaseError(f"--late-phase-options takes KIND.OPTION=VALUE items such as hypernet.rank=4, "
                                     f"got {item!r}")
            options.setdefault(kind, {})[name] = _literal(text.strip())
        return options

    def _require(self, name: str, ok: bool, problem: str) -> None:
        if not ok:
            raise LatePhaseError(f"{flag(name)} {problem}, got {_shown(getattr(self, name))}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """A config from a mapping (recipe, saved run); unknown keys are refused, values coerced or refused."""
        unknown = sorted(set(values) - set(field_types()))
        if unknown:
            raise LatePhaseError(f"unknown setting(s) {', '.join(unknown)}; see `lpconvert finetune --help`")
        return cls(**values)


CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": OPTIMIZERS,
    "member_optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "mode": MODES,
    "amp": AMP_MODES,
    "select": SELECT,
    "bn_stats": BN_STATS_MODES,
    "train_transform": TRAIN_TRANSFORMS,
}


def flag(name: str) -> str:
    """The command-line flag of a setting: ``batch_size`` → ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _literal(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return repr(value) if isinstance(value, str) else str(value)


def _is_device(value: str) -> bool:
    if value == "auto":
        return True
    try:
        return torch.device(value).type in ("cpu", "cuda", "mps")
    except (RuntimeError, ValueError):
        return False


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(FinetuneConfig)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` says: ints from integral numbers or digit strings, finite floats from numbers or
    numeric strings (YAML reads ``1e-3`` as a string), tuples from lists or comma-separated strings, a scalar as a
    1-tuple; anything else is refused naming the flag."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise LatePhaseError(f"{flag(name)} needs a value")
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(name, v.strip() if isinstance(v, str) else v, item) for v in items
                     if not (isinstance(v, str) and not v.strip()))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise LatePhaseError(f"{flag(name)} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise LatePhaseError(f"{flag(name)} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise LatePhaseError(f"{flag(name)} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LatePhaseError(f"{flag(name)} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise LatePhaseError(f"{flag(name)} must be a finite number, got {value}")
        return int(value) if name == "milestones" and float(value).is_integer() else float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise LatePhaseError(f"{flag(name)} must be a text value, got {value!r}")
    return value


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The settings of a recipe file (YAML or TOML); keys are FinetuneConfig fields (dashes allowed).

    A recipe may carry documentation under ``paper:`` / ``measured:`` / ``description:``; those are not settings."""
    path = Path(path)
    if not path.is_file():
        raise LatePhaseError(f"recipe {path} does not exist; `lpconvert zoo` lists the recipes that ship with lpconvert")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except Exception as exc:  # yaml.YAMLError / tomllib.TOMLDecodeError
        raise LatePhaseError(f"cannot parse recipe {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise LatePhaseError(f"recipe {path} must be a mapping of settings")
    settings = raw.get("settings", raw)
    if not isinstance(settings, dict):
        raise LatePhaseError(f"recipe {path}: 'settings' must be a mapping of settings")
    settings = {str(k).replace("-", "_"): v for k, v in settings.items()
                if k not in ("paper", "measured", "description", "name")}
    for name in COMMAND_LINE_ONLY:
        if name in settings:
            raise LatePhaseError(f"recipe {path} sets '{name}'; that can only come from the command line ({flag(name)})")
    return settings


ZOO = Path(__file__).resolve().parents[1] / "zoo"  # the recipes of a source checkout


def list_recipes(folder: Path = ZOO) -> list[dict[str, Any]]:
    """Name, file, description and the paper's / measured numbers of every recipe in `folder`."""
    import yaml

    if not folder.is_dir():
        raise LatePhaseError(f"no recipe folder at {folder}; the zoo ships with the source checkout of lpconvert")
    recipes = []
    for path in sorted(folder.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        recipes.append({"name": raw.get("name", path.stem), "file": str(path), "paper": raw.get("paper"),
                        "measured": raw.get("measured"), "description": " ".join(str(raw.get("description", "")).split())})
    return recipes

