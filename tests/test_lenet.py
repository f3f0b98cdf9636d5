"""cifar_lenet5_bn, the paper's small ConvNet: architecture, timm API, what late-phase BatchNorm converts."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import lpconvert
from lpconvert.errors import LatePhaseError
from lpconvert.models import is_lpconvert_architecture

NAME = "cifar_lenet5_bn"


def _hand_count(num_classes: int) -> int:
    conv = lambda i, o: i * o * 5 * 5 + o  # noqa: E731  (5x5 kernel and bias)
    linear = lambda i, o: i * o + o  # noqa: E731
    batchnorm = lambda c: 2 * c  # noqa: E731  (γ and β)
    return (conv(3, 6) + batchnorm(6) + conv(6, 16) + batchnorm(16) + linear(400, 120) + batchnorm(120)
            + linear(120, 84) + batchnorm(84) + linear(84, num_classes))


def test_parameter_count_and_shapes() -> None:
    model = timm.create_model(NAME).eval()
    assert sum(p.numel() for p in model.parameters()) == _hand_count(10) == 62_458
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 16, 5, 5)
    assert model.forward_head(features, pre_logits=True).shape == (2, 84)
    assert model(x).shape == (2, 10)
    wide = timm.create_model(NAME, num_classes=100)
    assert sum(p.numel() for p in wide.parameters()) == _hand_count(100) and wide(x).shape == (2, 100)


def test_timm_model_api() -> None:
    model = timm.create_model(NAME)
    assert model.get_classifier() is model.fc and (model.num_classes, model.num_features) == (10, 84)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["classifier"] == "fc" and cfg["first_conv"] == "conv1"
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg["mean"] == (0.4914, 0.4822, 0.4465) and data_cfg["std"] == (0.2470, 0.2435, 0.2616)
    model.reset_classifier(5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 84)
    with pytest.raises(LatePhaseError, match="no global pooling"):
        model.reset_classifier(10, global_pool="avg")
    assert is_lpconvert_architecture(NAME) and NAME not in timm.list_models(pretrained=True)
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model(NAME, pretrained=True)
    with pytest.raises(LatePhaseError, match="disable pretrained weights"):  # what --pretrained true tells the user
        lpconvert.load_model(NAME, pretrained=True)
    fresh, source = lpconvert.load_model(NAME, pretrained=False)  # --pretrained false: random initialisation
    assert isinstance(fresh, type(model)) and source.architecture == NAME and not source.pretrained


def test_plan_finds_the_four_batchnorms_and_the_classifier() -> None:
    report = lpconvert.plan(timm.create_model(NAME), 4, ("batchnorm", "classifier"))
    assert report.layers == {"bn1": "batchnorm", "bn2": "batchnorm", "bn3": "batchnorm", "bn4": "batchnorm",
                             "fc": "classifier"}
    assert list(lpconvert.plan(timm.create_model(NAME), 4).layers) == ["bn1", "bn2", "bn3", "bn4"]  # the default


@torch.no_grad()
def test_convert_collapse_round_trip_is_exact() -> None:
    torch.manual_seed(0)
    original = timm.create_model(NAME)
    original.train()(torch.randn(16, 3, 32, 32))  # non-trivial running statistics
    original.eval()
    x = torch.randn(4, 3, 32, 32)
    late = lpconvert.convert(copy.deepcopy(original), K=3, targets=("batchnorm", "classifier"))
    assert len(lpconvert.late_phase_layers(late)) == 5
    for k in (0, 2):
        lpconvert.select_members(late, k)
        assert torch.equal(late(x), original(x))
    for mode in ("fold", "mean"):
        collapsed = lpconvert.collapse(late, bn_stats=mode)
        state = collapsed.state_dict()
        assert list(state) == list(original.state_dict())
        assert all(torch.equal(state[key], value) for key, value in original.state_dict().items()), mode
    fresh = timm.create_model(NAME)
    fresh.load_state_dict(lpconvert.collapse(late).state_dict(), strict=True)
    assert torch.equal(fresh.eval()(x), original(x))
