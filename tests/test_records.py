"""Issue #22: a run's records match the run — the model card, config.json and lpconvert.json against each other and
against the run's settings (K, kinds, σ0, γθ resolved, BatchNorm text, the evaluated sets, rounding); timm's
input-size flags; ``save_pretrained`` of a late-phase model from the Python API."""

import json
import re

import pytest
import safetensors.torch
import timm
import torch
import yaml
from image_trees import two_class_tree

import lpconvert
from lpconvert.config import FinetuneConfig
from lpconvert.data import build_data, build_datasets
from lpconvert.data.settings import DataSettings
from lpconvert.data.transforms import data_config
from lpconvert.errors import LatePhaseError
from lpconvert.train.finetune import DIGITS, run

BN_TEXT = "running statistics are the members' mean statistics"
DIGITS_RUN = dict(model="digits_cnn", data=DIGITS, batch_size=100, lr=0.05)
#: The four runs: plain fine-tuning, late-phase BatchNorm, rank-1 (BatchNorm shared) on the digits, and hypernet
#: embeddings of a CIFAR ResNet-20 (BatchNorm shared) on 36×36 images resized by --img-size 40.
RUNS = {
    "baseline": dict(DIGITS_RUN, K=1),
    "batchnorm": dict(DIGITS_RUN, K=3, late_phase=("batchnorm",), sigma0=0.1),
    "rank1": dict(DIGITS_RUN, K=2, late_phase=("rank1",), sigma0=0.2),
    "hypernet": dict(model="cifar_resnet20", num_classes=2, K=2, late_phase=("hypernet",), sigma0=0.1, batch_size=4,
                     lr=0.01, img_size=40),
}


def _config(tmp_path, name, **overrides):
    values = dict(RUNS[name], pretrained=False, epochs=1, workers=0, quiet=True, schedule="constant", select="last",
                  output=str(tmp_path / "run"))
    if "data" not in values:
        values["data"] = str(two_class_tree(tmp_path / "images", size=36, per_class=6))
    return FinetuneConfig(**{**values, **overrides})


