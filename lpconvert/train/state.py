"""A run's state: where training stands (:class:`Position`), what it measured (:class:`History`), the random
generators, and :class:`RunCheckpoint` — everything ``checkpoints/last.pt`` / ``best.pt`` hold to continue a run
exactly, or to collapse it —, and :class:`TrainState`, the live objects a run trains, which it saves and restores."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lpconvert.convert.late_phase_config import LatePhaseConfig, late_phase_config
from lpconvert.convert.surgery import convert_from_config
from lpconvert.errors import LatePhaseError, one_line
from lpconvert.files import atomic_save_torch, torch_load_weights_only
from lpconvert.train.engine import LatePhaseEngine
from lpconvert.train.optim import load_engine_state

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "lpconvert-run", 2


@dataclass
class Position:
    epoch: int = 0          # the epoch being trained (0-based)
    batch: int = 0          # global batches of this epoch already trained
    iteration: int = 0      # Algorithm-1 iterations since the start of the run
    loss_sum: float = 0.0   # this epoch's summed member losses so far
    loss_count: int = 0


@dataclass
class History:
    base: dict[str, float] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None

    def row(self, epoch: int) -> dict[str, Any]:
        return next((row for row in self.epochs if row["epoch"] == epoch), {})


@dataclass
class RunCheckpoint:
    """Everything a run needs to continue exactly, or to be collapsed: ``checkpoints/last.pt`` and ``best.pt``."""

    config: dict[str, Any]
    source: dict[str, Any]
    late_phase: LatePhaseConfig
    model: dict[str, torch.Tensor]
    engine: dict[str, Any]
    position: Position
    history: History
    swa: dict[str, torch.Tensor] | None
    rng: dict[str, Any]
    started: str
    label_names: list[str] | None = None
    data_fingerprint: dict[str, Any] | None = None
    #: A distributed run's checkpoint taken within an epoch: every rank's floating-point buffers (the members' BN
    #: running statistics stay rank-local until the epoch ends), in rank order.
    rank_buffers: list[dict[str, torch.Tensor]] | None = None
    #: The CPU threads the run trained with: a resume without --threads uses them again (the last digits of a float
    #: sum depend on the thread count, and a resumed run is bitwise the run in one go).
    threads: int | None = None

    def save(self, path: Path) -> Path:
        """Atomically, as plain containers and tensors (read back weights-only)."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        state.update(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, late_phase=self.late_phase.to_dict(),
                     position=dataclasses.asdict(self.position), history=dataclasses.asdict(self.history))
        return atomic_save_torch(state, path)

    @classmethod
    def load(cls, path: Path) -> RunCheckpoint:
        if not path.is_file():
            raise LatePhaseError(f"checkpoint not found: {path}; pass the run directory that holds it")
        state = torch_load_weights_only(path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "late_phase" not in state:
            raise LatePhaseError(f"{path} is not an lpconvert run checkpoint (written by `lpconvert finetune`)")
        version = state.get("version")
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise LatePhaseError(f"{path} has checkpoint format {version!r}, newer than this lpconvert reads "
                                 f"({CHECKPOINT_VERSION}); upgrade lpconvert to continue or collapse this run")
        swa = state.get("swa")
        return cls(
            config=state["config"], source=state["source"], late_phase=LatePhaseConfig.from_dict(state["late_phase"]),
            model=state["model"], engine=state["engine"], position=Position(**state["position"]),
            history=History(**state["history"]), swa=swa["model"] if swa and "model" in swa else swa, rng=state["rng"],
            started=state.get("started", ""), label_names=state.get("label_names"),
            data_fingerprint=state.get("data_fingerprint"), rank_buffers=state.get("rank_buffers"),
            threads=state.get("threads"),
        )


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}


