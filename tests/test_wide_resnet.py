"""The CIFAR wide ResNets of the from-scratch recipe: published sizes, the timm API, late-phase conversion."""

import timm
import torch

import lpconvert


def test_wide_resnets_have_the_published_sizes_and_convert():
    assert sum(p.numel() for p in timm.create_model("cifar_wrn28_10").parameters()) == 36_479_194  # "36.5M"
    model = timm.create_model("cifar_wrn16_4", num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == 2_748_890 + 90 * 256 + 90  # "2.7M" at 10 classes
    x = torch.randn(2, 3, 32, 32)
    expected = model.eval()(x)
    report = lpconvert.plan(model, K=4, targets="bn,head")
    assert report.counts() == {"batchnorm": 13, "classifier": 1}
    lpconvert.convert(model, K=4, targets="bn,head")
    torch.testing.assert_close(model(x), expected)