def _card(model_dir):
    """The card's YAML front matter and its text."""
    _, front, body = (model_dir / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(front), body


def _table(body, section):
    """The `| name | value |` rows of a section of the card."""
    text = body.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| name |")]


@pytest.mark.parametrize("name", list(RUNS))
def test_card_config_and_provenance_match_the_run(tmp_path, name):
    config = _config(tmp_path, name)
    report = run(config)
    model_dir = tmp_path / "run" / "model"
    meta, body = _card(model_dir)
    info = json.loads((model_dir / "lpconvert.json").read_text())
    timm_config = json.loads((model_dir / "config.json").read_text())
    kinds = lpconvert.layers.resolve_kinds(config.late_phase)
    late = config.K > 1

    # K, the kinds and σ0: the card's table, lpconvert.json's averaging and late-phase config, the run's settings
    hparams = dict(_table(body, "Hyper-parameters"))
    assert hparams["K"] == str(config.K) == str(info["hparams"]["K"]) == str(info["averaging"]["K"]) == str(report["K"])
    assert {t["kind"] for t in info["provenance"]["late_phase"]["targets"]} == set(kinds)
    if late:
        assert hparams["late-phase weights"] == info["averaging"]["late_phase"] == ",".join(sorted(kinds))
        assert float(hparams["sigma0"]) == info["averaging"]["sigma0"] == config.sigma0
        assert f"average of K = {config.K} late-phase members, initialised with σ0 = {config.sigma0:g}" in body
        assert meta["model-index"][0]["name"] == f"{config.model} with late-phase weights"
    else:  # plain fine-tuning: no late-phase weights, no σ0, no γθ, one optimizer
        assert not {"late-phase weights", "sigma0", "gamma_theta", "T0 (epochs)", "U_phi"} & set(hparams)
        assert info["averaging"]["late_phase"] is None and info["averaging"]["sigma0"] is None
        assert "by plain fine-tuning (K = 1)" in body and "the average of K" not in body
        assert meta["model-index"][0]["name"] == "digits_cnn fine-tuned without late-phase weights (K = 1)"
    # γθ resolved: 1/K, as a number, in the card, lpconvert.json's hparams and its recorded configuration
    gamma = 1 / config.K
    assert info["provenance"]["config"]["gamma_theta"] == pytest.approx(gamma) and config.gamma_theta is None
    if late:
        assert info["hparams"]["gamma_theta"] == pytest.approx(gamma) and hparams["gamma_theta"] == f"{gamma:.6g}"
        # every optimizer setting, U_φ's momentum included
        assert hparams["U_phi"] == f"sgd lr={config.lr} momentum=0.9 nesterov=False weight_decay=0.0001"
    assert hparams["U_theta"] == f"sgd lr={config.lr} momentum=0.9 nesterov=False weight_decay=0.0001"
    # the BatchNorm paragraph only when BatchNorm was late-phase
    assert (BN_TEXT in body) == ("batchnorm" in kinds and late)
    # pretrained: the base weights as they were loaded, in the recorded configuration as in the model's source
    assert info["provenance"]["config"]["pretrained"] is info["source"]["pretrained"] is False
    assert set(info["provenance"]["execution"]) >= {"device", "world_size", "threads"}
    assert timm_config["architecture"] == config.model and timm_config["num_classes"] == (config.num_classes or 10)

    # the evaluation table: every figure names its set and its size; numbers rounded to what they resolve
    val = build_data(config.data_settings, timm.create_model(config.model, num_classes=config.num_classes or 10)).val
    final = info["metrics"]["final"]
    dataset = info["metrics"]["dataset"]
    assert dataset["num_images"] == len(val)
    rows = {(row[0], row[1]): row[2:] for row in _table(body, "Evaluation")[1:]}  # [0]: the header
    held_out = bool(dataset.get("held_out"))  # validated on training images held out: no split of the dataset
    assert held_out == (info["metrics"].get("test") is not None)
    what = "training images held out (never trained on)" if held_out else f"{dataset['split']} split"
    where = f"{dataset['name']}, {what}, {len(val):,} images"
    assert rows[("this model", where)] == [f"{final['top1']:.2f}", f"{final['top5']:.2f}", f"{final['nll']:.4f}",
                                          f"{final['ece']:.4f}"]
    assert ("base checkpoint", where) in rows
    test = info["metrics"].get("test")
    if test is not None:  # the test split, evaluated once at the end
        test_set = f"{dataset['name']}, test split, {info['metrics']['test_dataset']['num_images']:,} images"
        assert rows[("this model", test_set)][0] == f"{test['top1']:.2f}"
        start = info["metrics"]["base_test"]  # the start measured on the test set too: the verdict's second line
        assert rows[("base checkpoint", test_set)][0] == f"{start['top1']:.2f}"
        assert f"{start['top1']:.2f} % → {test['top1']:.2f} %" in body.split("\n## ", 1)[0]
    evaluation = body.split("## Evaluation\n", 1)[1].split("\n## ", 1)[0]
    assert not re.search(r"\d\.\d{5,}", evaluation)  # never 96.48241206030151
    results = meta["model-index"][0]["results"]  # the data's splits only: held-out training images are none
    assert [r["dataset"]["split"] for r in results] == (["test"] if held_out else [dataset["split"]])
    published = test if held_out else final
    assert [m["value"] for m in results[0]["metrics"]] == [round(published["top1"], 2), round(published["top5"], 2)]

    if config.img_size is not None:  # the input size the run used is the one config.json's pretrained_cfg states
        assert timm_config["pretrained_cfg"]["input_size"] == [3, config.img_size, config.img_size]
        assert info["source"]["pretrained_cfg"]["input_size"] == [3, 32, 32]  # the base model's own


def test_input_size_flags_set_the_transforms(tmp_path):
    """--img-size 40 on 36-px images of a 32-px model: training and evaluation tensors are 40×40; --input-size sets C H
    W, --crop-pct the evaluation crop."""
    images = two_class_tree(tmp_path / "images", size=36, per_class=6)
    model = timm.create_model("cifar_resnet20", num_classes=2)
    config = FinetuneConfig(model="cifar_resnet20", data=str(images), img_size=40, crop_pct=0.9)
    resolved = data_config(model, config.data_settings)
    assert resolved["input_size"] == (3, 40, 40) and resolved["crop_pct"] == 0.9
    train, val = build_datasets(images / "train", images / "val", data_config=resolved, num_classes=2)
    assert train[0][0].shape == val[0][0].shape == (3, 40, 40)
    assert data_config(model, DataSettings(input_size=(3, 24, 28)))["input_size"] == \
        (3, 24, 28)
    assert data_config(model, DataSettings())["input_size"] == (3, 32, 32)


def test_the_runs_data_uses_the_input_size_flags(tmp_path):
    """build_data (what a run trains and validates on) follows --img-size."""
    images = two_class_tree(tmp_path / "images", size=36, per_class=6)
    config = FinetuneConfig(model="cifar_resnet20", data=str(images), img_size=40, data_in_memory="off", workers=0)
    data = build_data(config.data_settings, timm.create_model("cifar_resnet20", num_classes=2))
    assert data.train[(0, 0)][0].shape == data.val[0][0].shape == (3, 40, 40)


@pytest.mark.parametrize("values, message", [
    (dict(img_size=40, input_size=(3, 40, 40)), "--img-size and --input-size 3,40,40 both set the input size"),
    (dict(input_size=(3, 0, 40)), "--input-size must be three positive integers C H W"),
    (dict(input_size=(40, 40)), "--input-size must be three positive integers C H W"),
    (dict(img_size=0), "--img-size must be a positive integer"),
    (dict(crop_pct=0.0), "--crop-pct must lie in (0, 1]"),
    (dict(crop_pct=1.5), "--crop-pct must lie in (0, 1]"),
    (dict(img_size=40, data=DIGITS), "--img-size sets a model's image preprocessing"),
])
def test_input_size_flags_are_checked(values, message):
    with pytest.raises(LatePhaseError) as err:
        FinetuneConfig(model="cifar_resnet20", **values)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_timm_input_size_flags_on_the_command_line(monkeypatch):
    from click.testing import CliRunner

    import lpconvert.train.finetune
    from lpconvert.cli import main

    seen = []
    monkeypatch.setattr(lpconvert.train.finetune, "run", lambda config, command=None: seen.append(config) or {})
    for flags in (["--input-size", "3", "40", "48", "--crop-pct", "0.9"], ["--img-size", "40"]):
        result = CliRunner().invoke(main, ["finetune", "cifar_resnet20", *flags], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert [(c.input_size, c.img_size, c.crop_pct) for c in seen] == [((3, 40, 48), None, 0.9), ((), 40, None)]
    result = CliRunner().invoke(main, ["finetune", "cifar_resnet20", "--img-size", "40", "--input-size", "3", "4", "4"])
    assert result.exit_code == 2 and result.output.startswith("error: --img-size and --input-size 3,4,4 both set")


@pytest.mark.parametrize("collapsed", [False, True])
def test_save_pretrained_of_a_late_phase_model_records_k_kinds_and_sigma0(tmp_path, collapsed):
    """From the Python API: a late-phase model is collapsed and saved with its K, kinds and σ0 — or a collapsed one
    given the configuration it was averaged from."""
    model = lpconvert.convert(timm.create_model("digits_cnn"), K=3, targets="rank1,classifier", sigma0=0.25, seed=0)
    spec = lpconvert.late_phase_config(model)
    if collapsed:
        out = lpconvert.save_pretrained(lpconvert.collapse(model), tmp_path / "out", late_phase=spec)
    else:
        out = lpconvert.save_pretrained(model, tmp_path / "out")
    info = json.loads((out / "lpconvert.json").read_text())
    assert info["hparams"] == {"K": 3, "late-phase weights": "classifier,rank1", "sigma0": 0.25}
    assert info["averaging"] == {"K": 3, "late_phase": "classifier,rank1", "sigma0": 0.25,
                                 **({} if collapsed else {"bn_stats": "fold"})}
    _, body = _card(out)
    assert "No hyper-parameters were recorded" not in body
    assert dict(_table(body, "Hyper-parameters")) == {"K": "3", "late-phase weights": "classifier,rank1",
                                                      "sigma0": "0.25"}
    assert "its classifier and rank1 weights were replaced by K = 3 copies" in body and BN_TEXT not in body
    fresh = timm.create_model("digits_cnn")
    fresh.load_state_dict(safetensors.torch.load_file(str(out / "model.safetensors")), strict=True)
    expected = lpconvert.collapse(model).state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in fresh.state_dict().items())
