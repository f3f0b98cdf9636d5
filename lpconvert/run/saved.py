"""Reopening a run: the one place that rebuilds a finished (or interrupted) run from its directory.

:func:`load_run` returns the checkpoint, the settings the run ran with, their data section and the late-phase
configuration; ``lpconvert evaluate``, ``collapse``, ``compare`` and the fine-tuner's export and ``--resume`` read a
run through it, so they all see the same images the same way (``--img-size``, ``--crop-pct``, ``--val-split``,
``--class-map`` as the run had them). :func:`reading` gives the same for a published model folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from lpconvert.collapse.average import collapse
from lpconvert.config import FinetuneConfig
from lpconvert.convert.late_phase_config import LatePhaseConfig
from lpconvert.data import Source, build_data, recalibration_loader
from lpconvert.data.fingerprint import validated_on_held_out
from lpconvert.data.settings import DataSettings
from lpconvert.errors import LatePhaseError
from lpconvert.files import read_json_object
from lpconvert.publish.loading import load_model
from lpconvert.run.folder import checkpoint_file
from lpconvert.train.state import RunCheckpoint, restore_model

__all__ = ["SavedRun", "load_late_phase", "load_run", "reading", "run_start"]


@dataclass
class SavedRun:
    """A run as it ran: its directory (or the folder of a checkpoint file), the checkpoint read, and the settings it
    ran with (:meth:`~lpconvert.config.FinetuneConfig.from_saved`: a setting an older version did not record has
    the value that version behaved as)."""

    path: Path
    file: Path
    checkpoint: RunCheckpoint
    config: FinetuneConfig

    @property
    def data(self) -> DataSettings:
        """How the run read its images (:class:`~lpconvert.data.settings.DataSettings`); a ``--class-map`` as the
        class names it recorded, in label order (the file need not be where it was)."""
        settings = self.config.data_settings
        if settings.class_map is not None and self.checkpoint.label_names:
            settings = settings.replace(class_map=tuple(self.checkpoint.label_names))
        return settings

    @property
    def late_phase(self) -> LatePhaseConfig:
        """The late-phase configuration the run's model was converted with (K, kinds, σ0, layer names)."""
        return self.checkpoint.late_phase

    def members(self) -> nn.Module:
        """The late-phase model with all K members: the architecture rebuilt from the run's model spec without
        downloading weights, the late-phase layers re-injected by their recorded names (no tracing), the state
        loaded strictly."""
        config = self.checkpoint.config
        model, _ = load_model(config["model"], num_classes=config.get("num_classes"), pretrained=False)
        if config.get("sync_bn"):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return restore_model(model, self.checkpoint, str(self.file))

    def swa_members(self, members: nn.Module) -> nn.Module | None:
        """The SWA average of `members` (the run's :meth:`members`) saved with the checkpoint, None without SWA."""
        if self.checkpoint.swa is None:
            return None
        from torch.optim.swa_utils import AveragedModel

        swa = AveragedModel(members, use_buffers=False)
        swa.load_state_dict(self.checkpoint.swa)
        return swa.module

    def start(self) -> nn.Module:
        """The run's starting model (epoch 0): :func:`run_start`."""
        return run_start(self.config, self.checkpoint)

    def recalibration(self, model: nn.Module, data: str | None = None, *, train: Source | None = None) -> DataLoader:
        """The batches BatchNorm statistics are re-estimated on, as the run itself did
        (:func:`~lpconvert.data.recalibration_loader`: its batch size and seed): the training images of `data` (a
        root, ``hfds/NAME`` or ``sklearn-digits``; default the run's own) — or the split `train` itself — read with
        the run's settings, held-out images left out as the run left them out. Fewer images than one batch is
        refused."""
        settings = (self.data if data is None else self.data.on(data)).replace(workers=0)
        held_out = validated_on_held_out(self.checkpoint.data_fingerprint)
        samples = build_data(settings, model, None if train is None else (train, train), labels=False,
                             evaluation="test" if held_out else "validation").train  # images, not labels
        batch = self.config.batch_size
        if len(samples) < batch:
            raise LatePhaseError(f"{data or 'the run data'} has {len(samples)} training images, fewer than one batch "
                                 f"of the run's batch size {batch}; pass the run's training data to --data, or use "
                                 "--bn-stats fold")
        return recalibration_loader(samples, batch, seed=self.config.seed)


def load_run(path: str | Path, which: str = "best") -> SavedRun:
    """A run directory's checkpoint `which` (``best``, else ``last``) — or a checkpoint file — with its settings."""
    file = checkpoint_file(Path(path), which)
    checkpoint = RunCheckpoint.load(file)
    config = FinetuneConfig.from_saved(checkpoint.config)
    folder = Path(path).expanduser()
    return SavedRun(folder if folder.is_dir() else file.parent, file, checkpoint, config)


def load_late_phase(path: str | Path, which: str = "best") -> tuple[nn.Module, RunCheckpoint]:
    """The late-phase model (all K members) of a run directory or run checkpoint, and the checkpoint: ready for
    collapsing, ensemble inference or inspection (:meth:`SavedRun.members`)."""
    run = load_run(path, which)
    return run.members(), run.checkpoint


def run_start(config: FinetuneConfig, checkpoint: RunCheckpoint | None = None) -> nn.Module:
    """The run's starting model (epoch 0), the original architecture: `checkpoint` itself when it is the start (a
    ``best.pt`` saved at epoch 0), else rebuilt exactly as the run built it (:func:`lpconvert.train.job.prepare`):
    ``config.model`` with its ``--weights``, ``--num-classes`` and ``--pretrained`` under the run's ``--seed`` (a new
    head is initialised from it), the global random state left as it was."""
    if checkpoint is not None and (checkpoint.position.epoch, checkpoint.position.batch) == (0, 0):
        model, _ = load_model(config.model, num_classes=config.num_classes, pretrained=False)
        return collapse(restore_model(model, checkpoint, "the starting checkpoint"), bn_stats="mean")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            model, _ = load_model(config.model, weights=config.weights, num_classes=config.num_classes,
                                  pretrained=config.pretrained)
        except LatePhaseError as err:
            raise LatePhaseError(f"the run's starting model, rebuilt from {config.model}: {err}") from err
    return model


def reading(source: str | Path) -> DataSettings:
    """How images are read for the model `source` (a run reads them as :attr:`SavedRun.data` says): a model folder
    written by lpconvert — its classes in the order of its ``label_names`` (its input size and crop are in its
    config) — or any other model spec, the model's defaults."""
    folder = Path(str(source).removeprefix("local-dir:")).expanduser()
    if (folder / "lpconvert.json").is_file() and (folder / "config.json").is_file():
        names = read_json_object(folder / "config.json").get("label_names")
        if isinstance(names, list) and names:
            return DataSettings(class_map=tuple(map(str, names)))
    return DataSettings()
