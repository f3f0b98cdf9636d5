"""Never lose what the user has: per family of failure, driven as a user would (the CLI), the exit code, one line
without a traceback, and the folder listing before and after (nothing written, nothing removed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from click.testing import CliRunner
from PIL import Image

import lpconvert
from lpconvert.cli import main
from lpconvert.config import FinetuneConfig
from lpconvert.run.folder import RunLock
from lpconvert.run.ownership import MARKER
from lpconvert.train.finetune import RunInterrupted, run

DIGITS = ["--data", "sklearn-digits", "--batch-size", "40", "--workers", "0", "--quiet", "--no-pretrained",
          "--schedule", "constant", "--epochs", "1", "--K", "2"]


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def listing(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def assert_one_line(result, *fragments, code=2):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(("error: ", "interrupted")), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def digits_run(path: Path, **overrides) -> dict:
    values = dict(model="digits_cnn", pretrained=False, data="sklearn-digits", K=2, epochs=1, batch_size=40,
                  workers=0, quiet=True, schedule="constant", output=str(path))
    values.update(overrides)
    return run(FinetuneConfig(**values))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    return tmp_path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("finished") / "run"
    digits_run(path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# 1. ownership: --force replaces only what lpconvert made; never the working directory, home, or the source
# --------------------------------------------------------------------------------------------------------------------
def _user_folder(root: Path) -> None:
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("months of work")


def _recipe_that_forces(root: Path) -> None:
    (root / "recipe.yaml").write_text("settings:\n  model: digits_cnn\n  output: .\n  force: true\n")


OWNERSHIP = {
    "force on a user's folder": (_user_folder, ["finetune", "digits_cnn", *DIGITS, "--output", "mine", "--force"],
                                 ["not an lpconvert run folder", "--force only replaces what lpconvert made"]),
    "a recipe cannot force": (_recipe_that_forces, ["finetune", "--recipe", "recipe.yaml", *DIGITS],
                              ["sets 'force'", "command line"]),
    "force on the working directory": (None, ["finetune", "digits_cnn", *DIGITS, "--output", ".", "--force"],
                                       ["working directory"]),
    "force on the home directory": (None, ["finetune", "digits_cnn", *DIGITS, "--output", "~", "--force"],
                                    ["your home"]),
    "demo force on a user's folder": (_user_folder, ["demo", "--output", "mine", "--force"],
                                      ["not an lpconvert demo folder"]),
}


@pytest.mark.parametrize("case", sorted(OWNERSHIP))
def test_force_never_touches_what_lpconvert_did_not_make(workdir, case):
    setup, args, fragments = OWNERSHIP[case]
    if setup:
        setup(workdir)
    before = listing(workdir)
    assert_one_line(invoke(*args), *fragments)
    assert listing(workdir) == before


@pytest.mark.parametrize("out", ["run", "run/model/again", "."])
def test_collapse_never_writes_into_or_over_its_source(workdir, finished_run, out):
    import shutil

    shutil.copytree(finished_run, workdir / "run")
    before = listing(workdir)
    result = invoke("collapse", "run", "--out", out, "--force")
    assert_one_line(result, "would overwrite the source")
    assert listing(workdir) == before


def test_force_replaces_an_lpconvert_run_only_once_the_new_one_is_complete(workdir):
    digits_run(workdir / "run", seed=0)
    old = listing(workdir / "run")
    with pytest.raises(RunInterrupted) as stopped:  # the replacement is interrupted: the old run is intact
        run(FinetuneConfig(model="digits_cnn", pretrained=False, data="sklearn-digits", K=2, epochs=2,
                           batch_size=40, workers=0, quiet=True, schedule="constant", output="run", seed=1, force=True),
            stop_after=5)
    assert listing(workdir / "run") == old
    building = Path(stopped.value.run_dir)
    assert building.name == "run.replacing" and (building / "checkpoints" / "last.pt").is_file()
    # the message names the folder to resume; resuming completes the replacement
    result = invoke("finetune", "--resume", building)
    assert result.exit_code == 0, result.output
    assert not building.exists() and json.loads((workdir / "run" / "config.json").read_text())["seed"] == 1
    assert "replaces" not in json.loads((workdir / "run" / MARKER).read_text())


# --------------------------------------------------------------------------------------------------------------------
# 2. one writer per run
# --------------------------------------------------------------------------------------------------------------------
def test_a_second_process_on_the_same_run_is_refused_and_a_crashed_one_blocks_nothing(workdir):
    with pytest.raises(RunInterrupted):
        run(FinetuneConfig(model="digits_cnn", pretrained=False, data="sklearn-digits", K=2, epochs=1, batch_size=40,
                           workers=0, quiet=True, schedule="constant", output="run"), stop_after=3)
    lock = RunLock(workdir / "run").acquire()  # "another process" writes the run
    try:
        before = listing(workdir)
        for args in (["finetune", "--resume", "run"], ["finetune", "digits_cnn", *DIGITS, "--output", "run", "--force"]):
            assert_one_line(invoke(*args), "is being written by process", str(os.getpid()))
            assert listing(workdir) == before
    finally:
        lock.release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from lpconvert.run.folder import RunLock; RunLock(Path('run')).acquire(); "
                               "print('locked', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)  # a crash
    holder.wait()
    result = invoke("finetune", "--resume", "run")
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------------------------------------------------
# 3. validate everything, then create: a failure leaves nothing on disk
# --------------------------------------------------------------------------------------------------------------------
def _image_tree(root: Path, mode: str = "RGB", corrupt_first: bool = False) -> None:
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(6):
                Image.new(mode, (32, 32), 40 * i).save(root / split / label / f"{i:03d}.png")
    if corrupt_first:
        (root / "train" / "a" / "000.png").write_bytes((root / "train" / "a" / "001.png").read_bytes()[:40])


def _weights(root: Path, kind: str) -> None:
    state = timm.create_model("digits_cnn").state_dict()
    if kind == "nan":
        state["fc.weight"][0, 0] = float("nan")
    elif kind == "negative-variance":
        state["features.1.1.running_var"][3] = -0.5
    elif kind == "overflowing":  # every weight finite, the logits +inf
        state["features.0.0.weight"] *= 1e6
        state["fc.weight"].fill_(3e38)
    else:
        state = {k: (v * 100).to(torch.int8) if v.is_floating_point() else v for k, v in state.items()}
    safetensors.torch.save_file(state, str(root / f"{kind}.safetensors"))


def _recipe(text: str):
    return lambda root: (root / "r.yaml").write_text("settings:\n  model: digits_cnn\n" + text)


CIFAR_LIKE = ["--data", "images", "--batch-size", "4", "--workers", "0", "--quiet", "--no-pretrained",
              "--schedule", "constant", "--epochs", "1", "--K", "2"]
DIGITS_CNN = ["digits_cnn", *DIGITS]
RECIPE = ["--recipe", "r.yaml", *DIGITS]
INVALID = {  # case: (setup, arguments of `lpconvert finetune`, fragments of the one line)
    "include matching nothing": (None, [*DIGITS_CNN, "--include", "nothing.*"], ["'nothing.*' matches no"]),
    "negative momentum": (None, [*DIGITS_CNN, "--momentum", "-1"], ["--momentum must lie in [0, 1)"]),
    "lr nan": (None, [*DIGITS_CNN, "--lr", "nan"], ["--lr must be a finite number"]),
    "sigma0 nan": (None, [*DIGITS_CNN, "--sigma0", "nan"], ["--sigma0 must be a finite number"]),
    "negative gamma-theta": (None, [*DIGITS_CNN, "--gamma-theta", "-1"], ["--gamma-theta must be a positive number"]),
    "negative lr-end": (None, [*DIGITS_CNN, "--lr-end", "-0.1"], ["--lr-end must be 0 or more"]),
    "unknown device": (None, [*DIGITS_CNN, "--device", "gpu"], ["--device must be auto, cpu, cuda or cuda:N", "'gpu'"]),
    "bad hub repo id": (None, [*DIGITS_CNN, "--push-to-hub", "not a repo"], ["--push-to-hub is not a Hub repository"]),
    "push without a token": (None, [*DIGITS_CNN, "--push-to-hub", "alice/digits-lpw"], ["needs a Hub token"]),
    "more members than minibatches": (None, [*DIGITS_CNN, "--K", "50"],
                                      ["--K 50 members", "only 27 late-phase minibatches"]),
    "NaN weights": (lambda r: _weights(r, "nan"), [*DIGITS_CNN, "--weights", "nan.safetensors"],
                    ["non-finite", "fc.weight"]),
    "negative BatchNorm variance": (lambda r: _weights(r, "negative-variance"),
                                    [*DIGITS_CNN, "--weights", "negative-variance.safetensors"],
                                    ["negative BatchNorm variance in features.1.1.running_var",
                                     "checkpoint is broken"]),
    "outputs overflow": (lambda r: _weights(r, "overflowing"), [*DIGITS_CNN, "--weights", "overflowing.safetensors"],
                         ["the model's outputs are not finite", "huge values"]),
    "sigma0 overflowing the members": (None, [*DIGITS_CNN, "--sigma0", "1e38"],
                                       ["initialised by Eq. 2 holds non-finite values", "features.0.1.weight",
                                        "lower --sigma0 (now 1e+38)"]),
    "sigma0 overflowing the outputs": (None, [*DIGITS_CNN, "--sigma0", "1e20"],
                                       ["Eq. 2 gives non-finite outputs", "lower --sigma0 (now 1e+20)"]),
    "int8 weights": (lambda r: _weights(r, "int8"), [*DIGITS_CNN, "--weights", "int8.safetensors"],
                     ["torch.int8", "dequantize"]),
    "recipe: a word for a number": (_recipe("  lr: fast\n"), RECIPE, ["--lr must be a finite number, got 'fast'"]),
    "recipe: an unknown key": (_recipe("  learning_rate: 0.1\n"), RECIPE, ["unknown setting", "learning_rate"]),
    "recipe: a number for a list of names": (_recipe("  late_phase: 3\n"), RECIPE, ["--late-phase must be a text value"]),
    "RGB data for a grayscale model": (lambda r: _image_tree(r / "images"), ["digits_cnn", *CIFAR_LIKE, "--num-classes", "2"],
                                       ["cannot run on this data", "channels"]),
    "a corrupt image": (lambda r: _image_tree(r / "images", corrupt_first=True), ["cifar_resnet20", *CIFAR_LIKE,
                        "--num-classes", "2"], ["cannot read image", "000.png", "remove or replace"]),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_input_leaves_the_disk_as_it_was(workdir, monkeypatch, case):
    monkeypatch.setenv("HF_HOME", str(workdir / "hf"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("LPCONVERT_CACHE", str(workdir / "cache"))
    setup, args, fragments = INVALID[case]
    if setup:
        setup(workdir)
    before = listing(workdir)
    assert_one_line(invoke("finetune", *args), *fragments)
    assert listing(workdir) == before and not (workdir / "runs").exists()


@pytest.mark.parametrize("args, fragments", [
    (["evaluate", "digits_cnn", "--data", "x", "--batch-size", "0"], ["--batch-size", "x>=1", "lpconvert evaluate --help"]),
    (["evaluate", "digits_cnn", "--data", "x", "--flatness", "a"], ["--flatness takes comma-separated numbers"]),
    (["evaluate", "digits_cnn", "--data", "x", "--device", "gpu"], ["--device must be"]),
    (["finetune", "--bogus"], ["No such option '--bogus'", "lpconvert finetune --help"]),
    (["collapse", "run", "--out", "m", "--bn-stats", "recalibrate"], ["--bn-stats recalibrate needs --data"]),
])
def test_every_command_fails_in_one_line(workdir, finished_run, args, fragments):
    import shutil

    shutil.copytree(finished_run, workdir / "run")
    before = listing(workdir)
    assert_one_line(invoke(*args), *fragments)
    assert listing(workdir) == before


# --------------------------------------------------------------------------------------------------------------------
# 4. what the system does to us: one line too (a traceback only with --debug)
# --------------------------------------------------------------------------------------------------------------------
def test_an_unwritable_output_is_one_line(workdir):
    (workdir / "file.txt").write_text("a file, not a folder")
    before = listing(workdir)
    assert_one_line(invoke("finetune", "digits_cnn", *DIGITS, "--output", "file.txt/run"), "file.txt")
    assert listing(workdir) == before


def test_disk_full_is_one_line_and_debug_shows_the_traceback(workdir, monkeypatch):
    import errno

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lpconvert.train.state.RunCheckpoint, "save", full)
    # the first checkpoint written is the starting one, epoch 0 (a candidate for --select best)
    assert_one_line(invoke("finetune", "digits_cnn", *DIGITS, "--output", "a"), "No space left on device", "best.pt")
    with pytest.raises(OSError):
        invoke("--debug", "finetune", "digits_cnn", *DIGITS, "--output", "b")


# --------------------------------------------------------------------------------------------------------------------
# 5–7. members that train, a run that always delivers, provenance that survives resume
# --------------------------------------------------------------------------------------------------------------------
def test_every_member_gets_its_share_across_epochs(workdir):
    """27 minibatches per epoch (1,080 digits, 120 held out), K = 4: rounds of 4, 4, …, 3 — the round robin goes on
    over the epoch boundary."""
    digits_run(workdir / "run", K=4, epochs=2, late_phase=("batchnorm",))
    checkpoint = torch.load(workdir / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["model"]["features.0.1.num_batches_tracked"].tolist() == [14, 14, 13, 13]


@pytest.mark.parametrize("scores, exported_K", [((90.0, 50.0), 1), ((50.0, 90.0), 3)])
def test_the_best_epoch_is_exported_before_or_after_t0(workdir, monkeypatch, scores, exported_K):
    """--t0 1: epoch 1 is plain (K = 1), epoch 2 late-phase; whichever is best is exported as what it is."""
    from lpconvert.train import finetune

    real = finetune.evaluate_averaged
    seen = iter(scores)

    def scored(*args):
        metrics = real(*args)
        return {**metrics, "top1": next(seen)}

    monkeypatch.setattr(finetune, "evaluate_averaged", scored)
    report = digits_run(workdir / "run", K=3, epochs=2, t0=1, late_phase=("batchnorm", "classifier"))
    assert report["K"] == exported_K and report["epoch"] == (1 if exported_K == 1 else 2)
    assert ("before T0" in report.get("note", "")) == (exported_K == 1)
    state = safetensors.torch.load_file(str(workdir / "run" / "model" / "model.safetensors"))
    timm.create_model("digits_cnn").load_state_dict(state, strict=True)
    card = (workdir / "run" / "model" / "README.md").read_text()
    assert ("K = 1: plain fine-tuning" in card) == (exported_K == 1)


def test_provenance_survives_resume(workdir):
    base = lpconvert.save_pretrained(timm.create_model("digits_cnn").eval(), workdir / "base")
    common = dict(model=f"local-dir:{base}", pretrained=True, epochs=2)
    digits_run(workdir / "straight", **common)
    with pytest.raises(RunInterrupted):
        run(FinetuneConfig(data="sklearn-digits", K=2, batch_size=40, workers=0, quiet=True, schedule="constant",
                           output="resumed", **common), stop_after=20)
    digits_run(workdir / "resumed", resume="resumed", **common)
    source = {name: json.loads((workdir / name / "model" / "lpconvert.json").read_text())["source"]
              for name in ("straight", "resumed")}
    assert source["resumed"] == source["straight"] and source["resumed"]["pretrained"] is True
    card = (workdir / "resumed" / "model" / "README.md").read_text()
    assert "random initialisation" not in card and "`base`" in card


# --------------------------------------------------------------------------------------------------------------------
# 8. quiet but never silent
# --------------------------------------------------------------------------------------------------------------------
def test_an_interrupt_names_the_real_run_directory(workdir):
    args = [sys.executable, "-m", "lpconvert", "finetune", "digits_cnn", "--data", "sklearn-digits",
            "--no-pretrained", "--K", "2", "--epochs", "50", "--batch-size", "40", "--workers", "0", "--quiet",
            "--schedule", "constant", "--output", "somewhere/run"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "somewhere" / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGINT)") and last.endswith("--resume somewhere/run"), err
    assert "Traceback" not in err and "RUN_DIR" not in err


# --------------------------------------------------------------------------------------------------------------------
# 9. no dead ends: a run that died before its first checkpoint is resumed by starting it again
# --------------------------------------------------------------------------------------------------------------------
def test_a_run_that_died_before_its_first_checkpoint_restarts_with_resume(workdir):
    _image_tree(workdir / "images")
    good = workdir / "images" / "train" / "b" / "005.png"
    image = good.read_bytes()
    good.write_bytes(image[:40])  # a bad image met mid-epoch, after the checks
    args = ["finetune", "cifar_resnet20", *CIFAR_LIKE, "--num-classes", "2", "--data-in-memory", "off",
            "--output", "run"]
    assert_one_line(invoke(*args), "cannot read image", "005.png")
    died = sorted(p.name for p in (workdir / "run").iterdir())
    assert died == sorted([MARKER, ".lock", "config.json", "metrics.jsonl"])
    assert_one_line(invoke(*args), "is not empty", "--resume run")
    good.write_bytes(image)
    (workdir / "run" / "notes.txt").write_text("mine")  # restarting would delete it: refused, nothing touched
    assert_one_line(invoke("finetune", "--resume", "run"), "notes.txt is not a file lpconvert wrote", "move it out")
    assert sorted(p.name for p in (workdir / "run").iterdir()) == sorted(died + ["notes.txt"])
    (workdir / "run" / "notes.txt").unlink()
    result = invoke("finetune", "--resume", "run")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]  # started again: epoch 0 once, not twice
    assert (workdir / "run" / "checkpoints" / "last.pt").is_file() and (workdir / "run" / "model").is_dir()
    assert json.loads((workdir / "run" / "config.json").read_text())["output"] == "run"


# --------------------------------------------------------------------------------------------------------------------
# 5. finite or nothing: a diverged run says what is left; non-finite weights are never collapsed, saved or evaluated
# --------------------------------------------------------------------------------------------------------------------
def test_a_run_that_diverges_before_its_first_checkpoint_says_nothing_was_saved(workdir):
    result = invoke("finetune", "digits_cnn", *DIGITS, "--lr", "1e6", "--output", "run")
    assert_one_line(result, "non-finite loss at epoch 1", "nothing was saved", "run holds only its settings",
                    "lower --lr")
    assert "intact" not in result.output and "--resume run and a lower --lr" in result.output
    assert sorted(p.name for p in (workdir / "run").iterdir()) == [".lock", MARKER, "config.json", "metrics.jsonl"]
    again = invoke("finetune", "--resume", "run", "--lr", "0.01")  # what the message says to do
    assert again.exit_code == 0, again.output
    assert (workdir / "run" / "model" / "model.safetensors").is_file()


def test_a_run_that_diverges_after_a_checkpoint_keeps_it_intact(workdir):
    result = invoke("finetune", "digits_cnn", *DIGITS, "--lr", "1e6", "--log-every", "1", "--checkpoint-every", "1",
                    "--output", "run")
    # the loss of iteration 3 was computed before its step, which made the BatchNorm statistics NaN: caught before
    # the checkpoint of iteration 3 could hold them
    assert_one_line(result, "non-finite values (NaN or inf) in features.1.1.running_var at epoch 1, iteration 3",
                    f"the last good checkpoint is intact ({Path('run') / 'checkpoints' / 'last.pt'})",
                    "--resume run --force")
    checkpoint = torch.load(workdir / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["position"]["iteration"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("key, value, problem", [
    ("features.1.1.weight", float("nan"), "non-finite values (NaN or inf) in features.1.1.weight"),
    ("features.1.1.running_var", -1.0, "a negative BatchNorm variance in features.1.1.running_var"),
])
def test_collapse_refuses_a_broken_checkpoint(workdir, finished_run, key, value, problem):
    import shutil

    shutil.copytree(finished_run, workdir / "run")
    file = workdir / "run" / "checkpoints" / "best.pt"
    checkpoint = torch.load(file, weights_only=False)
    checkpoint["model"][key][1, 0] = value  # member 1 of a late-phase BatchNorm
    torch.save(checkpoint, file)
    before = listing(workdir)
    assert_one_line(invoke("collapse", "run", "--out", "m"), f"{file.relative_to(workdir)} holds {problem}",
                    "nothing was written")
    assert listing(workdir) == before


def test_save_pretrained_refuses_non_finite_weights(workdir):
    from lpconvert.errors import LatePhaseError
    from lpconvert.publish.loading import load_model
    from lpconvert.publish.model_folder import save_pretrained

    model, source = load_model("digits_cnn", pretrained=False)
    with torch.no_grad():
        model.get_parameter("fc.bias")[2] = float("inf")
    before = listing(workdir)
    with pytest.raises(LatePhaseError, match=r"^the model to save holds non-finite values \(NaN or inf\) in fc.bias; "
                       r"nothing was written to .*model"):
        save_pretrained(model, workdir / "model", source=source)
    assert listing(workdir) == before


def test_evaluating_a_model_whose_outputs_overflow_says_so(workdir):
    from lpconvert.errors import LatePhaseError
    from lpconvert.evaluate.evaluation import evaluate_model
    from lpconvert.publish.loading import load_model

    _weights(workdir, "overflowing")
    model, _ = load_model("digits_cnn", weights=workdir / "overflowing.safetensors")
    batches = [(torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3]))]
    with pytest.raises(LatePhaseError, match=r"^the model's outputs are not finite \(NaN or inf for 4 of 4 examples\)"):
        evaluate_model(model, batches)


def test_messages_stay_one_bounded_line_and_seeds_stay_in_range(workdir):
    """A recipe that expands to a huge value (a YAML alias bomb) is refused in one line of at most ~1,000 characters;
    a seed beyond 2^32 is a one-line setting error, not an internal error."""
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(5)]
    (workdir / "bomb.yaml").write_text("\n".join(bomb + ["settings:", "  model: digits_cnn", "  lr: *f"]) + "\n")
    result = invoke("finetune", "--recipe", "bomb.yaml", "--output", "run")
    assert_one_line(result, "lr")
    assert len(result.output) < 1100 and not (workdir / "run").exists()
    huge = invoke("finetune", "digits_cnn", *DIGITS, "--seed", str(2**70), "--output", "run")
    assert_one_line(huge, "--seed must be below 2^32")


# --------------------------------------------------------------------------------------------------------------------
# 1b. ownership all the way down: every file at every depth is lpconvert's, unchanged (manifest), or --force refuses
# --------------------------------------------------------------------------------------------------------------------
def _notes_in_model(run: Path) -> str:
    (run / "model" / "NOTES.md").write_text("what I learned")
    return "run/model/NOTES.md"


def _backup_checkpoint(run: Path) -> str:
    (run / "checkpoints" / "epoch5_backup.pt").write_bytes(b"five epochs")
    return "run/checkpoints/epoch5_backup.pt"


def _edited_report(run: Path) -> str:
    (run / "report.json").write_text('{"mine": "rewritten by hand"}')
    return "run/report.json"


def _forged_marker(run: Path) -> str:
    import shutil

    shutil.rmtree(run)
    (run / "model").mkdir(parents=True)
    (run / MARKER).write_text("")
    (run / "model" / "thesis.tex").write_text("months of work")
    return "run/.lpconvert-run"


def _forged_marker_with_manifest(run: Path) -> str:
    _forged_marker(run)
    (run / MARKER).write_text(json.dumps({"kind": "run", "files": {}}))
    return "run/model/thesis.tex"


def _user_link(run: Path) -> str:
    (run / "checkpoints" / "best.pt").unlink()
    (run / "checkpoints" / "best.pt").symlink_to(run.parent / "home" / "notes.txt")
    return "run/checkpoints/best.pt"


DEEP = {f.__name__.strip("_"): f for f in (_notes_in_model, _backup_checkpoint, _edited_report, _forged_marker,
                                           _forged_marker_with_manifest, _user_link)}


@pytest.mark.parametrize("case", sorted(DEEP))
def test_force_checks_every_file_at_every_depth(workdir, finished_run, case):
    import shutil

    shutil.copytree(finished_run, workdir / "run")
    foreign = DEEP[case](workdir / "run")
    before = listing(workdir)
    result = invoke("finetune", "digits_cnn", *DIGITS, "--output", "run", "--force")
    assert_one_line(result, f"--force: {foreign} is not a file lpconvert wrote", "move it out first")
    assert listing(workdir) == before


def test_a_finished_run_and_its_model_carry_a_manifest(finished_run):
    marker = json.loads((finished_run / MARKER).read_text())
    assert {"config.json", "metrics.jsonl", "checkpoints/last.pt", "report.json"} <= set(marker["files"])
    assert marker["files"]["report.json"] == (finished_run / "report.json").stat().st_size
    info = json.loads((finished_run / "model" / "lpconvert.json").read_text())
    assert set(info["manifest"]) == {"model.safetensors", "config.json", "README.md"}


def test_collapse_locks_its_output_and_never_replaces_a_finished_model_without_force(workdir, finished_run):
    out = workdir / "out"
    out.mkdir()
    lock = RunLock(out).acquire()  # another collapse is writing it
    try:
        before = listing(workdir)
        assert_one_line(invoke("collapse", finished_run, "--out", out), "is being written by process",
                        str(os.getpid()))
        assert listing(workdir) == before
    finally:
        lock.release(remove=True)
    assert invoke("collapse", finished_run, "--out", out).exit_code == 0
    assert not (out / ".lock").exists()
    before = listing(workdir)
    assert_one_line(invoke("collapse", finished_run, "--out", out), "is not empty", "--force")
    assert listing(workdir) == before
    assert invoke("collapse", finished_run, "--out", out, "--force").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "lpconvert.json", "model.safetensors"]


def test_a_dangling_symlink_as_output_is_one_line(workdir, finished_run):
    (workdir / "out").symlink_to(workdir / "missing")
    before = listing(workdir)
    for args in (["collapse", finished_run, "--out", "out"], ["finetune", "digits_cnn", *DIGITS, "--output", "out"]):
        assert_one_line(invoke(*args), "out is a symlink to", "which does not exist")
        assert listing(workdir) == before
