"""T0: the switch from one member to K (Algorithm 1's late phase begins).

Before T0 a run trains one member (K = 1, plain training in late-phase form). At T0 that member is collapsed back
into the original layers (exact for K = 1) and the late-phase layers of `config` are injected around it by name,
members initialised by Eq. 2, φ_k = φ0 + σ0 ‖φ0‖/√D ε_k. The new engine takes over U_θ's state, so the shared weights
keep their momentum across T0; each member starts from the single member's U_φ state when U_φ keeps its class.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from lpconvert.collapse.average import collapse
from lpconvert.convert.late_phase_config import LatePhaseConfig
from lpconvert.convert.surgery import convert_from_config
from lpconvert.train.engine import LatePhaseEngine
from lpconvert.train.optim import optimizer_state

__all__ = ["enter_late_phase"]


def enter_late_phase(
    model: nn.Module,
    engine: LatePhaseEngine,
    config: LatePhaseConfig,
    build_engine: Callable[[nn.Module], LatePhaseEngine],
    *,
    carry_member_state: bool = True,
    theta_state: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[nn.Module, LatePhaseEngine]:
    """Turn `model` (a late-phase model with one member, trained by `engine`) into the K-member model of `config`, in
    place, and return it with its new engine from ``build_engine(model)``.

    U_θ's state carries over (through `theta_state` when the parametrisation of θ changes at the collapse, e.g. a
    rank-1 factor folded into its weight); with `carry_member_state` every member starts from the single member's
    U_φ state (when the optimizer class is the same). The new engine keeps its own settings (learning rates, weight
    decay …): only the optimizers' buffers are carried."""
    model = collapse(model, bn_stats="mean", inplace=True)
    convert_from_config(model, config)
    new = build_engine(model)
    if engine.theta_optimizer is not None and new.theta_optimizer is not None:
        saved = engine.theta_optimizer.state_dict()
        new.theta_optimizer.load_state_dict(optimizer_state(theta_state(saved) if theta_state else saved,
                                                            new.theta_optimizer))
    if carry_member_state:
        single = engine.member_optimizers[0]
        for optimizer in new.member_optimizers:
            if type(optimizer) is type(single):
                optimizer.load_state_dict(optimizer_state(single.state_dict(), optimizer))
    return model, new
