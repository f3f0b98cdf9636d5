"""Settings: defaults are the paper's ImageNet recipe; recipes (YAML, TOML) set fields; flags override them."""

import dataclasses

import pytest

from lpconvert.cli import build_config
from lpconvert.config import CHOICES, SELECT, FinetuneConfig
from lpconvert.errors import LatePhaseError
from lpconvert.train.optim import lr_factor
from lpconvert.zoo import list_recipes, read_recipe


def test_defaults_are_the_paper_imagenet_recipe():
    c = FinetuneConfig()
    assert (c.optimizer, c.momentum, c.weight_decay, c.batch_size, c.lr, c.epochs, c.K, c.sigma0) == (
        "sgd", 0.9, 1e-4, 256, 0.001, 20, 10, 0.0)
    assert c.gamma_theta is None and c.late_phase == ("batchnorm",) and c.milestones == (10,)
    assert lr_factor(c.optim_settings, 9.99) == 1.0 and lr_factor(c.optim_settings, 10.0) == pytest.approx(0.1)
    half = FinetuneConfig(epochs=1, milestones=(0.5,))  # fractional milestones: one-epoch schedules
    assert lr_factor(half.optim_settings, 0.49) == 1.0 and lr_factor(half.optim_settings, 0.5) == pytest.approx(0.1)


def test_every_setting_documents_itself():
    fields = dataclasses.fields(FinetuneConfig)
    for field in fields:
        assert field.metadata.get("help", "").strip(), f"FinetuneConfig.{field.name} has no help"
        assert set(field.metadata) <= {"help", "choices", "path", "argument", "aliases", "flag_value",
                                      "nargs"}, field.name
        assert field.metadata.get("path") in (None, "file", "dir"), field.name
    assert [f.name for f in fields if f.metadata.get("argument")] == ["model"]  # the MODEL argument, not a flag
    assert CHOICES["select"] == SELECT and CHOICES["member_optimizer"] == CHOICES["optimizer"]
    with pytest.raises(LatePhaseError, match="--select is not one of best, last"):
        FinetuneConfig(select="first")


def test_yaml_and_toml_recipes_with_flag_overrides(tmp_path):
    (tmp_path / "r.yaml").write_text("paper: {base: 1}\nsettings:\n  model: resnet50\n  K: 4\n  late-phase: [bn, head]\n"
                                     "  milestones: [5, 8]\n")
    (tmp_path / "r.toml").write_text('model = "resnet50"\nK = 4\nlate_phase = ["bn"]\nlr = 0.01\n')
    yaml_config = build_config(None, str(tmp_path / "r.yaml"), {"K": 6, "lr": None})
    assert (yaml_config.model, yaml_config.K, yaml_config.late_phase, yaml_config.milestones) == (
        "resnet50", 6, ("bn", "head"), (5, 8))
    toml_config = build_config("resnet18", str(tmp_path / "r.toml"), {})
    assert (toml_config.model, toml_config.K, toml_config.lr) == ("resnet18", 4, 0.01)
    (tmp_path / "bad.yaml").write_text("settings:\n  model: resnet50\n  learning_rate: 0.1\n")
    with pytest.raises(LatePhaseError, match="unknown setting.*learning_rate"):
        build_config(None, str(tmp_path / "bad.yaml"), {})
    (tmp_path / "broken.toml").write_text("K = = 3")
    with pytest.raises(LatePhaseError, match="cannot parse recipe"):
        read_recipe(tmp_path / "broken.toml")


def test_schedules():
    linear = FinetuneConfig(lr=0.01, schedule="linear", anneal_start=0, anneal_end=10, lr_end=0.001, epochs=20)
    factors = [lr_factor(linear.optim_settings, e) for e in (0, 5, 10, 15)]
    assert [round(f * linear.lr, 6) for f in factors] == [0.01, 0.0055, 0.001, 0.001]
    cosine = FinetuneConfig(lr=0.1, schedule="cosine", epochs=10, lr_end=0.0)
    assert lr_factor(cosine.optim_settings, 0) == 1.0 and lr_factor(cosine.optim_settings, 5) == pytest.approx(0.5) and lr_factor(cosine.optim_settings, 10) == 0
    swa = FinetuneConfig(lr=0.1, schedule="constant", swa_start=3, swa_lr=0.05)
    assert lr_factor(swa.optim_settings, 2.9) == 1.0 and lr_factor(swa.optim_settings, 3) == 0.5


def test_the_zoo_recipes_parse_and_carry_the_paper_numbers():
    recipes = {r["name"]: r for r in list_recipes()}
    assert recipes["imagenet_resnet152"]["paper"] == {"base": 78.31, "fine-tuned": 78.37, "late-phase": 78.77}
    for recipe in recipes.values():
        build_config(None, recipe["file"], {})  # every recipe is a valid configuration


