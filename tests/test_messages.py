"""Issue #19, the messages family: every user error names the right cause and an existing flag of the command that
runs, in one bounded line (exit code 2); ``--data sklearn-digits`` works for ``evaluate`` as for ``finetune``; the
pickle refusal names the pickled global; a malformed ``HF_ENDPOINT`` cannot break ``import lpconvert``."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image

from lpconvert.cli import main

REPO = Path(__file__).resolve().parent.parent
DIGITS = ["--data", "sklearn-digits", "--workers", "0"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments: str, absent: tuple[str, ...] = (), logged: str = "\0") -> str:
    """The one ``error:`` line (exit code 2); lines starting with `logged` are progress logs, not the error."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip() and not line.startswith(logged)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert len(lines[0]) <= 1200, lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    for fragment in absent:
        assert fragment not in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("messages") / "run"
    result = invoke("finetune", "digits_cnn", *DIGITS, "--batch-size", "40", "--quiet", "--no-pretrained",
                    "--schedule", "constant", "--epochs", "2", "--t0", "1", "--K", "2", "--output", run)
    assert result.exit_code == 0, result.output
    return run


def _image_root(root: Path, classes: int = 3, per_class: int = 2) -> Path:
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.new("L", (8, 8), 60 * i).save(root / split / f"c{c}" / f"{i}.png")
    return root


def test_evaluate_takes_sklearn_digits_like_finetune(tmp_path, digits_run):
    state = timm.create_model("digits_cnn").state_dict()
    torch.save(state, tmp_path / "w.pth")
    result = invoke("evaluate", "digits_cnn", "--weights", tmp_path / "w.pth", *DIGITS)
    assert result.exit_code == 0, result.output
    assert "597 images" in result.output  # finetune's digits test split
    result = invoke("evaluate", digits_run, *DIGITS, "--bn-stats", "all", "--subset", "100")
    assert result.exit_code == 0, result.output
    assert "averaged (recalibrate)" in result.output and "100 images" in result.output


def test_a_class_count_mismatch_names_each_commands_own_fix(tmp_path):
    """evaluate has no --num-classes: it says what the model and the data have and what to do instead."""
    data = _image_root(tmp_path / "three")
    torch.save(timm.create_model("digits_cnn").state_dict(), tmp_path / "w.pth")
    one_line_error(invoke("evaluate", "digits_cnn", "--weights", tmp_path / "w.pth", "--data", data, "--workers", "0"),
                   "the data has 3 classes but the model has 10 outputs", "evaluate it on data of its 10 classes",
                   "lpconvert finetune MODEL --num-classes 3", absent=("pass --num-classes",))
    one_line_error(invoke("finetune", "digits_cnn", "--no-pretrained", "--data", data, "--workers", "0", "--quiet",
                          "--output", tmp_path / "run"),
                   "the data has 3 classes but the model has 10 outputs", "pass --num-classes 3 to train a new head")


def test_collapse_recalibrate_names_no_flag_it_lacks(tmp_path, digits_run):
    """Recalibration reads no labels (no --num-classes advice) and uses the run's batch size (no --batch-size)."""
    data = _image_root(tmp_path / "small")
    one_line_error(invoke("collapse", digits_run, "--out", tmp_path / "m", "--bn-stats", "recalibrate",
                          "--data", data),
                   "fewer than one batch of the run's batch size 40", "--data", "--bn-stats fold",
                   absent=("--num-classes", "--batch-size"))


def test_full_cache_disk_is_not_blamed_on_the_archive(tmp_path, monkeypatch):
    root = _image_root(tmp_path / "tree", classes=2, per_class=1)
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="data")
    cache = tmp_path / "cache"
    monkeypatch.setenv("LPCONVERT_CACHE", str(cache))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(cache / "extracted" / "x"))

    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    line = one_line_error(invoke("evaluate", "digits_cnn", "--data", archive, "--workers", "0"),
                          "is full", str(cache / "extracted"), "LPCONVERT_CACHE",
                          absent=("check that the archive is complete",), logged="extracting ")
    assert os.strerror(errno.ENOSPC) in line


def test_pickle_refusal_names_the_global_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"weight": Evil()}, tmp_path / "evil.pth")
    line = one_line_error(invoke("evaluate", "digits_cnn", "--weights", tmp_path / "evil.pth", *DIGITS),
                          f"it pickles {os.system.__module__}.system", "not a weights-only checkpoint",
                          "safetensors", absent=("weights_only=False", "weights_only"))
    assert "lpconvert never unpickles" in line
    assert not marker.exists()


@pytest.mark.parametrize("endpoint", ["http://[bad", "http://host:99999", "not-a-url"])
def test_malformed_hf_endpoint_does_not_break_import(endpoint):
    env = {**os.environ, "HF_ENDPOINT": endpoint}
    done = subprocess.run([sys.executable, "-c", "import lpconvert, lpconvert.cli"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_malformed_hf_endpoint_is_one_line_when_the_hub_is_used(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://[bad", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "lpconvert", "evaluate", "hf-hub:timm/resnet18.a1_in1k", *DIGITS],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: HF_ENDPOINT='http://[bad'"), done.stderr
    assert "unset it" in lines[0]
