"""What a late-phase model is: K, the exact layers and their kinds, how the members were initialised.

Like PEFT's adapter config, it is a dataclass saved as JSON beside the members (in run checkpoints) and attached to
the converted model (``model.late_phase_config``); :func:`lpconvert.convert_from_config` re-injects the layers by
their exact names without tracing the model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lpconvert.errors import LatePhaseError
from lpconvert.version import lpconvert_version

ATTRIBUTE = "late_phase_config"


@dataclass(frozen=True)
class LatePhaseTarget:
    """One target of a kind: a module, or a group of modules that share state (in module order)."""

    kind: str
    modules: tuple[str, ...]


@dataclass
class LatePhaseConfig:
    """K members of the late-phase weights of `targets`, initialised by Eq. 2 with σ0 = `sigma0` from `seed`;
    `options` are per-kind options (``{"rank1": {"input_weights": True}}``; from :func:`lpconvert.plan`, every option
    of the converted kinds), checked against the kinds' declarations when the layers are built."""

    K: int
    targets: list[LatePhaseTarget]
    sigma0: float = 0.0
    seed: int | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    lpconvert_version: str = field(default_factory=lpconvert_version)

    @property
    def layers(self) -> dict[str, str]:
        """Qualified module name → kind, in module order."""
        return {name: target.kind for target in self.targets for name in target.modules}

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(target.kind for target in self.targets))

    def to_dict(self) -> dict[str, Any]:
        return {
            "K": self.K,
            "targets": [{"kind": t.kind, "modules": list(t.modules)} for t in self.targets],
            "sigma0": self.sigma0,
            "seed": self.seed,
            "options": self.options,
            "lpconvert_version": self.lpconvert_version,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LatePhaseConfig:
        """Read a saved config; the bare ``{"K", "layers": {name: kind}}`` of lpconvert 0.1 runs is accepted too."""
        try:
            if "targets" in values:
                targets = [LatePhaseTarget(str(t["kind"]), tuple(t["modules"])) for t in values["targets"]]
            else:
                targets = [LatePhaseTarget(kind, (name,)) for name, kind in values["layers"].items()]
            return cls(K=int(values["K"]), targets=targets, sigma0=float(values.get("sigma0", 0.0)),
                       seed=values.get("seed"), options=dict(values.get("options") or {}),
                       lpconvert_version=str(values.get("lpconvert_version", "0.1.0")))
        except (KeyError, TypeError, ValueError) as err:
            raise LatePhaseError(f"not a late-phase configuration ({type(err).__name__}: {err}); re-create the run") from err


def late_phase_config(model: nn.Module) -> LatePhaseConfig:
    """The configuration of a model converted by :func:`lpconvert.convert`."""
    config = getattr(model, ATTRIBUTE, None)
    if not isinstance(config, LatePhaseConfig):
        raise LatePhaseError("this model has no late-phase layers; run lpconvert.convert(model, K=...) first")
    return config