@dataclass
class TrainState:
    """What a fine-tuning run trains and where it stands: the late-phase model (one member before T0, K after), its
    Algorithm-1 engine, the SWA average, the position in the data and what was measured. `late`: the late phase
    (t ≥ T0) has begun. :meth:`to_checkpoint` and :meth:`from_checkpoint` turn it into a :class:`RunCheckpoint` and
    back, exactly."""

    model: nn.Module
    engine: LatePhaseEngine
    late: bool
    position: Position = field(default_factory=Position)
    history: History = field(default_factory=History)
    swa: AveragedModel | None = None
    started: str = field(default_factory=_now)
    rank_buffers: list[dict[str, torch.Tensor]] | None = None
    #: The starting checkpoint (epoch 0, a candidate for ``--select best``), held until the run's first checkpoint is
    #: written — then it is saved as ``best`` — so that a run that dies before that leaves no checkpoint behind.
    unsaved_start: RunCheckpoint | None = None

    @staticmethod
    def average_of(model: nn.Module) -> AveragedModel:
        """SWA: the running average of `model`'s weights (its BatchNorm statistics are re-estimated when used)."""
        return AveragedModel(model, use_buffers=False)

    def start_swa(self) -> None:
        self.swa = self.average_of(self.model)

    def to_checkpoint(self, *, config: dict[str, Any], source: dict[str, Any], label_names: list[str] | None,
                      data_fingerprint: dict[str, Any] | None) -> RunCheckpoint:
        """A copy of the state, with the run's settings and provenance and the random generators, to save."""
        return RunCheckpoint(
            config=config, source=source, late_phase=late_phase_config(self.model),
            model=_on_cpu(self.model.state_dict()), engine=self.engine.state_dict(),
            position=Position(**vars(self.position)),
            history=History(self.history.base, list(self.history.epochs), self.history.best_epoch),
            swa=None if self.swa is None else _on_cpu(self.swa.state_dict()),
            rng=rng_state(), started=self.started, label_names=label_names, data_fingerprint=data_fingerprint,
            rank_buffers=self.rank_buffers, threads=torch.get_num_threads(),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: RunCheckpoint, model: nn.Module,
                        build_engine: Callable[[nn.Module], LatePhaseEngine], late: bool, where: str) -> TrainState:
        """`model` (the original architecture) made the checkpoint's late-phase model by name, with its members,
        optimizer buffers (under the settings `build_engine` gives), SWA average, position, history and random
        generators; `where` names the checkpoint in errors."""
        restore_model(model, checkpoint, where)
        engine = build_engine(model)
        try:
            load_engine_state(engine, checkpoint.engine)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise LatePhaseError(f"{where}: the saved optimizer state does not fit the saved model ({one_line(err)}); "
                                 "the checkpoint is damaged or was edited: resume from another run") from err
        swa = None
        if checkpoint.swa is not None:
            swa = cls.average_of(model)
            swa.load_state_dict(checkpoint.swa)
        set_rng_state(checkpoint.rng)
        return cls(model, engine, late, checkpoint.position, checkpoint.history, swa, checkpoint.started or _now())


def restore_model(model: nn.Module, checkpoint: RunCheckpoint, where: str) -> nn.Module:
    """`model` (the original architecture) with the checkpoint's late-phase layers injected by name and its tensors
    loaded, in place — after checking that the saved configuration, the model and the saved tensors agree (layer names,
    K, every tensor's name and shape): a disagreement is one line naming `where` and the first difference."""
    try:
        convert_from_config(model, checkpoint.late_phase)
    except (AttributeError, KeyError, IndexError, RuntimeError, TypeError, ValueError) as err:
        raise LatePhaseError(f"{where}: its late-phase configuration does not fit the model ({one_line(err)}); the "
                             "checkpoint is damaged or was edited: resume from another run") from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in checkpoint.model.items() if isinstance(v, torch.Tensor)}
    problem = next((f"{k} is missing" for k in expected if k not in saved), None) \
        or next((f"{k} is not part of the model" for k in saved if k not in expected), None) \
        or next((f"{k} has shape {saved[k]}, the configuration (K = {checkpoint.late_phase.K}) gives {expected[k]}"
                 for k in expected if saved[k] != expected[k]), None)
    if problem:
        raise LatePhaseError(f"{where}: the saved tensors disagree with the saved late-phase configuration ({problem});"
                             " the checkpoint is damaged or was edited: resume from another run")
    model.load_state_dict(checkpoint.model)
    return model
