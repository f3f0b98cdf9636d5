"""The command line: a real CIFAR-10 fine-tune of the shared ResNet-20, collapse, inspect, and every bad input."""

import dataclasses
import json

import click
import pytest
import safetensors.torch
import timm
import torch
from click.testing import CliRunner
from PIL import Image

import lpconvert
from lpconvert.cli import main
from lpconvert.config import FinetuneConfig
from lpconvert.data.sampler import EpochBatchSampler

DIGITS = ["--data", "sklearn-digits", "--batch-size", "40", "--workers", "0", "--quiet", "--no-pretrained",
          "--schedule", "constant"]


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory, cifar10_root, cifar_resnet_weights, lpconvert_cache):
    """`lpconvert finetune cifar_resnet20 --weights …` on a CIFAR-10 training subset (1 epoch, K=2, the last epoch
    exported): 100 of the 1,000 training images held out for validation, 500 test images."""
    out = tmp_path_factory.mktemp("cifar") / "run"
    result = invoke(
        "finetune", "cifar_resnet20", "--weights", cifar_resnet_weights[20], "--data", cifar10_root,
        "--train-subset", 1000, "--val-subset", 500, "--epochs", 1, "--K", 2, "--batch-size", 50, "--lr", 0.01,
        "--late-phase", "bn,classifier", "--select", "last", "--workers", 0, "--quiet", "--output", out,
        env={"LPCONVERT_CACHE": str(lpconvert_cache)},
    )
    assert result.exit_code == 0, result.output
    return out, result.output


def test_cifar_resnet20_fine_tune_through_the_cli(cifar_run, pretrained_cifar_resnet):
    out, output = cifar_run
    report = json.loads((out / "report.json").read_text())
    # validated on 100 training images the shared checkpoint was trained on (near 100 %); the test set measured once:
    # the checkpoint reaches 91.73 % on the full test set, about that on a 500-image subset
    assert report["validation"] == "held-out" and 95.0 <= report["start_top1"] <= 100.0
    assert 85.0 < report["test_top1"] < 97.0
    assert f"{report['final_top1']:6.2f}" in output and f"{report['test_top1']:.2f}" in output and "change" in output
    state = safetensors.torch.load_file(str(out / "model" / "model.safetensors"))
    fresh = timm.create_model("cifar_resnet20", num_classes=10)
    fresh.load_state_dict(state, strict=True)
    # fine-tuning moved the weights away from the shared checkpoint
    start = pretrained_cifar_resnet(20).state_dict()
    assert not torch.allclose(state["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"])


def test_collapse_command_rewrites_the_run_with_another_bn_mode(cifar_run, tmp_path):
    out, _ = cifar_run
    result = invoke("collapse", out, "--out", tmp_path / "mean", "--bn-stats", "mean")
    assert result.exit_code == 0, result.output
    mean = safetensors.torch.load_file(str(tmp_path / "mean" / "model.safetensors"))
    fold = safetensors.torch.load_file(str(out / "model" / "model.safetensors"))
    assert torch.equal(mean["conv1.weight"], fold["conv1.weight"])  # shared weights: the same
    assert torch.equal(mean["bn1.running_var"], fold["bn1.running_var"])  # fold keeps the mean statistics ...
    assert not torch.equal(mean["bn1.weight"], fold["bn1.weight"])  # ... and solves γ, β for the members' average
    model, _ = lpconvert.load_late_phase(out)
    expected = lpconvert.collapse(model, bn_stats="mean").state_dict()
    assert all(torch.equal(expected[k], mean[k]) for k in expected)
    info = json.loads((tmp_path / "mean" / "lpconvert.json").read_text())
    assert info["collapsed"] is True and info["metrics"] is None  # measured with fold: no numbers claimed for mean
    again = invoke("collapse", out, "--out", tmp_path / "mean")
    assert_one_line_error(again, "not empty", "--force")


def _options(command):
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


def test_every_setting_has_a_finetune_flag_and_every_option_a_help():
    finetune = main.commands["finetune"]
    flags = _options(finetune)
    arguments = {p.name for p in finetune.params if isinstance(p, click.Argument)}
    for field in dataclasses.fields(FinetuneConfig):
        where = arguments if field.metadata.get("argument") else flags
        assert field.name in where, f"FinetuneConfig.{field.name} has no finetune flag (or argument)"
    for command in (main, *main.commands.values()):
        for option in _options(command).values():
            assert (option.help or "").strip(), f"lpconvert {command.name} {option.opts[0]} has no help text"


def test_inspect_shares_the_flags_of_finetune():
    inspect, finetune = _options(main.commands["inspect"]), _options(main.commands["finetune"])
    shared = set(inspect) & {field.name for field in dataclasses.fields(FinetuneConfig)}
    assert shared == {"K", "late_phase", "late_phase_options", "include", "exclude", "weights", "num_classes"}
    for name in shared:
        assert (inspect[name].opts, inspect[name].help, inspect[name].type.to_info_dict()) == (
            finetune[name].opts, finetune[name].help, finetune[name].type.to_info_dict())


