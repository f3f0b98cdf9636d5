"""`--log tensorboard`: a scalar per epoch for every field of metrics.jsonl, rewritten whole (a resumed run repeats no
epoch), published with the model in runs/ and uploaded by push."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hub_server import TEST_TOKEN, HubServer, configure_client
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lpconvert.cli import main
from lpconvert.collapse.command import collapse_run
from lpconvert.config import FinetuneConfig
from lpconvert.publish.hub import push
from lpconvert.run.ownership import recognise
from lpconvert.train.finetune import DIGITS, RunInterrupted, run
from lpconvert.train.tensorboard import EVENTS_NAME, write_scalars

ROWS = [
    {"epoch": 0, "val_top1": 10.5, "val_top5": 50.25, "val_nll": 2.25, "val_ece": 0.125},
    {"epoch": 1, "train_loss": 1.5, "lr": 0.0625, "images_per_s": 812.5, "K": 2, "val_top1": 60.5, "val_top5": 90.0,
     "val_nll": 1.25, "val_ece": 0.0625},
    {"epoch": 2, "train_loss": 0.75, "lr": 0.0625, "images_per_s": 790.0, "K": 2, "val_top1": 80.25, "val_top5": 97.5,
     "val_nll": 0.5, "val_ece": 0.03125},
]
TAGS = {"val_top1": "val/top1", "val_top5": "val/top5", "val_nll": "val/nll", "val_ece": "val/ece",
        "train_loss": "train/loss", "lr": "lr", "images_per_s": "images_per_s", "K": "K"}


def scalars(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall time)] as TensorBoard reads the folder."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] for every field of metrics.jsonl rows but the epoch."""
    result: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name, value in row.items():
            if name != "epoch":
                result.setdefault(TAGS[name], []).append((row["epoch"], value))
    return result


def test_every_field_is_a_scalar_per_epoch(tmp_path):
    path = write_scalars(tmp_path / "tb", ROWS)
    assert path == tmp_path / "tb" / EVENTS_NAME and [p.name for p in (tmp_path / "tb").iterdir()] == [EVENTS_NAME]
    found = scalars(tmp_path / "tb")
    assert {tag: [(step, value) for step, value, _ in points] for tag, points in found.items()} == expected(ROWS)


def test_rewriting_the_history_repeats_no_epoch_and_keeps_wall_times(tmp_path):
    write_scalars(tmp_path / "tb", ROWS[:2])
    before = scalars(tmp_path / "tb")
    write_scalars(tmp_path / "tb", ROWS)  # the next epoch end (or a resumed run) writes the whole history again
    write_scalars(tmp_path / "tb", ROWS)
    after = scalars(tmp_path / "tb")
    assert {tag: [(step, value) for step, value, _ in points] for tag, points in after.items()} == expected(ROWS)
    assert after["val/top1"][:2] == before["val/top1"]  # epochs 0 and 1 keep the wall time they were written at
    assert after["val/top1"][2][2] >= before["val/top1"][1][2]
    assert [p.name for p in (tmp_path / "tb").iterdir()] == [EVENTS_NAME]  # no temp files left


def test_without_tensorboard_the_flag_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as where it is not installed
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["finetune", "digits_cnn", "--no-pretrained", "--data", DIGITS, "--K", "2",
                                       "--epochs", "1", "--workers", "0", "--quiet", "--output", "run",
                                       "--log", "tensorboard"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "--log tensorboard needs TensorBoard: pip install 'lpconvert[tensorboard]'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_logs_each_epoch_once_and_push_publishes_the_logs(tmp_path, monkeypatch):
    settings = dict(model="digits_cnn", pretrained=False, data=DIGITS, K=2, epochs=2, batch_size=40, workers=0,
                    quiet=True, lr=0.05, schedule="constant", output=str(tmp_path / "run"), log="tensorboard")
    with pytest.raises(RunInterrupted):
        run(FinetuneConfig(**settings), stop_at_epoch=1)
    first = scalars(tmp_path / "run" / "tensorboard")
    assert [step for step, _, _ in first["val/top1"]] == [0, 1]
    report = run(FinetuneConfig(**settings, resume=str(tmp_path / "run")))

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = scalars(tmp_path / "run" / "tensorboard")
    assert set(logged) == set(expected(rows))
    for tag, points in expected(rows).items():  # each epoch once; the event file holds float32
        assert [step for step, _, _ in logged[tag]] == [step for step, _ in points], tag
        assert [value for _, value, _ in logged[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag
    assert logged["val/top1"][:2] == first["val/top1"]
    assert recognise(tmp_path / "run") == "run" and recognise(tmp_path / "run" / "model") == "model"
    published = tmp_path / "run" / "model" / "runs" / EVENTS_NAME
    assert published.read_bytes() == (tmp_path / "run" / "tensorboard" / EVENTS_NAME).read_bytes()

    with HubServer() as hub:
        configure_client(monkeypatch, hub, tmp_path)
        push(report["model_dir"], "alice/digits-lp", token=TEST_TOKEN)
        assert hub.files("alice/digits-lp")[f"runs/{EVENTS_NAME}"] == published.read_bytes()
    collapsed = collapse_run(tmp_path / "run", tmp_path / "collapsed", bn_stats="mean")  # `lpconvert collapse` too
    assert (collapsed / "runs" / EVENTS_NAME).read_bytes() == published.read_bytes()

    # a run without --log keeps no logs, and --force replaces a run that has them
    report = run(FinetuneConfig(**{**settings, "log": None, "epochs": 1}, force=True))
    assert not (tmp_path / "run" / "tensorboard").exists() and not (Path(report["model_dir"]) / "runs").exists()
