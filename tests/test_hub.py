"""Publishing with lpconvert.publish.hub.push against the in-memory Hub server, using the real huggingface_hub client."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hub_server import TEST_TOKEN, HubServer, configure_client
from huggingface_hub import ModelCard, hf_hub_download, metadata_load
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lpconvert.data.transforms import build_transform
from lpconvert.errors import LatePhaseError
from lpconvert.publish.hub import push
from lpconvert.publish.loading import ModelSource, load_model
from lpconvert.publish.model_card import REPO_ID_PLACEHOLDER
from lpconvert.publish.model_folder import save_pretrained
from lpconvert.train.tensorboard import write_scalars

EXPECTED_FILES = {"model.safetensors", "config.json", "README.md", "lpconvert.json"}
BOB_TOKEN = "hf_bob_token"
METRICS = {"base": {"top1": 70.25, "top5": 89.5, "nll": 1.25}, "final": {"top1": 71.5, "top5": 90.0, "nll": 1.125},
           "protocol": "held-out validation split"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer(tokens={TEST_TOKEN: "alice", BOB_TOKEN: "bob"}, orgs={"alice": {"lpw-org"}}) as server:
        configure_client(monkeypatch, server, tmp_path)
        yield server


@pytest.fixture(scope="module")
def model():
    net, source = load_model("test_resnet", num_classes=5, pretrained=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.5 + 0.25)
    return net.eval(), source


def saved(tmp_path: Path, model, name: str = "out", metrics=METRICS) -> Path:
    net, source = model
    return save_pretrained(net, tmp_path / name, source=source, metrics=metrics, hparams={"K": 4})


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_push_then_timm_loads_the_same_model(hub, tmp_path, model):
    folder = saved(tmp_path, model)
    url = push(folder, "lpw-org/test-resnet-lpw", token=TEST_TOKEN)

    commits = hub.commits("lpw-org/test-resnet-lpw")
    assert len(commits) == 2  # the repository's initial commit, then exactly one upload commit
    assert url.endswith(f"/lpw-org/test-resnet-lpw/commit/{commits[-1].oid}")
    assert set(commits[-1].changed) == EXPECTED_FILES and not commits[-1].deleted
    files = hub.files("lpw-org/test-resnet-lpw")
    assert set(files) == EXPECTED_FILES | {".gitattributes"}
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert 'timm.create_model("hf-hub:lpw-org/test-resnet-lpw", pretrained=True)' in files["README.md"].decode()

    net, _ = model
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reloaded = timm.create_model("hf-hub:lpw-org/test-resnet-lpw", pretrained=True).eval()
    assert any(path.startswith("/lfs-cdn/") for _, path in hub.requests)  # weights came the LFS way
    with torch.no_grad():
        assert torch.equal(net(x), reloaded(x))
    for key, value in net.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key

    again, source = load_model("hf-hub:lpw-org/test-resnet-lpw")
    with torch.no_grad():
        assert torch.equal(net(x), again.eval()(x))
    assert source.origin == "hf-hub" and source.base_model == "lpw-org/test-resnet-lpw"


def test_the_pushed_cards_metadata_round_trips(hub, tmp_path, model):
    """What huggingface_hub reads back from the Hub is what lpconvert wrote: model-index, base model, datasets."""
    net, _ = model
    source = ModelSource(spec="timm/test_resnet.r160_in1k", library="timm", origin="hf-hub", architecture="test_resnet",
                         num_classes=5, pretrained=True, hub_id="timm/test_resnet.r160_in1k", license="apache-2.0")
    metrics = {**METRICS, "dataset": {"type": "timm/mini-imagenet", "name": "timm/mini-imagenet", "split": "val"}}
    logs = tmp_path / "tensorboard"
    write_scalars(logs, [{"epoch": 0, "val_top1": 70.25}, {"epoch": 1, "val_top1": 71.5, "train_loss": 0.5}])
    folder = save_pretrained(net, tmp_path / "out", source=source, metrics=metrics, datasets=["timm/mini-imagenet"],
                             logs=logs)
    push(folder, "alice/card", token=TEST_TOKEN)
    assert set(hub.commits("alice/card")[-1].changed) == EXPECTED_FILES | {"runs/events.out.tfevents.lpconvert"}

    local, remote = ModelCard.load(folder / "README.md"), ModelCard.load("alice/card")
    assert remote.data.to_dict() == local.data.to_dict() == metadata_load(hf_hub_download("alice/card", "README.md"))
    assert remote.text == local.text.replace(REPO_ID_PLACEHOLDER, "alice/card")
    meta = remote.data
    assert (meta.base_model, meta.base_model_relation, meta.datasets) == (
        "timm/test_resnet.r160_in1k", "finetune", ["timm/mini-imagenet"])
    assert [(r.dataset_type, r.dataset_split, r.metric_type, r.metric_value) for r in meta.eval_results] == [
        ("timm/mini-imagenet", "val", "accuracy", 71.5), ("timm/mini-imagenet", "val", "top_5_accuracy", 90.0)]
    events = EventAccumulator(str(Path(hf_hub_download("alice/card", "runs/events.out.tfevents.lpconvert")).parent))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/top1")] == [(0, 70.25), (1, 71.5)]


def test_a_card_huggingface_hub_cannot_read_is_refused_before_any_request(hub, tmp_path, model):
    folder = saved(tmp_path, model)
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace("---\n", "---\nmodel-index:\n- name: broken\n", 1))
    with pytest.raises(LatePhaseError) as err:
        push(folder, "alice/model", token=TEST_TOKEN)
    assert "cannot read the model card metadata" in one_line(err) and "Invalid `model_index`" in str(err.value)
    assert hub.requests == []


def test_missing_hub_model_is_a_one_line_error(hub):
    with pytest.raises(LatePhaseError) as err:
        load_model("hf-hub:alice/missing")
    assert "does not exist" in one_line(err) and "--weights PATH" in str(err.value)


def test_token_from_environment(hub, tmp_path, model, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    push(saved(tmp_path, model), "alice/from-env")
    assert "model.safetensors" in hub.files("alice/from-env")


@pytest.mark.parametrize("fault", ["500", "disconnect"])
def test_failed_commit_leaves_the_repository_unchanged(hub, tmp_path, model, fault):
    hub.add_repo("lpw-org/existing", files={"README.md": b"previous card\n"})
    before_files, before_commits = hub.files("lpw-org/existing"), len(hub.commits("lpw-org/existing"))
    folder = saved(tmp_path, model)

    hub.fail_next_commit = fault
    with pytest.raises(LatePhaseError) as err:
        push(folder, "lpw-org/existing", token=TEST_TOKEN)
    expected = "HTTP 500" if fault == "500" else "the connection to the Hub at"
    assert expected in one_line(err)
    assert hub.files("lpw-org/existing") == before_files
    assert len(hub.commits("lpw-org/existing")) == before_commits

    push(folder, "lpw-org/existing", token=TEST_TOKEN)  # the same push succeeds once the Hub is healthy
    assert set(hub.files("lpw-org/existing")) == EXPECTED_FILES | {".gitattributes"}


@pytest.mark.parametrize("token", ["hf_wrong_token", None])
def test_bad_or_missing_token(hub, tmp_path, model, token):
    with pytest.raises(LatePhaseError) as err:
        push(saved(tmp_path, model), "alice/model", token=token)
    message = one_line(err)
    assert "401" in message and "HF_TOKEN" in message
    assert "alice/model" not in hub.repos


@pytest.mark.parametrize("exists", [True, False])
def test_no_write_permission(hub, tmp_path, model, exists):
    if exists:
        hub.add_repo("lpw-org/public-model")
    with pytest.raises(LatePhaseError) as err:
        push(saved(tmp_path, model), "lpw-org/public-model", token=BOB_TOKEN)
    assert "no write permission on lpw-org/public-model (403)" in one_line(err)
    if exists:
        assert set(hub.files("lpw-org/public-model")) == {".gitattributes"}
    else:
        assert "lpw-org/public-model" not in hub.repos


def test_unknown_revision(hub, tmp_path, model):
    with pytest.raises(LatePhaseError) as err:
        push(saved(tmp_path, model), "alice/model", token=TEST_TOKEN, revision="no-such-branch")
    assert "revision 'no-such-branch' does not exist" in one_line(err)


def test_unreachable_endpoint(tmp_path, model):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LatePhaseError) as err:
        push(saved(tmp_path, model), "alice/model", token=TEST_TOKEN, endpoint=f"http://127.0.0.1:{port}")
    assert "cannot reach the Hub" in one_line(err)


def test_create_pr_leaves_main_alone(hub, tmp_path, model):
    hub.add_repo("lpw-org/reviewed")
    url = push(saved(tmp_path, model), "lpw-org/reviewed", token=TEST_TOKEN, create_pr=True)
    assert url.endswith("/lpw-org/reviewed/discussions/1")
    assert set(hub.files("lpw-org/reviewed")) == {".gitattributes"}
    assert set(hub.files("lpw-org/reviewed", "refs/pr/1")) == EXPECTED_FILES | {".gitattributes"}


def test_uncollapsed_folders_are_refused(hub, tmp_path, model):
    folder = saved(tmp_path, model)
    info = json.loads((folder / "lpconvert.json").read_text())
    (folder / "lpconvert.json").write_text(json.dumps({**info, "collapsed": False}))
    with pytest.raises(LatePhaseError, match="lpconvert collapse"):
        push(folder, "alice/model", token=TEST_TOKEN)

    other = saved(tmp_path, model, "other")
    (other / "late_phase_members.safetensors").write_bytes(b"members")
    with pytest.raises(LatePhaseError) as err:
        push(other, "alice/model", token=TEST_TOKEN)
    assert "late_phase_members.safetensors" in one_line(err) and "lpconvert collapse" in str(err.value)
    assert hub.requests == []


def test_not_an_output_dir(hub, tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(LatePhaseError, match="not an lpconvert output directory: .* is missing lpconvert.json"):
        push(tmp_path / "random", "alice/model", token=TEST_TOKEN)


def test_regression_needs_explicit_permission(hub, tmp_path, model):
    worse = {"base": {"top1": 76.5}, "final": {"top1": 75.25}}
    folder = saved(tmp_path, model, metrics=worse)
    with pytest.raises(LatePhaseError) as err:
        push(folder, "alice/worse", token=TEST_TOKEN)
    assert one_line(err) == (
        "validation top-1 75.25 is below the base checkpoint's 76.5; pass --allow-regression to publish anyway"
    )
    assert hub.requests == []
    push(folder, "alice/worse", token=TEST_TOKEN, allow_regression=True)
    assert "model.safetensors" in hub.files("alice/worse")


def test_extra_files_only_on_request(hub, tmp_path, model):
    folder = saved(tmp_path, model)
    (folder / "training_log.csv").write_text("epoch,loss\n1,0.5\n")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "tmp.bin").write_bytes(b"x")
    push(folder, "alice/plain", token=TEST_TOKEN)
    assert set(hub.files("alice/plain")) == EXPECTED_FILES | {".gitattributes"}
    push(folder, "alice/extra", token=TEST_TOKEN, include_extra=True)
    assert set(hub.files("alice/extra")) == EXPECTED_FILES | {".gitattributes", "training_log.csv"}


def test_local_paths_are_not_published(hub, tmp_path, model, caplog):
    """The uploaded lpconvert.json names files by their base names; the local one keeps this machine's paths."""
    folder = saved(tmp_path, model)
    info = json.loads((folder / "lpconvert.json").read_text())
    home = tmp_path / "home" / "alice"
    info.update(command=f"lpconvert finetune resnet50 --data {home}/imagenet --output '{home}/my runs/r50' --quiet",
                collapsed_from=str(home / "runs" / "r50"), note="top-1/top-5, see https://example.org/a/b")
    info.setdefault("source", {})["spec"] = f"local-dir:{home}/t0/model"
    info.setdefault("provenance", {})["config"] = {"weights": str(home / "w.pth"), "data": ["relative/dir"], "K": 4}
    (folder / "lpconvert.json").write_text(json.dumps(info, indent=2))
    local = (folder / "lpconvert.json").read_bytes()
    with caplog.at_level("INFO", logger="lpconvert"):
        push(folder, "alice/model", token=TEST_TOKEN)

    published = hub.files("alice/model")["lpconvert.json"].decode()
    assert str(tmp_path) not in published and "alice/" not in published.replace("alice/model", "")
    remote = json.loads(published)
    assert remote["command"] == "lpconvert finetune resnet50 --data imagenet --output 'r50' --quiet"
    assert remote["collapsed_from"] == "r50" and remote["source"]["spec"] == "local-dir:model"
    assert remote["provenance"]["config"] == {"weights": "w.pth", "data": ["relative/dir"], "K": 4}
    assert remote["note"] == info["note"] and remote["files"] == info["files"]  # the rest unchanged
    assert (folder / "lpconvert.json").read_bytes() == local
    lines = [r.getMessage() for r in caplog.records if "local paths" in r.getMessage()]
    assert len(lines) == 1 and "collapsed_from, command, spec, weights" in lines[0]