def test_inspect_reports_the_plan():
    result = invoke("inspect", "resnet18", "--K", 4)
    assert result.exit_code == 0, result.output
    assert "targets=batchnorm\n" in result.output and "batchnorm     20 layers" in result.output  # what finetune trains
    assert "classifier" not in result.output
    result = invoke("inspect", "resnet18", "--K", 4, "--late-phase", "bn,head", "--list-layers")
    assert "batchnorm     20 layers" in result.output and "classifier     1 layers" in result.output
    assert "  classifier  fc" in result.output


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["finetune", "resnet5O", "--data", "x"], ["resnet5O", "resnet50"]),
        (["finetune", "digits_cnn", "--K", "0", *DIGITS], ["--K must be a positive integer"]),
        (["finetune", "digits_cnn", "--epochs", "0", *DIGITS], ["--epochs must be a positive integer"]),
        (["finetune", "digits_cnn", "--device", "cuda", *DIGITS], ["no CUDA GPU"]),
        (["finetune", "digits_cnn", "--late-phase", "bn,attention", *DIGITS], ["unknown late-phase target 'attention'"]),
        (["finetune", "digits_cnn", "--t0", "5", "--epochs", "3", *DIGITS], ["--t0 must be smaller", "got 5"]),
        (["finetune", "digits_cnn", *DIGITS, "--batch-size", "5000"], ["fewer than one batch", "--batch-size"]),
        (["finetune", "digits_cnn", "--recipe", "missing.yaml"], ["missing.yaml", "lpconvert zoo"]),
        (["finetune", "digits_cnn", "--milestones", "5,x", *DIGITS], ["--milestones must be a finite number", "'x'"]),
        (["collapse", ".", "--out", "elsewhere"], ["not an lpconvert run directory"]),
        (["inspect", "resnet18", "--include", "nothing.*"], ["'nothing.*' matches no"]),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "elsewhere").exists()  # nothing written


def _image_tree(root, classes, per_class=2):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (10 * i, 40, 90)).save(root / name / f"{i}.png")


def test_data_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = invoke("finetune", "cifar_resnet20", "--no-pretrained", "--data", tmp_path / "nope", "--quiet")
    assert_one_line_error(missing, "nope")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    empty = invoke("finetune", "cifar_resnet20", "--no-pretrained", "--data", tmp_path / "empty", "--quiet")
    assert_one_line_error(empty, "empty")
    _image_tree(tmp_path / "three" / "train", ["a", "b", "c"])
    _image_tree(tmp_path / "three" / "val", ["a", "b", "c"])
    mismatch = invoke("finetune", "cifar_resnet20", "--no-pretrained", "--data", tmp_path / "three", "--quiet")
    assert_one_line_error(mismatch, "3 classes", "--num-classes 3")
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_other_settings_and_non_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(lpconvert.train.finetune.RunInterrupted):
        lpconvert.train.finetune.run(
            lpconvert.config.FinetuneConfig(model="digits_cnn", pretrained=False, data="sklearn-digits", K=2,
                                            epochs=1, batch_size=40, workers=0, quiet=True, output="run"),
            stop_after=3,
        )
    other = invoke("finetune", "digits_cnn", "--K", 3, "--epochs", 1, "--resume", "run", *DIGITS)
    assert_one_line_error(other, "different settings", "K", "--force")
    (tmp_path / "plain").mkdir()
    not_a_run = invoke("finetune", "digits_cnn", "--resume", "plain", *DIGITS)
    assert_one_line_error(not_a_run, "not an lpconvert run directory")
    busy = invoke("finetune", "digits_cnn", "--K", 2, "--epochs", 1, "--output", "run", *DIGITS)
    assert_one_line_error(busy, "not empty", "--resume run")


def test_world_size_must_divide_the_batch():
    with pytest.raises(lpconvert.LatePhaseError, match="multiple of 3"):
        EpochBatchSampler(100, 40, world_size=3)


def test_out_of_memory_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(lpconvert.LatePhaseEngine, "step", out_of_memory)
    result = invoke("finetune", "digits_cnn", "--K", 2, "--epochs", 1, *DIGITS)
    assert_one_line_error(result, "out of GPU memory", "--batch-size", "--mode sequential")


def test_rank_shards_make_up_the_single_process_batch():
    whole = EpochBatchSampler(100, 20, seed=3)
    ranks = [EpochBatchSampler(100, 20, seed=3, rank=r, world_size=2) for r in range(2)]
    for sampler in (whole, *ranks):
        sampler.set_position(epoch=2, start_batch=1)
    for batch, shard0, shard1 in zip(whole, *ranks):
        assert batch == shard0 + shard1
    assert len(whole) == 4 and len(list(whole)) == 4


