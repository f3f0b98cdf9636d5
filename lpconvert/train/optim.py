"""U_θ, U_φ, γθ and the learning-rate schedule of a fine-tuning run, from its settings — one source for each.

The engine is built once with these settings (:func:`build_engine`); a checkpoint's optimizer states are loaded under
them (:func:`load_engine_state`), so a run resumed with changed settings (``--force``) trains with the new ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lpconvert.config import FinetuneConfig
from lpconvert.convert.late_phase_config import late_phase_config
from lpconvert.convert.members import unwrap
from lpconvert.train.engine import LatePhaseEngine, why_not_vectorized
from lpconvert.train.optim_settings import OptimSettings
from lpconvert.train.runtime import Runtime

VECTORIZE_MAX_PIXELS = 2**22  # auto mode stacks the K minibatches when K·B·H·W stays below this (≈4k CIFAR images)


@dataclass(frozen=True)
class OptimizerSettings:
    name: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float

    def describe(self) -> str:
        """The optimizer and every setting it is built with: ``sgd lr=0.05 momentum=0.9 nesterov=False
        weight_decay=0.0001`` (Adam and AdamW take no momentum or Nesterov flag)."""
        used = ("lr", "momentum", "nesterov", "weight_decay") if self.name == "sgd" else ("lr", "weight_decay")
        return " ".join([self.name, *(f"{name}={getattr(self, name)}" for name in used)])

    def factory(self) -> Callable[[Any], torch.optim.Optimizer]:
        if self.name == "sgd":
            return partial(torch.optim.SGD, lr=self.lr, momentum=self.momentum,
                           nesterov=self.nesterov and self.momentum > 0, weight_decay=self.weight_decay)
        optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.name]
        return partial(optimizer, lr=self.lr, weight_decay=self.weight_decay)


def optimizer_settings(config: OptimSettings, late: bool) -> tuple[OptimizerSettings, OptimizerSettings]:
    """U_θ, and U_φ — which in the late phase inherits every setting its ``--member-*`` flags do not override, and
    before it (the plain epochs before T0) is U_θ."""
    theta = OptimizerSettings(config.optimizer, config.lr, config.momentum, config.nesterov, config.weight_decay)
    if not late:
        return theta, theta
    member = OptimizerSettings(
        config.member_optimizer or config.optimizer, config.member_lr if config.member_lr is not None else config.lr,
        config.momentum, config.nesterov,
        config.member_weight_decay if config.member_weight_decay is not None else config.weight_decay,
    )
    return theta, member


def choose_mode(config: FinetuneConfig, model: nn.Module, K: int, input_size: tuple[int, ...], runtime: Runtime) -> str:
    """Vectorized on a GPU when the model can be (every batch-statistics layer late-phase, batch-first sequence
    layers) and K stacked minibatches stay small (on a CPU a K-times larger batch is not faster per image: see
    zoo/BENCHMARKS.md)."""
    if config.mode != "auto":
        return config.mode
    if K == 1 or runtime.device.type != "cuda" or why_not_vectorized(model) is not None:
        return "sequential"
    pixels = K * (config.batch_size // runtime.world_size) * math.prod(input_size[-2:])
    return "vectorized" if pixels <= VECTORIZE_MAX_PIXELS else "sequential"


def build_engine(train_model: nn.Module, config: OptimSettings, mode: str, runtime: Runtime, late: bool,
                 group_size: int | None = None) -> LatePhaseEngine:
    """The engine with U_θ and U_φ of :func:`optimizer_settings`, γθ
    (:meth:`~lpconvert.train.optim_settings.OptimSettings.theta_scale`) and K read from the model; `mode` and `group_size`
    say how the members run."""
    theta, member = optimizer_settings(config, late)
    K = late_phase_config(unwrap(train_model)).K
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.amp_dtype == torch.float16 else None
    loss = partial(F.cross_entropy, label_smoothing=config.smoothing) if config.smoothing else F.cross_entropy
    return LatePhaseEngine(train_model, theta.factory(), member.factory(), gamma_theta=config.theta_scale(K, late),
                           mode=mode, group_size=group_size, loss_fn=loss, autocast_dtype=runtime.amp_dtype,
                           grad_scaler=scaler, clip_grad=config.clip_grad)


def optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`saved`'s per-parameter buffers (momentum, Adam's moments) under `optimizer`'s own group settings: the learning
    rate, weight decay, momentum … it was built with are kept, not replaced by the saved ones."""
    groups = [{**old, **{k: v for k, v in new.items() if k != "params"}}
              for old, new in zip(saved["param_groups"], optimizer.param_groups)]
    return {"state": saved["state"], "param_groups": groups}