def test_nothing_to_strip_publishes_the_file_as_it_is(hub, tmp_path, model, caplog):
    folder = saved(tmp_path, model)
    with caplog.at_level("INFO", logger="lpconvert"):
        push(folder, "alice/model", token=TEST_TOKEN)
    assert hub.files("alice/model")["lpconvert.json"] == (folder / "lpconvert.json").read_bytes()
    assert not [r for r in caplog.records if "local paths" in r.getMessage()]


def test_modified_weights_are_refused(hub, tmp_path, model):
    folder = saved(tmp_path, model)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LatePhaseError, match="does not match the checksum"):
        push(folder, "alice/model", token=TEST_TOKEN)


def test_finetune_push_to_hub_and_the_push_command(hub, tmp_path, monkeypatch):
    """`finetune --push-to-hub` publishes the collapsed run; `lpconvert push` errors are one line, exit code 2."""
    from click.testing import CliRunner

    from lpconvert.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    runner = CliRunner()
    args = ["finetune", "digits_cnn", "--no-pretrained", "--data", "sklearn-digits", "--K", "2", "--epochs", "1",
            "--batch-size", "40", "--workers", "0", "--quiet", "--lr", "0.05", "--output", "run",
            "--push-to-hub", "lpw-org/digits-lp"]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert set(hub.files("lpw-org/digits-lp")) == EXPECTED_FILES | {".gitattributes"}
    local = timm.create_model(f"local-dir:{tmp_path / 'run' / 'model'}", pretrained=True).eval()
    remote = timm.create_model("hf-hub:lpw-org/digits-lp", pretrained=True).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(local(x), remote(x))
    # the model page's evaluation results are the published model's test top-1 / top-5, rounded to what they resolve:
    # the run validated on training digits held out, which are no split of the dataset (the card names them)
    metrics = json.loads((tmp_path / "run" / "model" / "lpconvert.json").read_text())["metrics"]
    test = metrics["test"]
    assert metrics["dataset"]["held_out"] is True
    results = ModelCard.load("lpw-org/digits-lp").data.eval_results
    assert [(r.dataset_type, r.dataset_split, r.metric_type, r.metric_value) for r in results] == [
        ("sklearn-digits", "test", "accuracy", round(test["top1"], 2)),
        ("sklearn-digits", "test", "top_5_accuracy", round(test["top5"], 2))]

    # quiet by default: no third-party INFO chatter (httpx logs every request); --verbose brings it back
    assert "HTTP Request" not in result.output
    again = runner.invoke(main, ["push", "run/model", "--repo", "lpw-org/digits-lp"], catch_exceptions=False)
    assert again.exit_code == 0 and again.output.startswith("pushed run/model") and "HTTP Request" not in again.output
    verbose = runner.invoke(main, ["--verbose", "push", "run/model", "--repo", "lpw-org/digits-lp"])
    assert verbose.exit_code == 0 and "HTTP Request" in verbose.output

    bad = runner.invoke(main, ["push", "run/model", "--repo", "lpw-org/digits-lp", "--token", "hf_wrong"])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and len(bad.output.strip().splitlines()) == 1
    whole_run = runner.invoke(main, ["push", "run", "--repo", "lpw-org/digits-lp"])  # a run: its model/ folder
    assert whole_run.exit_code == 0, whole_run.output
    assert set(hub.files("lpw-org/digits-lp")) == EXPECTED_FILES | {".gitattributes"}
    (tmp_path / "run" / "model").rename(tmp_path / "model-aside")
    late = runner.invoke(main, ["push", "run", "--repo", "lpw-org/digits-lp"])
    assert late.exit_code == 2 and "collapse" in late.output


