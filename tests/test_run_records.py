"""What a run takes in and what it keeps and publishes: --dist-timeout and --input-size refused in one line before
anything is written, runs saved before the newest settings resume as they ran, only lpconvert's own TensorBoard
event file is published, and BatchNorm recalibration on images the model cannot take is one line naming both."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hub_server import TEST_TOKEN, HubServer, configure_client
from image_trees import two_class_tree
from torch import nn

from lpconvert.cli import main
from lpconvert.collapse.average import input_mismatch
from lpconvert.config import DIST_TIMEOUT_RANGE, LEGACY_SETTINGS, FinetuneConfig
from lpconvert.errors import LatePhaseError
from lpconvert.publish.hub import push
from lpconvert.train.finetune import DIGITS, RunInterrupted, run
from lpconvert.train.tensorboard import EVENTS_NAME

DIGITS_RUN = dict(model="digits_cnn", pretrained=False, data=DIGITS, K=2, epochs=2, batch_size=40, lr=0.05,
                  workers=0, quiet=True, threads=1, log="tensorboard")
#: Settings added since the first releases: a run saved before them has none in its config.json and checkpoints.
NEWER_SETTINGS = ("data_in_memory", "val_split", "batch_size_per_gpu", "crop_pct", "dist_timeout", "img_size", "input_size",
                  "swa_anneal_epochs", "swa_freq", "interpolate", "soup")


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run (K = 2, TensorBoard logs) stopped after 5 of its 2 × 27 iterations, with its checkpoint."""
    path = tmp_path_factory.mktemp("records") / "run"
    with pytest.raises(RunInterrupted):
        run(FinetuneConfig(**DIGITS_RUN, output=str(path)), stop_after=5)
    return path


def _copy(run_dir: Path, to: Path) -> Path:
    return Path(shutil.copytree(run_dir, to))


# --- 1. --dist-timeout ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("minutes", [1e300, 1e12, 10081, 0, 1e-9, -5])
def test_a_dist_timeout_torch_cannot_wait_is_refused_in_one_line(tmp_path, minutes):
    with pytest.raises(LatePhaseError, match=r"^--dist-timeout must lie between 0\.01667 \(a second\) and 10080 "):
        FinetuneConfig(model="digits_cnn", dist_timeout=minutes)
    result = invoke("finetune", "digits_cnn", "--data", DIGITS, "--dist-timeout", minutes, "--output", tmp_path / "r")
    one_line_error(result, "--dist-timeout", "a week")
    assert list(tmp_path.iterdir()) == []


def test_the_dist_timeouts_allowed_are_timeouts_torch_takes():
    for minutes in (*DIST_TIMEOUT_RANGE, 0.02, 60):
        assert FinetuneConfig(model="digits_cnn", dist_timeout=minutes).dist_timeout == minutes
        assert timedelta(minutes=minutes).total_seconds() == pytest.approx(60 * minutes)


# --- 2. --input-size ------------------------------------------------------------------------------------------------
def test_an_input_size_given_channels_last_is_refused():
    with pytest.raises(LatePhaseError, match="channels first: 32 32 3 reads as 32 channels of 32×3 images; for "
                                             "3-channel 32×32 images pass --input-size 3 32 32"):
        FinetuneConfig(model="cifar_lenet5_bn", input_size=(32, 32, 3))
    assert FinetuneConfig(model="cifar_lenet5_bn", input_size=(3, 32, 32)).input_size == (3, 32, 32)


def test_an_input_size_with_channels_the_model_does_not_take_is_refused_before_anything_is_written(tmp_path):
    images = two_class_tree(tmp_path / "images")
    result = invoke("finetune", "cifar_lenet5_bn", "--no-pretrained", "--num-classes", 2, "--data", images,
                    "--input-size", 1, 32, 32, "--epochs", 1, "--workers", 0, "--output", tmp_path / "run")
    one_line_error(result, "--input-size 1 32 32 does not fit cifar_lenet5_bn (its first layer conv1 takes 3 "
                           "channels, not 1)", "C H W, channels first")
    assert not (tmp_path / "run").exists()


def test_the_first_layer_decides_what_an_input_must_be():
    """A convolution takes C channels, whichever comes first in the model; a model of linear layers C·H·W values."""
    convolutional = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 8, 3))  # no pretrained_cfg: the first convolution
    assert input_mismatch(convolutional, (2, 5, 5)) is None
    assert input_mismatch(convolutional, (3, 5, 5)) == "its first layer 1 takes 2 channels, not 3"
    convolutional.pretrained_cfg = {"first_conv": "2"}
    convolutional.append(nn.Conv2d(8, 8, 1))
    assert input_mismatch(convolutional, (2, 5, 5)) == "its first layer 2 takes 8 channels, not 2"
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    assert input_mismatch(flat, (3, 4, 4)) is None
    assert input_mismatch(flat, (1, 4, 4)) == "its first layer 1 takes 48 input features, not 16"
    assert input_mismatch(nn.Sequential(nn.LazyConv2d(4, 3)), (7, 5, 5)) is None
    assert input_mismatch(nn.Sequential(nn.ReLU()), (7, 5, 5)) is None