def test_lpconvert_zoo_lists_paper_and_measured_numbers_alike():
    from click.testing import CliRunner

    from lpconvert.cli import main

    result = CliRunner().invoke(main, ["zoo"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    scratch = lines[lines.index("cifar10_10k_scratch_resnet20") + 2:][:2]
    assert [line.strip() for line in scratch] == [
        "paper: base 88.98 → late-phase BN 89.58",
        "measured: base (plain training) 80.25 ± 0.69 → late-phase BN 80.09 ± 0.61 → gain over plain "
        "−0.16 [−0.49, +0.17] (paired: −0.21/−0.26/−0.01)"]
    resnet152 = lines[lines.index("imagenet_resnet152") + 2:][:2]
    assert [line.strip() for line in resnet152] == ["paper: base 78.31 → fine-tuned 78.37 → late-phase 78.77",
                                                    "measured: not run yet"]


def test_warmup_rises_linearly_from_warmup_lr_into_the_schedule():
    c = FinetuneConfig(lr=0.1, epochs=20, warmup_epochs=2, warmup_lr=0.001, schedule="cosine", lr_end=0.0)
    assert lr_factor(c.optim_settings, 0.0) == pytest.approx(0.01)  # warmup_lr / lr
    halfway = 0.01 + (lr_factor(FinetuneConfig(lr=0.1, epochs=20, schedule="cosine").optim_settings, 1.0) - 0.01) * 0.5
    assert lr_factor(c.optim_settings, 1.0) == pytest.approx(halfway)
    assert lr_factor(c.optim_settings, 2.0) == lr_factor(FinetuneConfig(lr=0.1, epochs=20, schedule="cosine").optim_settings, 2.0)
    with pytest.raises(LatePhaseError, match="--warmup-epochs"):
        FinetuneConfig(epochs=2, warmup_epochs=2)
    with pytest.raises(LatePhaseError, match="--smoothing"):
        FinetuneConfig(smoothing=1.0)


def _flags(**given):
    """build_config's flags as click passes them: every setting, None where not given."""
    return {**{f.name: None for f in dataclasses.fields(FinetuneConfig)}, **given}


def test_a_batch_flag_given_is_given_whatever_its_value(tmp_path):
    """--batch-size 256 is as given as --batch-size 128: with --batch-size-per-gpu it is refused, not dropped."""
    with pytest.raises(LatePhaseError, match="--batch-size-per-gpu and --batch-size 256 both set the batch"):
        FinetuneConfig(batch_size=256, batch_size_per_gpu=32)
    assert FinetuneConfig(batch_size_per_gpu=32).batch_size is None  # the global batch: per process × processes
    assert FinetuneConfig().batch_size == 256 and FinetuneConfig(batch_size=256).batch_size == 256
    # a flag replaces a recipe's value of the same quantity, whichever of the two ways each gives it
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: digits_cnn\nbatch_size: 128\nimg_size: 40\n")
    per_gpu = build_config(None, str(recipe), _flags(batch_size_per_gpu=32, input_size=(3, 48, 48)))
    assert (per_gpu.batch_size, per_gpu.batch_size_per_gpu) == (None, 32)
    assert (per_gpu.img_size, per_gpu.input_size) == (None, (3, 48, 48))
    recipe.write_text("model: digits_cnn\nbatch_size_per_gpu: 16\n")
    assert build_config(None, str(recipe), _flags(batch_size=256)).batch_size == 256
    with pytest.raises(LatePhaseError, match="--batch-size-per-gpu and --batch-size 256 both set the batch"):
        build_config("digits_cnn", None, _flags(batch_size=256, batch_size_per_gpu=32))


def test_a_recipe_shortened_with_epochs_stretches_its_schedule(tmp_path, caplog):
    recipe = "zoo/cifar10_pretrained_resnet20.yaml"
    with caplog.at_level("INFO", logger="lpconvert"):
        config = build_config(None, recipe, _flags(epochs=3))
    assert (config.epochs, config.anneal_start, config.anneal_end, config.lr_end) == (3, 0.0, 1.5, 0.001)
    assert "--epochs 3 stretches the recipe's 20-epoch schedule: --anneal-end 10 → 1.5" in caplog.text
    # a point given on the command line is the user's, not stretched; T0 and SWA start stay whole epochs before the end
    assert build_config(None, recipe, _flags(epochs=3, anneal_end=2.0)).anneal_end == 2.0
    points = tmp_path / "points.yaml"
    points.write_text("model: digits_cnn\nepochs: 200\nt0: 50\nswa_start: 160\nmilestones: [100, 150]\n")
    config = build_config(None, str(points), _flags(epochs=4))
    assert (config.t0, config.swa_start, config.milestones) == (1, 3, (2, 3))
    assert build_config(None, str(points), _flags()).t0 == 50  # without --epochs the recipe runs as written


@pytest.mark.slow  # a 3-epoch ResNet-20 run on CIFAR-10: run with -m slow
def test_a_recipe_runs_shortened_to_three_epochs(tmp_path, cifar10_root, cifar_resnet_weights, lpconvert_cache,
                                                 monkeypatch):
    """`lpconvert finetune --recipe zoo/cifar10_pretrained_resnet20.yaml --epochs 3` just works (on a CIFAR subset):
    the schedule is stretched, and the recipe does not trigger lpconvert's own warnings."""
    from click.testing import CliRunner

    from lpconvert.cli import main

    monkeypatch.setenv("LPCONVERT_CACHE", str(lpconvert_cache))
    result = CliRunner().invoke(main, [
        "finetune", "--recipe", "zoo/cifar10_pretrained_resnet20.yaml", "--weights", str(cifar_resnet_weights[20]),
        "--data", str(cifar10_root), "--epochs", "3", "--train-subset", "200", "--val-subset", "100", "--K", "2",
        "--batch-size", "32", "--workers", "0", "--quiet", "--select", "last", "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "--epochs 3 stretches the recipe's 20-epoch schedule: --anneal-end 10 → 1.5" in result.output
    assert "effective learning rate" not in result.output and "warning" not in result.output.lower()
    assert "verdict: test set top-1 " in result.output and "points against your checkpoint" in result.output
