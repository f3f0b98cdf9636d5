"""One dataclass for a fine-tuning run: every hyper-parameter of Algorithm 1 and of the loop around it.

Defaults are the paper's ImageNet recipe (§4, Table 5): SGD with momentum 0.9, weight decay 1e-4, batch 256,
lr 0.001 dropping ×0.1 at epoch 10, 20 epochs, K = 10, σ0 = 0, γθ = 1/K, late-phase BatchNorm only.
A recipe file (YAML or TOML, see ``zoo/``) sets any of these fields; command-line flags override it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LatePhaseError
from .surgery import DEFAULT_TARGETS, resolve_kinds

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "linear", "cosine", "constant")
MODES = ("auto", "sequential", "vectorized")
AMP_MODES = ("auto", "bf16", "fp16", "off")
SELECT = ("best", "last")


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

    def validate(self) -> "FinetuneConfig":
        """Check every field once; raise a one-line :class:`LatePhaseError` naming the flag."""
        positive = {"K": self.K, "epochs": self.epochs, "batch-size": self.batch_size, "log-every": self.log_every,
                    "recalibrate-batches": self.recalibrate_batches, "accumulate": self.accumulate}
        for flag, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LatePhaseError(f"--{flag} must be a positive integer, got {value!r}")
        for flag, value in {"t0": self.t0, "checkpoint-every": self.checkpoint_every, "workers": self.workers}.items():
            if value < 0:
                raise LatePhaseError(f"--{flag} must be 0 or more, got {value}")
        if self.accumulate > 1 and self.K > 1:
            raise LatePhaseError("--accumulate is the K = 1 control (θ accumulated over M minibatches); use it with --K 1")
        if self.t0 >= self.epochs:
            raise LatePhaseError(f"--t0 {self.t0} must be smaller than --epochs {self.epochs}")
        if self.lr <= 0 or (self.member_lr is not None and self.member_lr <= 0):
            raise LatePhaseError("learning rates must be positive")
        if self.sigma0 < 0:
            raise LatePhaseError(f"--sigma0 must be >= 0, got {self.sigma0}")
        choices = {
            "optimizer": (self.optimizer, OPTIMIZERS),
            "member-optimizer": (self.member_optimizer or self.optimizer, OPTIMIZERS),
            "schedule": (self.schedule, SCHEDULES),
            "mode": (self.mode, MODES),
            "amp": (self.amp, AMP_MODES),
            "select": (self.select, SELECT),
            "bn-stats": (self.bn_stats, ("fold", "mean", "recalibrate")),
        }
        for flag, (value, allowed) in choices.items():
            if value not in allowed:
                raise LatePhaseError(f"--{flag} {value!r} is not one of {', '.join(allowed)}")
        resolve_kinds(self.late_phase)
        if self.swa_start is not None and not 0 <= self.swa_start < self.epochs:
            raise LatePhaseError(f"--swa-start {self.swa_start} must lie in [0, {self.epochs})")
        if self.group_size is not None and self.group_size < 1:
            raise LatePhaseError(f"--group-size must be >= 1, got {self.group_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FinetuneConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise LatePhaseError(f"unknown setting(s) {', '.join(unknown)}; see `lpconvert finetune --help`")
        cleaned = {}
        for key, value in values.items():
            default = names[key].default
            cleaned[key] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
            if isinstance(default, tuple) and isinstance(value, str):
                cleaned[key] = tuple(v.strip() for v in value.split(",") if v.strip())
        return cls(**cleaned)


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
    return {k.replace("-", "_"): v for k, v in settings.items() if k not in ("paper", "measured", "description", "name")}


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

