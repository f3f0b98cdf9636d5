"""CIFAR ResNets: architecture, timm API, the shared checkpoints and their accuracy on real CIFAR-10 test images."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import lpconvert.models  # noqa: F401  (registers the architectures)
from lpconvert.data import build_datasets
from lpconvert.errors import LatePhaseError
from lpconvert.models.cifar_resnet import BasicBlock

PARAM_COUNTS = {"cifar_resnet20": 269_722, "cifar_resnet32": 464_154, "cifar_resnet44": 658_586,
                "cifar_resnet56": 853_018}
DOCUMENTED_ACCURACY = {20: 91.73, 32: 92.63}  # full 10,000-image test set, ../shared/README.md


def test_registered_parameter_counts_and_shapes() -> None:
    for name, count in PARAM_COUNTS.items():
        assert sum(p.numel() for p in timm.create_model(name).parameters()) == count, name
    model = timm.create_model("cifar_resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 64, 8, 8)
    assert model.forward_head(features, pre_logits=True).shape == (2, 64)
    assert model(x).shape == (2, 10)


def test_timm_model_api() -> None:
    model = timm.create_model("cifar_resnet20", num_classes=10)
    assert model.get_classifier() is model.linear
    assert (model.num_classes, model.num_features) == (10, 64)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0 and cfg["license"] == "bsd-2-clause"
    assert cfg["classifier"] == "linear" and cfg["first_conv"] == "conv1"
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg["mean"] == (0.485, 0.456, 0.406) and data_cfg["std"] == (0.229, 0.224, 0.225)

    model.reset_classifier(5)
    assert model.num_classes == 5 and model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    with pytest.raises(LatePhaseError):
        model.reset_classifier(10, global_pool="max")

    assert timm.create_model("cifar_resnet32", num_classes=100, drop_rate=0.1).linear.out_features == 100
    assert "cifar_resnet20" not in timm.list_models(pretrained=True)
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("cifar_resnet20", pretrained=True)


def test_option_a_shortcut_has_no_parameters_and_pads_channels() -> None:
    block = BasicBlock(16, 32, stride=2)
    assert not list(block.shortcut.parameters())
    x = torch.randn(2, 16, 8, 8)
    expected = torch.cat([torch.zeros(2, 8, 4, 4), x[:, :, ::2, ::2], torch.zeros(2, 8, 4, 4)], dim=1)
    torch.testing.assert_close(block.shortcut(x), expected)
    out = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))) + expected)
    torch.testing.assert_close(block(x), out)


@pytest.mark.parametrize("depth", [20, 32])
def test_shared_checkpoints_load_strictly(
    cifar_resnet_weights, load_stripped_state_dict, pretrained_cifar_resnet, depth: int
) -> None:
    path = cifar_resnet_weights[depth]
    state = load_stripped_state_dict(path)
    model = pretrained_cifar_resnet(depth)  # strict load inside the fixture
    assert set(state) <= set(model.state_dict())
    # timm's generic checkpoint loader handles {'state_dict': ...} and the 'module.' prefix as well
    via_timm = timm.create_model(f"cifar_resnet{depth}", checkpoint_path=str(path))
    for key, value in state.items():
        torch.testing.assert_close(via_timm.state_dict()[key], value)


def _accuracy(model: torch.nn.Module, dataset) -> float:
    correct = 0
    with torch.inference_mode():
        for images, labels in torch.utils.data.DataLoader(dataset, batch_size=250):
            correct += (model(images).argmax(dim=1) == labels).sum().item()
    return 100.0 * correct / len(dataset)


def _cifar10_test(model: torch.nn.Module, cifar10_test_dir, size: int | None):
    data_cfg = timm.data.resolve_data_config(model=model)
    _, dataset = build_datasets(None, cifar10_test_dir, data_config=data_cfg, num_classes=10, val_subset=size)
    return dataset


# Measured on the stratified 1,000-image subset (100 per class, seed 0): ResNet-20 92.0 %, ResNet-32 92.5 %.
@pytest.mark.parametrize("depth", [20, 32])
def test_accuracy_on_cifar10_test_subset(cifar10_test_dir, pretrained_cifar_resnet, depth: int) -> None:
    model = pretrained_cifar_resnet(depth)
    dataset = _cifar10_test(model, cifar10_test_dir, 1000)
    assert len(dataset) == 1000
    assert abs(_accuracy(model, dataset) - DOCUMENTED_ACCURACY[depth]) < 2.0


@pytest.mark.slow
@pytest.mark.parametrize("depth", [20, 32])
def test_accuracy_on_full_cifar10_test_set(cifar10_test_dir, pretrained_cifar_resnet, depth: int) -> None:
    model = pretrained_cifar_resnet(depth)
    dataset = _cifar10_test(model, cifar10_test_dir, None)
    assert len(dataset) == 10_000
    assert _accuracy(model, dataset) == pytest.approx(DOCUMENTED_ACCURACY[depth], abs=0.005)
