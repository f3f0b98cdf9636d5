"""One check for every data source: a run stopped mid-epoch and resumed ends bitwise where the straight run ends."""

from pathlib import Path

import pytest
import torch

from lpconvert.config import FinetuneConfig
from lpconvert.train.finetune import RunInterrupted, run


def assert_resume_is_exact(settings: dict, tmp_path: Path, stop_after: int = 2) -> None:
    """Train `settings` straight to `tmp_path/straight`, and to `tmp_path/resumed` stopped after `stop_after`
    iterations and resumed; the last checkpoints' tensors are equal."""
    run(FinetuneConfig(output=str(tmp_path / "straight"), **settings))
    with pytest.raises(RunInterrupted):
        run(FinetuneConfig(output=str(tmp_path / "resumed"), **settings), stop_after=stop_after)
    run(FinetuneConfig(output=str(tmp_path / "resumed"), resume=str(tmp_path / "resumed"), **settings))
    a, b = (torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
            for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
