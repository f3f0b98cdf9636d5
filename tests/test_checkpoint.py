"""Checkpoint input/output: loading specs and weight files, save_pretrained round trips, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
import yaml
from huggingface_hub import ModelCard, metadata_load
from torch import nn

from lpconvert.errors import LatePhaseError
from lpconvert.files import (
    atomic_save_torch,
    atomic_write_bytes,
    atomic_write_json,
    prepare_tensors,
)
from lpconvert.publish import model_folder
from lpconvert.publish.loading import ModelSource, load_model
from lpconvert.publish.model_folder import read_output_dir, save_pretrained
from lpconvert.publish.weights import load_weights, read_state_dict
from lpconvert.run.ownership import recognise
from lpconvert.train.state import RunCheckpoint


def atomic_save_safetensors(tensors, path):
    """A weights file as users have them (safetensors of a state dict)."""
    safetensors.torch.save_file(prepare_tensors(tensors), str(path))
    return path

METRICS = {
    "base": {"top1": 76.128, "top5": 92.862, "nll": 0.9618},
    "final": {"top1": 76.874, "top5": 93.214, "nll": 0.9132},
    "protocol": "ImageNet-1k val, 224px center crop, crop_pct 0.875",
}
HPARAMS = {"K": 10, "late_phase_start_epoch": 120, "lr": 0.05, "late_phase_layers": ["bn", "fc"], "dataset": "cifar10"}


class NotAWeight:
    """A custom class; pickling it into a checkpoint makes the file unsafe to load."""


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm statistic non-default values, so round trips are meaningful."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.5 + 0.25)
    return model.eval()


@pytest.fixture(scope="module")
def timm_model() -> tuple[nn.Module, ModelSource]:
    model, source = load_model("test_resnet", num_classes=5, pretrained=False)
    return randomize(model), source


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------------------
# save_pretrained round trips


def test_timm_round_trip_via_timm_local_dir(tmp_path, timm_model, x):
    model, source = timm_model
    out = save_pretrained(model, tmp_path / "out", source=source, metrics=METRICS, hparams=HPARAMS)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "lpconvert.json", "model.safetensors"]

    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert_same_state(model, reloaded)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))

    again, again_source = load_model(str(out))
    assert torch.equal(model(x), again.eval()(x))
    assert again_source.origin == "local-dir" and again_source.architecture == "test_resnet"


def test_config_json_follows_timm_format(tmp_path, timm_model):
    model, source = timm_model
    labels = ["airplane", "bird", "cat", "dog", "ship"]
    out = save_pretrained(model, tmp_path / "out", source=source, label_names=labels)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet"
    assert config["num_classes"] == 5 and config["num_features"] == model.num_features
    assert config["global_pool"] == "avg" and config["model_args"]["num_classes"] == 5
    assert config["label_names"] == labels
    cfg = config["pretrained_cfg"]
    for key in ("input_size", "interpolation", "crop_pct", "mean", "std", "classifier", "first_conv"):
        assert key in cfg, key
    assert cfg["num_classes"] == 5 and cfg["license"] == "apache-2.0"
    assert timm.create_model(f"local-dir:{out}", pretrained=True).pretrained_cfg["label_names"] == labels


def test_dtype_and_tied_weights_are_kept(tmp_path, timm_model):
    model, source = timm_model
    half = timm.create_model("test_resnet", num_classes=5).half()
    half.load_state_dict({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    out = save_pretrained(half, tmp_path / "half", source=source)
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    assert tensors["fc.weight"].dtype == torch.float16

    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    path = atomic_save_safetensors(tied.state_dict(), tmp_path / "tied.safetensors")
    loaded = safetensors.torch.load_file(path)
    assert set(loaded) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert torch.equal(loaded["0.weight"], loaded["1.weight"])


def test_torchvision_round_trip(tmp_path, x):
    model, source = load_model("tv:resnet18", num_classes=3, pretrained=False)
    randomize(model)
    assert source.library == "torchvision" and source.num_classes == 3
    out = save_pretrained(model, tmp_path / "tv", source=source, metrics=METRICS)
    config = json.loads((out / "config.json").read_text())
    assert config == {"library": "torchvision", "architecture": "resnet18", "num_classes": 3,
                      "model_args": {"num_classes": 3}}
    card = (out / "README.md").read_text()
    assert 'torchvision.models.get_model("resnet18", weights=None, num_classes=3)' in card

    reloaded, reloaded_source = load_model(str(out))
    with torch.no_grad():
        assert torch.equal(model(x), reloaded.eval()(x))
    assert reloaded_source.library == "torchvision"

    # what the model card tells users to do, without lpconvert
    plain = torchvision.models.get_model(config["architecture"], weights=None, **config["model_args"])
    plain.load_state_dict(safetensors.torch.load_file(out / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(model(x), plain.eval()(x))


def test_torchvision_pretrained_with_a_new_head(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]  # no internet: seed the cache
    cached.parent.mkdir(parents=True)
    reference = randomize(torchvision.models.get_model("mobilenet_v3_small", weights=None)).state_dict()
    torch.save(reference, cached)

    model, source = load_model("tv:mobilenet_v3_small", num_classes=3)
    assert source.pretrained and source.num_classes == 3 and source.model_args == {"num_classes": 3}
    state = model.state_dict()
    new_head = {k for k in reference if reference[k].shape != state[k].shape}
    assert new_head == {"classifier.3.weight", "classifier.3.bias"}
    assert all(torch.equal(reference[k], state[k]) for k in reference if k not in new_head)

    torch.save({**reference, "trainer": NotAWeight()}, cached)  # torchvision itself asks for a full unpickle
    with pytest.raises(LatePhaseError) as err:
        load_model("tv:mobilenet_v3_small")
    assert str(cached) in one_line(err) and "not a plain weights file" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# Weight files


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_pth_wrapped_with_module_prefix_loads(tmp_path, timm_model, wrapper):
    model, _ = timm_model
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 7}, path)
    loaded, source = load_model("test_resnet", num_classes=5, weights=path)
    assert_same_state(model, loaded)
    assert source.weights == str(path.resolve()) and source.base_model is None


def test_safetensors_weights_load(tmp_path, timm_model, x):
    model, _ = timm_model
    path = atomic_save_safetensors(model.state_dict(), tmp_path / "w.safetensors")
    loaded, _ = load_model("test_resnet", num_classes=5, weights=path)
    assert torch.equal(model(x), loaded.eval()(x))


def test_truncated_safetensors_names_the_file(tmp_path, timm_model):
    model, _ = timm_model
    path = atomic_save_safetensors(model.state_dict(), tmp_path / "broken.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LatePhaseError) as err:
        load_model("test_resnet", num_classes=5, weights=path)
    assert str(path) in one_line(err) and "safetensors" in str(err.value)


def test_pickle_with_custom_object_is_refused(tmp_path, timm_model):
    model, _ = timm_model
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": model.state_dict(), "trainer": NotAWeight()}, path)
    with pytest.raises(LatePhaseError) as err:
        read_state_dict(path)
    message = one_line(err)
    assert "not a weights-only checkpoint" in message and "NotAWeight" in message and str(path) in message


def test_corrupted_pth_is_reported(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(LatePhaseError) as err:
        read_state_dict(path)
    assert str(path) in one_line(err) and "corrupted" in str(err.value)


def test_key_mismatch_lists_missing_and_unexpected(tmp_path, timm_model):
    model, _ = timm_model
    state = dict(model.state_dict())
    del state["fc.weight"]
    state["head.extra"] = torch.zeros(1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(LatePhaseError) as err:
        load_weights(timm.create_model("test_resnet", num_classes=5), path)
    message = one_line(err)
    assert "1 missing keys (fc.weight)" in message and "1 unexpected keys (head.extra)" in message


def test_shape_mismatch_is_explained_and_num_classes_transfers(tmp_path, timm_model):
    model, _ = timm_model
    path = atomic_save_safetensors(model.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(LatePhaseError) as err:
        load_model("test_resnet", weights=path)  # built with timm's 1000 classes
    assert "fc.weight (5, 96) vs (1000, 96)" in one_line(err)
    # --weights with --num-classes: the backbone from the file, a new head, as for the other sources
    transferred, _ = load_model("test_resnet", num_classes=7, weights=path)
    assert transferred.fc.weight.shape == (7, 96)
    assert torch.equal(transferred.state_dict()["conv1.0.weight"], model.state_dict()["conv1.0.weight"])


def test_local_dir_with_new_num_classes_keeps_the_backbone(tmp_path, timm_model):
    model, source = timm_model
    out = save_pretrained(model, tmp_path / "out", source=source)
    loaded, _ = load_model(str(out), num_classes=3)
    assert loaded.num_classes == 3
    assert torch.equal(loaded.state_dict()["conv1.0.weight"], model.state_dict()["conv1.0.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# Names and downloads


@pytest.mark.parametrize(("spec", "suggestion"), [("resnet5O", "resnet50"), ("tv:resnt18", "tv:resnet18")])
def test_unknown_model_suggests_close_names(spec, suggestion):
    with pytest.raises(LatePhaseError) as err:
        load_model(spec, pretrained=False)
    assert f"unknown model '{spec}'" in one_line(err) and suggestion in str(err.value)


def test_unknown_pretrained_tag_lists_tags():
    with pytest.raises(LatePhaseError) as err:
        load_model("resnet18.bogus_tag")
    assert "resnet18.a1_in1k" in one_line(err)


def test_model_without_timm_weights_needs_weights_file():
    with pytest.raises(LatePhaseError) as err:
        load_model("test_coatnet")  # registered in timm without pretrained weights
    assert "--weights" in one_line(err)


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.mark.parametrize("spec", ["resnet18", "tv:resnet18", "hf-hub:timm/resnet18.a1_in1k"])
def test_offline_download_fails_fast(monkeypatch, empty_caches, spec):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 at start-up sets
    start = time.monotonic()
    with pytest.raises(LatePhaseError) as err:
        load_model(spec)
    assert time.monotonic() - start < 5
    message = one_line(err)
    assert spec in message and "--weights PATH" in message and "offline" in message


def test_unreachable_hub_fails_fast(monkeypatch, empty_caches):
    from huggingface_hub import constants

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(LatePhaseError) as err:
        load_model("resnet18")
    assert time.monotonic() - start < 10
    assert "unreachable" in one_line(err) and "--weights PATH" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# Output directory safety


def test_existing_non_empty_dir_is_refused_unless_forced(tmp_path, timm_model):
    model, source = timm_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(LatePhaseError) as err:
        save_pretrained(model, out, source=source)
    assert "--force" in one_line(err) and (out / "keep.txt").exists()

    with pytest.raises(LatePhaseError) as err:  # --force replaces only what lpconvert made
        save_pretrained(model, out, source=source, force=True)
    assert "not an lpconvert model folder" in one_line(err) and [p.name for p in out.iterdir()] == ["keep.txt"]

    ours = save_pretrained(model, tmp_path / "ours", source=source)
    (ours / "config.json").write_text("{}")  # changed since lpconvert wrote it: no longer lpconvert's to replace
    with pytest.raises(LatePhaseError) as err:
        save_pretrained(model, ours, source=source, force=True)
    assert f"{ours / 'config.json'} is not a file lpconvert wrote" in one_line(err)
    assert (ours / "config.json").read_text() == "{}"
    shutil.rmtree(ours)
    save_pretrained(model, ours, source=source)  # an older export, to be replaced
    save_pretrained(model, ours, source=source, force=True)
    assert json.loads((ours / "config.json").read_text())["architecture"] == "test_resnet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "out"]


def test_empty_existing_dir_is_used(tmp_path, timm_model):
    model, source = timm_model
    (tmp_path / "out").mkdir()
    save_pretrained(model, tmp_path / "out", source=source)
    read_output_dir(tmp_path / "out")


@pytest.mark.parametrize("existing", [False, True])
def test_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch, timm_model, existing):
    model, source = timm_model
    out = tmp_path / "out"
    if existing:
        save_pretrained(model, out, source=source)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else {}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_folder, "render_model_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, out, source=source, force=True)
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export, untouched
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])


def test_model_card_and_provenance(tmp_path, timm_model):
    model, _ = timm_model
    source = ModelSource(spec="resnet50.a1_in1k", library="timm", origin="timm", architecture="resnet50",
                         num_classes=1000, pretrained=True, hub_id="timm/resnet50.a1_in1k", license="apache-2.0")
    provenance = {"command": "lpconvert train ...", "seeds": [0, 1], "data_fingerprint": "sha256:abc"}
    dataset = {"type": "timm/mini-imagenet", "name": "timm/mini-imagenet", "split": "validation"}
    metrics = {**METRICS, "dataset": dataset}
    out = save_pretrained(model, tmp_path / "out", source=source, metrics=metrics, hparams=HPARAMS,
                          provenance=provenance, datasets=["timm/mini-imagenet"])
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "timm" and meta["license"] == "apache-2.0"
    assert {"late-phase-weights", "image-classification"} <= set(meta["tags"])
    assert meta["base_model"] == "timm/resnet50.a1_in1k" and meta["base_model_relation"] == "finetune"
    assert meta["datasets"] == ["timm/mini-imagenet"]
    for part in ("base", "final"):  # rounded to what they resolve: percentages to 2 decimals, NLL to 4
        for name, value in METRICS[part].items():
            assert f" {value:.{2 if name in ('top1', 'top5') else 4}f} |" in body
    assert METRICS["protocol"] in body
    # the verdict first: the start, this model, the change (no image count given: no sampling error claimed)
    assert body.split("\n\n")[1] == (
        "**Against the starting checkpoint** — top-1 on timm/mini-imagenet, validation split: 76.13 % → 76.87 % "
        "(+0.75 points). One run gives no interval over seeds: `lpconvert compare` measures the change over paired "
        "seeds.")
    for name in HPARAMS:
        assert f"| {name} |" in body
    assert "arXiv:2007.12927" in body and "von Oswald" in body and "ICLR 2021" in body

    # huggingface_hub reads the metadata back as it wrote it: the model-index, and the card unchanged by a round trip
    card = ModelCard.load(out / "README.md")
    assert card.content == text and metadata_load(out / "README.md") == meta
    assert card.data.model_name == "resnet50 with late-phase weights"
    assert [(r.task_type, r.dataset_type, r.dataset_split, r.metric_type, r.metric_value)
            for r in card.data.eval_results] == [
        ("image-classification", "timm/mini-imagenet", "validation", "accuracy", 76.87),
        ("image-classification", "timm/mini-imagenet", "validation", "top_5_accuracy", 93.21)]

    info = read_output_dir(out)
    assert info.collapsed and info.metrics == metrics and info.info["provenance"] == provenance
    assert info.info["source"]["hub_id"] == "timm/resnet50.a1_in1k" and info.info["lpconvert_version"]


def test_card_of_a_model_without_base_model_or_dataset(tmp_path, timm_model):
    model, source = timm_model  # random initialisation: no Hub checkpoint to derive from
    out = save_pretrained(model, tmp_path / "out", source=source, metrics=METRICS)
    meta = metadata_load(out / "README.md")
    assert not {"base_model", "base_model_relation", "datasets", "model-index"} & set(meta)
    assert "76.13 % → 76.87 % (+0.75 points)" in (out / "README.md").read_text()


@pytest.mark.parametrize("kwargs, message", [
    ({"datasets": ["/data/imagenet"]}, "'/data/imagenet' is not a Hub dataset id"),
    ({"datasets": "imagenet-1k"}, "datasets must be a list of Hub dataset ids"),
    ({"metrics": {**METRICS, "dataset": {"name": "ImageNet"}}}, "metrics['dataset'] must be a mapping"),
    ({"logs": "missing"}, "logs=missing is not a folder"),
])
def test_card_inputs_are_checked_before_anything_is_written(tmp_path, timm_model, kwargs, message):
    model, source = timm_model
    with pytest.raises(LatePhaseError) as err:
        save_pretrained(model, tmp_path / "out", source=source, **kwargs)
    assert message in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_logs_travel_in_runs(tmp_path, timm_model):
    model, source = timm_model
    logs = tmp_path / "run" / "tensorboard"
    logs.mkdir(parents=True)
    (logs / "events.out.tfevents.lpconvert").write_bytes(b"events")
    (logs / "notes.txt").write_text("not an event file")
    out = save_pretrained(model, tmp_path / "out", source=source, logs=logs)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "config.json", "lpconvert.json", "model.safetensors", "runs/events.out.tfevents.lpconvert"]
    assert (out / "runs" / "events.out.tfevents.lpconvert").read_bytes() == b"events"
    assert "`runs/` holds the run's TensorBoard logs" in (out / "README.md").read_text()
    assert recognise(out) == "model"  # still lpconvert's own folder: --force may replace it
    save_pretrained(model, out, source=source, force=True)
    assert not (out / "runs").exists()


def test_card_without_metrics_says_so(tmp_path, timm_model):
    model, source = timm_model
    out = save_pretrained(model, tmp_path / "out", source=source)
    assert "No evaluation was recorded" in (out / "README.md").read_text()
    assert "license: apache-2.0" in (out / "README.md").read_text()


def test_non_numeric_metric_is_refused(tmp_path, timm_model):
    model, source = timm_model
    with pytest.raises(LatePhaseError):
        save_pretrained(model, tmp_path / "out", source=source, metrics={"base": {"top1": "high"}})
    assert not (tmp_path / "out").exists()


def test_read_output_dir_names_missing_files(tmp_path, timm_model):
    model, source = timm_model
    out = save_pretrained(model, tmp_path / "out", source=source)
    (out / "lpconvert.json").unlink()
    with pytest.raises(LatePhaseError) as err:
        read_output_dir(out)
    assert one_line(err) == f"not an lpconvert output directory: {out} is missing lpconvert.json"


# ---------------------------------------------------------------------------------------------------------------------
# Atomic helpers


def test_atomic_writes_replace_and_clean_up(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "data.json"
    atomic_write_json(target, {"a": Path("/x"), "b": (1, 2)})
    assert json.loads(target.read_text()) == {"a": "/x", "b": [1, 2]}
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"

    def broken(obj, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", broken)
    weights = tmp_path / "sub" / "w.pt"
    weights.write_bytes(b"previous")
    with pytest.raises(OSError):
        atomic_save_torch({"x": torch.zeros(2)}, weights)
    assert weights.read_bytes() == b"previous"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["data.json", "w.pt"]


def test_training_checkpoints_round_trip_weights_only(tmp_path):
    import random

    from lpconvert.convert.late_phase_config import LatePhaseConfig, LatePhaseTarget
    from lpconvert.train.state import History, Position

    checkpoint = RunCheckpoint(
        config={"model": "x"}, source={}, late_phase=LatePhaseConfig(3, [LatePhaseTarget("batchnorm", ("bn1",))]),
        model={"w": torch.arange(3.0)}, engine={}, position=Position(epoch=1, iteration=7),
        history=History({"top1": 10.0}, [{"epoch": 0, "val_top1": 50.5}], None), swa=None,
        rng={"python": random.getstate(), "torch": torch.get_rng_state()}, started="now",
    )
    path = checkpoint.save(tmp_path / "checkpoints" / "last.pt")
    loaded = RunCheckpoint.load(path)
    assert torch.equal(loaded.model["w"], checkpoint.model["w"]) and loaded.rng["python"] == checkpoint.rng["python"]
    assert loaded.history == checkpoint.history and loaded.position == checkpoint.position
    assert loaded.late_phase.layers == {"bn1": "batchnorm"} and loaded.late_phase.K == 3

    atomic_save_torch({"trainer": NotAWeight()}, path)
    with pytest.raises(LatePhaseError, match="NotAWeight"):
        RunCheckpoint.load(path)
    atomic_save_torch({"model": {}}, path)
    with pytest.raises(LatePhaseError, match="not an lpconvert run checkpoint"):
        RunCheckpoint.load(path)
    with pytest.raises(LatePhaseError, match="checkpoint not found"):
        RunCheckpoint.load(tmp_path / "missing.pt")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]
