"""--resume continues a run exactly, or says in one line why it cannot, changing nothing."""

import json
import shutil

import pytest

from lpconvert.config import FinetuneConfig
from lpconvert.errors import LatePhaseError
from lpconvert.train.finetune import DIGITS, run


def _config(tmp_path, **overrides):
    return FinetuneConfig(**{"model": "digits_cnn", "pretrained": False, "data": DIGITS, "K": 2, "epochs": 1,
                             "batch_size": 40, "lr": 0.05, "workers": 0, "quiet": True,
                             "output": str(tmp_path / "run"), **overrides})


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_whose_checkpoints_were_deleted_is_not_silently_restarted(tmp_path):
    run(_config(tmp_path))
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    before = _snapshot(tmp_path / "run")
    with pytest.raises(LatePhaseError, match=r"trained 1 epoch\(s\) but checkpoints/last.pt is gone.*--force"):
        run(_config(tmp_path, resume=str(tmp_path / "run")))
    assert _snapshot(tmp_path / "run") == before  # nothing changed, the metrics kept
    report = run(_config(tmp_path, resume=str(tmp_path / "run"), force=True))  # --force starts it over
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and report["epoch"] in (0, 1)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_collapse_and_evaluate_reopen_what_the_run_exported(tmp_path):
    """A `--select last` run that validated on held-out digits has a best.pt too; collapsing it without --checkpoint
    gives the epoch the run exported, not the best one."""
    from click.testing import CliRunner

    from lpconvert.cli import main

    report = run(_config(tmp_path, epochs=3, lr=1.0, select="last", val_split=0.1))
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file() and report["epoch"] == 3
    result = CliRunner().invoke(main, ["collapse", str(tmp_path / "run"), "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    provenance = json.loads((tmp_path / "again" / "lpconvert.json").read_text())
    exported = json.loads((tmp_path / "run" / "model" / "lpconvert.json").read_text())
    assert provenance["averaging"]["epoch"] == exported["averaging"]["epoch"] == 3