@pytest.mark.parametrize("spec, classes", [("test_resnet", 5), ("cifar_resnet20", 10), ("tv:mobilenet_v3_small", 3)])
def test_the_model_cards_loading_snippet_works_in_a_fresh_interpreter(hub, tmp_path, spec, classes):
    """timm, lpconvert's own architectures (which need `import lpconvert`) and torchvision: push, then run the card's
    snippet as a user would, in a new Python process that knows only the Hub's address."""
    import re
    import subprocess
    import sys

    net, source = load_model(spec, num_classes=classes, pretrained=False)
    folder = save_pretrained(net.eval(), tmp_path / "out", source=source)
    repo = "alice/" + spec.replace(":", "-").replace("_", "-")
    push(folder, repo, token=TEST_TOKEN)
    snippet = re.search(r"```python\n(.*?)```", hub.files(repo)["README.md"].decode(), re.S).group(1)
    assert repo in snippet and ("import lpconvert" in snippet) == (spec == "cifar_resnet20")

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    check = (f"\nimport torch, PIL.Image\nx = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
             f"pixels = transform(PIL.Image.open({str(tmp_path / 'image.png')!r}).convert('RGB'))\n"
             f"torch.save((model.state_dict(), model.eval()(x).detach(), pixels), {str(tmp_path / 'y.pt')!r})\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run([sys.executable, "-c", snippet + check], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    state, y, pixels = torch.load(tmp_path / "y.pt", weights_only=True)
    # the card's preprocessing is the one lpconvert evaluates the model with
    assert torch.equal(pixels, build_transform(timm.data.resolve_data_config(model=net), train=False)(image))
    assert list(state) == list(net.state_dict())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    with torch.no_grad():
        expected = net(x)
    assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()  # another process: other thread count


@pytest.mark.parametrize("key, value, problem", [
    ("fc.weight", float("nan"), "non-finite values (NaN or inf) in fc.weight"),
    ("bn1.running_var", -0.25, "a negative BatchNorm variance in bn1.running_var"),
])
def test_broken_weights_are_refused_before_any_request(hub, tmp_path, model, key, value, problem):
    """A folder whose weights were written with a recorded checksum yet hold NaN or a negative variance (written by
    hand or an older lpconvert) never leaves the machine."""
    import safetensors.torch

    from lpconvert.files import sha256_file

    folder = saved(tmp_path, model)
    weights = folder / "model.safetensors"
    state = safetensors.torch.load_file(str(weights))
    state[key].view(-1)[1] = value
    safetensors.torch.save_file(state, str(weights), metadata={"format": "pt"})
    info = json.loads((folder / "lpconvert.json").read_text())
    info["files"]["model.safetensors"]["sha256"] = sha256_file(weights)
    (folder / "lpconvert.json").write_text(json.dumps(info))
    with pytest.raises(LatePhaseError) as err:
        push(folder, "alice/model", token=TEST_TOKEN)
    assert one_line(err) == (f"{weights} holds {problem}; nothing was uploaded; export the model again from a "
                             "checkpoint that did not diverge")
    assert hub.requests == []