# --- 3. runs saved before the newest settings -----------------------------------------------------------------------
def _as_saved_before_the_newest_settings(run_dir: Path) -> None:
    """Remove the settings added since from the run's config.json and checkpoints, as an earlier version saved them."""
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in NEWER_SETTINGS}))
    for file in (run_dir / "checkpoints").glob("*.pt"):
        state = torch.load(file, weights_only=True)
        state["config"] = {k: v for k, v in state["config"].items() if k not in NEWER_SETTINGS}
        torch.save(state, file)


@pytest.mark.parametrize("how", ["bare", "same flags", "api"])
def test_a_run_saved_before_the_newest_settings_resumes_as_it_ran(tmp_path, interrupted, how):
    """Earlier versions held nothing out (`val_split` 0: the digits' test split validates); --resume continues so —
    from the command line alone or with the run's flags (a setting not given is the one the run had), or through the
    API with the settings it ran with — instead of 'different settings'."""
    path = _copy(interrupted, tmp_path / "run")
    _as_saved_before_the_newest_settings(path)
    assert LEGACY_SETTINGS["val_split"] == 0.0
    config = FinetuneConfig(**DIGITS_RUN, **LEGACY_SETTINGS, resume=str(path))
    if how == "api":
        report = run(config)
    else:
        flags = ["finetune", "--resume", path]
        if how == "same flags":
            flags += ["digits_cnn", "--no-pretrained", "--data", DIGITS, "--K", 2, "--epochs", 2, "--batch-size", 40,
                      "--lr", 0.05, "--workers", 0, "--quiet", "--threads", 1, "--log", "tensorboard"]
        result = invoke(*flags)
        assert result.exit_code == 0, result.output
        report = json.loads((path / "report.json").read_text())
    assert report["validation"] == "test"  # validated on the 597 test digits, as the run did
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    saved = json.loads((path / "config.json").read_text())
    assert saved["val_split"] == 0.0 and saved["data_in_memory"] == "off" and saved["soup"] == "uniform"
    assert torch.load(path / "checkpoints" / "last.pt", weights_only=True)["position"]["epoch"] == 2


def test_a_changed_setting_is_still_refused_on_resume(tmp_path, interrupted):
    path = _copy(interrupted, tmp_path / "run")
    _as_saved_before_the_newest_settings(path)
    with pytest.raises(LatePhaseError, match=r"different settings \(lr\)"):
        run(FinetuneConfig(**{**DIGITS_RUN, "lr": 0.1}, **LEGACY_SETTINGS, resume=str(path)))


# --- 4. TensorBoard logs ----------------------------------------------------------------------------------------------
def test_only_the_event_file_lpconvert_wrote_is_published(tmp_path, interrupted, monkeypatch):
    path = _copy(interrupted, tmp_path / "run")
    logs = path / "tensorboard"
    (logs / "notes.txt").write_text("my private notes")
    (logs / "events.out.tfevents.1700000000.my-laptop.42").write_bytes(b"my own experiment")
    (logs / "other").mkdir()
    (logs / "other" / "events.out.tfevents.1700000001.my-laptop.43").write_bytes(b"another one")
    report = run(FinetuneConfig(**DIGITS_RUN, resume=str(path)))
    model_dir = Path(report["model_dir"])
    published = sorted(p.relative_to(model_dir).as_posix() for p in (model_dir / "runs").rglob("*"))
    assert published == [f"runs/{EVENTS_NAME}"]
    assert (model_dir / "runs" / EVENTS_NAME).read_bytes() == (logs / EVENTS_NAME).read_bytes()
    assert (logs / "notes.txt").read_text() == "my private notes"  # the user's files stay where they were

    # a model folder holding another event file in runs/ (an earlier lpconvert copied them) publishes only its own
    (model_dir / "runs" / "events.out.tfevents.1700000000.my-laptop.42").write_bytes(b"my own experiment")
    with HubServer() as hub:
        configure_client(monkeypatch, hub, tmp_path)
        push(model_dir, "alice/digits", token=TEST_TOKEN, allow_regression=True)
        files = hub.files("alice/digits")
    assert sorted(name for name in files if name.startswith("runs/")) == [f"runs/{EVENTS_NAME}"]
    assert files[f"runs/{EVENTS_NAME}"] == (logs / EVENTS_NAME).read_bytes()


# --- 5. BatchNorm recalibration on images the model cannot take ----------------------------------------------------
def test_recalibrating_on_images_the_model_cannot_take_is_one_line_and_writes_nothing(tmp_path):
    images = two_class_tree(tmp_path / "images")
    run(FinetuneConfig(model="cifar_lenet5_bn", pretrained=False, num_classes=2, data=str(images), K=2, epochs=1,
                       batch_size=4, workers=0, quiet=True, threads=1, select="last", output=str(tmp_path / "run")))
    result = invoke("collapse", tmp_path / "run", "--bn-stats", "recalibrate", "--data", DIGITS,
                    "--out", tmp_path / "out")
    one_line_error(result, "the data gives 1×8×8 images", "its first layer conv1 takes 3 channels, not 1")
    assert not (tmp_path / "out").exists()
    result = invoke("collapse", tmp_path / "run", "--bn-stats", "recalibrate", "--data", images,
                    "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "lpconvert.json").read_text())["averaging"]["bn_stats"] == "recalibrate"