def load_engine_state(engine: LatePhaseEngine, saved: dict[str, Any]) -> None:
    """A checkpoint's engine state (optimizer buffers, grad scaler, round-robin position) under `engine`'s settings."""
    theta = saved["theta_optimizer"]
    engine.load_state_dict({
        **saved,
        "theta_optimizer": optimizer_state(theta, engine.theta_optimizer) if theta and engine.theta_optimizer else theta,
        "member_optimizers": [optimizer_state(s, o) for s, o in zip(saved["member_optimizers"],
                                                                    engine.member_optimizers)]
        + saved["member_optimizers"][len(engine.member_optimizers):],
    })


def lr_factor(config: OptimSettings, epoch: float) -> float:
    """The schedule as a factor of the base learning rates at fractional epoch `epoch`; during ``--warmup-epochs`` W
    the rate rises linearly from ``--warmup-lr`` to the schedule's (as timm's schedulers warm up)."""
    factor = _schedule_factor(config, epoch)
    if epoch < config.warmup_epochs:
        start = config.warmup_lr / config.lr
        return start + (factor - start) * epoch / config.warmup_epochs
    return factor


def _schedule_factor(config: OptimSettings, epoch: float) -> float:
    """The schedule's factor; from ``--swa-start`` s on, SWALR's: with a = ``--swa-anneal-epochs`` and f_s the
    schedule's factor at s, f = f_s + (swa_lr/lr − f_s) · (1 − cos(π·min((epoch − s)/a, 1)))/2 (at once when a = 0)."""
    if config.swa_start is not None and epoch >= config.swa_start and config.swa_lr is not None:
        target = config.swa_lr / config.lr
        if config.swa_anneal_epochs == 0 or epoch >= config.swa_start + config.swa_anneal_epochs:
            return target
        before = _base_factor(config, config.swa_start)
        progress = (epoch - config.swa_start) / config.swa_anneal_epochs
        return before + (target - before) * (1.0 - math.cos(math.pi * progress)) / 2
    return _base_factor(config, epoch)


def _base_factor(config: OptimSettings, epoch: float) -> float:
    """``--schedule`` as a factor of the base learning rate at fractional `epoch`."""
    end = config.lr_end / config.lr
    if config.schedule == "multistep":
        return config.lr_gamma ** sum(epoch >= m for m in config.milestones)
    if config.schedule == "linear":  # constant, linear from anneal_start to anneal_end, constant (paper's CIFAR runs)
        stop = config.epochs if config.anneal_end is None else config.anneal_end
        progress = min(max((epoch - config.anneal_start) / max(stop - config.anneal_start, 1e-12), 0.0), 1.0)
        return 1.0 + (end - 1.0) * progress
    if config.schedule == "cosine":
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * min(epoch / config.epochs, 1.0)))
    return 1.0


def set_learning_rates(engine: LatePhaseEngine, config: OptimSettings, late: bool, factor: float) -> None:
    """U_θ's and U_φ's learning rates: their settings' rates times the schedule's `factor`."""
    theta, member = optimizer_settings(config, late)
    rates = [theta.lr * factor] * (engine.theta_optimizer is not None) + [member.lr * factor] * engine.num_members
    for optimizer, lr in zip(engine.optimizers, rates):
        for group in optimizer.param_groups:
            group["lr"] = lr
