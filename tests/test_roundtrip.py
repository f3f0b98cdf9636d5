"""convert → perturb → collapse on real timm and torchvision architectures (small inputs, random init)."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

import lpconvert
from lpconvert.layers import LatePhaseBatchNorm, StackedLayer

K = 3
NUM_CLASSES = 7

# name -> (constructor, input size); torchvision models are built with the classes' own constructors
ARCHITECTURES = {
    "resnet50": (lambda: timm.create_model("resnet50", num_classes=NUM_CLASSES), 32),
    "resnet152": (lambda: timm.create_model("resnet152", num_classes=NUM_CLASSES), 32),
    "densenet161": (lambda: timm.create_model("densenet161", num_classes=NUM_CLASSES), 32),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=NUM_CLASSES), 32),
    "mobilenetv3_large_100": (lambda: timm.create_model("mobilenetv3_large_100", num_classes=NUM_CLASSES), 32),
    "regnety_016": (lambda: timm.create_model("regnety_016", num_classes=NUM_CLASSES), 32),
    "convnext_tiny": (lambda: timm.create_model("convnext_tiny", num_classes=NUM_CLASSES), 32),
    "vit_small_patch16_224": (
        lambda: timm.create_model("vit_small_patch16_224", num_classes=NUM_CLASSES, img_size=32), 32),
    "inception_v3": (lambda: timm.create_model("inception_v3", num_classes=NUM_CLASSES), 75),
    "tv:resnet18": (lambda: torchvision.models.resnet18(num_classes=NUM_CLASSES), 32),
    "tv:densenet121": (lambda: torchvision.models.densenet121(num_classes=NUM_CLASSES), 32),
    "tv:mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=NUM_CLASSES), 32),
    "tv:efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=NUM_CLASSES), 32),
    "tv:convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=NUM_CLASSES), 32),
    "tv:vit_b_16": (lambda: torchvision.models.vit_b_16(num_classes=NUM_CLASSES, image_size=32), 32),
    "tv:regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(num_classes=NUM_CLASSES), 32),
}
TARGETS = ("batchnorm", "layernorm", "groupnorm", "classifier")


def _randomize_statistics(model):
    """Give every BN non-trivial running statistics (so collapse modes differ) and zero-initialised heads weights."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            m.weight.copy_(0.05 * torch.randn(m.weight.shape, generator=g))
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _perturb_member_statistics(lp):
    g = torch.Generator().manual_seed(1)
    for layer in lpconvert.late_phase_layers(lp).values():
        if isinstance(layer, LatePhaseBatchNorm):
            layer.running_mean.add_(0.05 * torch.randn(layer.running_mean.shape, generator=g))
            layer.running_var.mul_(torch.rand(layer.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@torch.no_grad()
def test_round_trip(name):
    build, size = ARCHITECTURES[name]
    torch.manual_seed(0)
    original = build().eval()
    _randomize_statistics(original)
    keys = list(original.state_dict())
    types = {n: type(m) for n, m in original.named_modules()}
    x = torch.randn(2, 3, size, size)
    expected = original(x)

    # σ0 = 0: identical members, the converted model computes exactly what the original did
    lp = lpconvert.convert(copy.deepcopy(original), K=K, targets=TARGETS)
    assert type(lp) is type(original)
    layers = lpconvert.late_phase_layers(lp)
    assert any(layer.kind == "classifier" for layer in layers.values())
    for k in (0, K - 1):
        lpconvert.select_members(lp, k)
        torch.testing.assert_close(lp(x), expected, rtol=1e-5, atol=1e-5)
    # ... and collapses back to the original state_dict bit for bit in every mode that needs no data
    for mode in ("fold", "mean"):
        state = lpconvert.collapse(lp, bn_stats=mode).state_dict()
        assert [key for key, value in original.state_dict().items() if not torch.equal(state[key], value)] == [], mode

    # perturbed members: mean collapse is Eq. 1 computed by hand, and the rest of the weights are untouched
    lp = lpconvert.convert(copy.deepcopy(original), K=K, targets=TARGETS, sigma0=0.2, seed=0)
    _perturb_member_statistics(lp)
    stacked = lp.state_dict()
    averaged = lpconvert.collapse(lp, bn_stats="mean")
    state = averaged.state_dict()
    assert list(state) == keys
    assert {n: type(m) for n, m in averaged.named_modules()} == types
    late_keys = {f"{n}.{t}" for n, layer in layers.items() for t in layer.param_names + layer.buffer_names}
    for key in keys:
        if key in late_keys and stacked[key].is_floating_point():
            torch.testing.assert_close(state[key], stacked[key].mean(0))
        elif key in late_keys:
            assert torch.equal(state[key], stacked[key].max(0).values)
        else:
            assert torch.equal(state[key], stacked[key]), key
    assert not torch.allclose(averaged(x), expected, atol=1e-4)  # the perturbation changed the function

    # the result strict-loads into a freshly constructed model and computes the same function there
    fresh = build().eval()
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh(x), averaged(x))

    # fold: in eval mode every BN of the collapsed model outputs the mean of its members' outputs
    folded = lpconvert.collapse(lp, bn_stats="fold")
    assert list(folded.state_dict()) == keys
    bn_layers = [n for n, layer in layers.items() if isinstance(layer, LatePhaseBatchNorm)]
    lp_layers = lpconvert.late_phase_layers(lp)
    for n in bn_layers:
        layer, folded_bn = lp_layers[n], folded.get_submodule(n)
        h = torch.randn(4, layer.weight.shape[1])

        def bn_eval(t):  # the BN transform itself (a norm-act layer's activation comes after it)
            return F.batch_norm(h, t["running_mean"], t["running_var"], t["weight"], t["bias"], False, 0.0, layer.template.eps)

        members = torch.stack([bn_eval(layer.member_tensors(k)) for k in range(K)]).mean(0)
        torch.testing.assert_close(bn_eval(dict(folded_bn.state_dict())), members, rtol=1e-5, atol=1e-5)
    lpconvert.select_members(lp, 0)
    # the late-phase model itself is still intact (collapse works on a copy)
    assert all(isinstance(m, StackedLayer) for m in lpconvert.late_phase_layers(lp).values())