def test_evaluate_a_run_every_collapse_mode_and_the_ensemble(cifar_run, cifar10_root, shared_dir, tmp_path,
                                                              lpconvert_cache, monkeypatch):
    monkeypatch.setenv("LPCONVERT_CACHE", str(lpconvert_cache))
    out, _ = cifar_run
    result = invoke("evaluate", out, "--data", cifar10_root, "--subset", 500, "--bn-stats", "all", "--ensemble",
                    "--ood", shared_dir / "data/cifar100/test.tar.gz", "--workers", 0, "--json", tmp_path / "e.json",
                    "--csv", tmp_path / "e.csv")
    assert result.exit_code == 0, result.output
    rows = {row["variant"]: row for row in json.loads((tmp_path / "e.json").read_text())}
    assert set(rows) == {"averaged (fold)", "averaged (mean)", "averaged (recalibrate)", "ensemble (K=2, not averaged)"}
    report = json.loads((out / "report.json").read_text())
    # the same 500 test images as the run's one test evaluation: the fold-collapsed model scores what it recorded
    assert rows["averaged (fold)"]["top1"] == pytest.approx(report["test_top1"], abs=1e-9)
    for row in rows.values():
        assert 85.0 < row["top1"] < 97.0 and 0.0 < row["ece"] < 0.2 and row["nll"] < 0.6
        assert 0.7 < row["auroc/cifar100"] < 1.0  # CIFAR-100 is told apart from CIFAR-10 by predictive entropy
    # statistics re-estimated on augmented training images stay close (un-augmented ones cost ~3 points here)
    assert abs(rows["averaged (recalibrate)"]["top1"] - rows["averaged (fold)"]["top1"]) < 1.5
    assert (tmp_path / "e.csv").read_text().splitlines()[0].startswith("variant,top1,top5,nll,ece")


def test_evaluate_a_pretrained_checkpoint(cifar10_root, cifar_resnet_weights, lpconvert_cache, monkeypatch):
    monkeypatch.setenv("LPCONVERT_CACHE", str(lpconvert_cache))
    result = invoke("evaluate", "cifar_resnet20", "--weights", cifar_resnet_weights[20], "--data", cifar10_root,
                    "--subset", 500, "--workers", 0, "--flatness", "0.05,0.2", "--flatness-draws", 2)
    assert result.exit_code == 0, result.output
    header, model_row = result.stdout.splitlines()[:2]  # stderr may log the archives' extraction
    values = dict(zip(header.split(), map(float, model_row.split()[1:])))
    assert 88.0 < values["top1"] < 96.0  # 91.73 % on the full test set
    assert 0.0 < values["flatness/0.05"] < values["flatness/0.2"]  # more weight noise, more loss
    no_run = invoke("evaluate", "cifar_resnet20", "--weights", cifar_resnet_weights[20], "--data", cifar10_root,
                    "--ensemble")
    assert_one_line_error(no_run, "late-phase run")


def test_inspect_and_finetune_give_one_verdict(tmp_path):
    """Targets a model does not have: `inspect` refuses exactly as `finetune` does (exit 2, the same line), and the
    counts it gives for the kinds present are what `--late-phase KIND` alone converts."""
    import timm

    import lpconvert

    inspected = invoke("inspect", "digits_cnn", "--late-phase", "layernorm")
    tuned = invoke("finetune", "digits_cnn", "--no-pretrained", "--late-phase", "layernorm", "--data", "sklearn-digits",
                   "--workers", "0", "--output", str(tmp_path / "run"))
    assert inspected.exit_code == tuned.exit_code == 2
    assert inspected.output.strip() == tuned.output.strip() and "kinds present" in inspected.output
    assert not (tmp_path / "run").exists()
    model = timm.create_model("digits_cnn")
    for kind in ("batchnorm", "classifier", "rank1"):
        count = len(lpconvert.plan(model, 2, kind).layers)
        assert f"{kind} ({count})" in inspected.output


def test_timm_flag_names_and_a_bare_amp(tmp_path):
    """timm's -b, -j, --opt, --sched and --log-interval set the same settings as lpconvert's names; --amp alone is
    bf16 autocast and takes no value, so the next flag is read as a flag (both shown in --help)."""
    from lpconvert.cli import build_config

    ctx = main.commands["finetune"].make_context("finetune", [
        "digits_cnn", "-b", "16", "-j", "0", "--opt", "adamw", "--sched", "cosine", "--log-interval", "7", "--amp",
        "--workers", "1"])
    flags = {k: v for k, v in ctx.params.items() if k not in ("model", "model_option", "recipe", "baseline")}
    config = build_config(ctx.params["model"], None, flags)
    assert (config.batch_size, config.workers, config.optimizer, config.schedule, config.log_every, config.amp) == (
        16, 1, "adamw", "cosine", 7, "bf16")
    help_text = invoke("finetune", "--help").output
    assert "-b, --batch-size" in help_text and "-j, --workers" in help_text and "--opt" in help_text
    both = invoke("finetune", "digits_cnn", "--model", "resnet18", "--output", str(tmp_path / "r"))
    assert both.exit_code == 2 and "two models given" in both.output and not (tmp_path / "r").exists()
