"""The optimisation section of a run's settings: U_θ, U_φ, γθ, the learning-rate schedule, warm-up and SWA.

A run's full settings (:class:`lpconvert.config.FinetuneConfig`) keep these under their flag names;
:attr:`~lpconvert.config.FinetuneConfig.optim_settings` is this section of them. γθ, the late phase and the
minibatches per iteration are resolved here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["OptimSettings"]


@dataclass(frozen=True)
class OptimSettings:
    """U_θ (``optimizer``, ``lr``, ``momentum``, ``nesterov``, ``weight_decay``), U_φ (``member_*``: unset ones are
    U_θ's), γθ (``gamma_theta``, None: 1/K), the K members or the accumulation control (``K``, ``accumulate``), the
    schedule over ``epochs`` (``schedule`` with ``milestones``/``lr_gamma``, ``lr_end``, ``anneal_start``/``anneal_end``;
    ``warmup_epochs`` from ``warmup_lr``), SWA (``swa_start``, ``swa_lr``, ``swa_freq``, ``swa_anneal_epochs``), label ``smoothing``
    and ``clip_grad``. Every field is
    required: the defaults are the flags' (:class:`~lpconvert.config.FinetuneConfig`)."""

    K: int
    accumulate: int
    gamma_theta: float | None
    epochs: int
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    member_optimizer: str | None
    member_lr: float | None
    member_weight_decay: float | None
    schedule: str
    milestones: tuple[float, ...]
    lr_gamma: float
    lr_end: float
    anneal_start: float
    anneal_end: float | None
    warmup_epochs: float
    warmup_lr: float
    swa_start: int | None
    swa_lr: float | None
    swa_freq: int | None
    swa_anneal_epochs: float
    smoothing: float
    clip_grad: float | None

    @classmethod
    def of(cls, settings: Any) -> OptimSettings:
        """The optimisation section of any settings object that has these fields by name (a run's configuration)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    @property
    def late(self) -> bool:
        """Whether the run has a late phase from T0 on: K members, or the gradient-accumulation control (``--K 1
        --accumulate M``); plain fine-tuning (K = 1) has none."""
        return self.K > 1 or self.accumulate > 1

    def minibatches_per_iteration(self, K: int, late: bool) -> int:
        """One minibatch per member (`K` members now); in the late phase, K = 1 with ``--accumulate M`` is the
        gradient-accumulation control (the single member steps on every minibatch, θ once per M)."""
        if K > 1:
            return K
        return self.accumulate if late else 1

    def theta_scale(self, K: int, late: bool) -> float:
        """γθ with `K` members now: the flag, else 1/(minibatches per iteration) — 1/K, 1/M for the control, 1 for
        plain fine-tuning (Algorithm 1: θ ← θ − γθ · U_θ(Σ_k ∇θ L_k))."""
        per_iteration = self.minibatches_per_iteration(K, late)
        if self.gamma_theta is not None and per_iteration > 1:
            return self.gamma_theta
        return 1.0 / per_iteration
