"""Rebuilding a late-phase model (all K members) from a run directory or run checkpoint."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .loading import load_model
from .run_dir import checkpoint_file
from .run_state import RunCheckpoint, restore_model


def load_late_phase(path: str | Path, which: str = "best") -> tuple[nn.Module, RunCheckpoint]:
    """The late-phase model (all K members) of a run directory or run checkpoint, and the checkpoint.

    The architecture is rebuilt from the run's model spec without downloading weights, the late-phase layers are
    re-injected by their recorded names (no tracing), then the state is loaded strictly: ready for collapsing,
    ensemble inference or inspection."""
    file = checkpoint_file(Path(path), which)
    checkpoint = RunCheckpoint.load(file)
    config = checkpoint.config
    model, _ = load_model(config["model"], num_classes=config.get("num_classes"), pretrained=False)
    if config.get("sync_bn"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return restore_model(model, checkpoint, str(file)), checkpoint
