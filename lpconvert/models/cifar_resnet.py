"""The classic CIFAR ResNets of He et al. (2016), "Deep Residual Learning for Image Recognition", Sec. 4.2.

Three stages of BasicBlocks at 16/32/64 channels (depth = 6n + 2), 3x3 bias-free convolutions, the parameter-free
"option A" shortcut when down-sampling, global average pooling and one ``linear`` layer. Parameter names match the
widely used CIFAR-10 checkpoints (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``), once
their ``module.`` prefix is stripped.

Importing this module registers ``cifar_resnet20/32/44/56`` with timm::

    import timm, lpconvert.models
    model = timm.create_model("cifar_resnet20", num_classes=10)
    model = timm.create_model("cifar_resnet20", checkpoint_path="resnet20-12fca82f.th")  # {'state_dict': ...} works

No weights are downloadable: ``pretrained=True`` raises timm's "No pretrained weights exist" error unless a file is
given (``pretrained_cfg_overlay=dict(file=...)``). Inputs are 32x32 RGB in [0, 1] normalized with the ImageNet
mean/std, as those checkpoints were trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from lpconvert.errors import LatePhaseError

__all__ = ["BasicBlock", "CifarResNet"]

_STAGE_WIDTHS = (16, 32, 64)


class _ShortcutA(nn.Module):
    """Parameter-free down-sampling shortcut: keep every second pixel, zero-pad ``pad`` channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet with ``blocks_per_stage`` BasicBlocks in each of its three stages, answering timm's model API."""

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = _STAGE_WIDTHS[-1]

        self.conv1 = nn.Conv2d(in_chans, _STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STAGE_WIDTHS[0])
        in_planes = _STAGE_WIDTHS[0]
        for index, planes in enumerate(_STAGE_WIDTHS):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if block_index == 0 else 1))
                in_planes = planes
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.linear = self._make_classifier(num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        """The classification layer (``linear``)."""
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialized one for ``num_classes`` (0: no classifier)."""
        if global_pool not in (None, "avg"):
            raise LatePhaseError(f"CifarResNet only supports global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.linear = self._make_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features, shape (N, 64, H/4, W/4)."""
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, dropout and ``linear``; ``pre_logits`` stops before ``linear``."""
        x = x.mean(dim=(2, 3))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "hf_hub_id": None,
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "linear",
        "license": "bsd-2-clause",
        "paper_ids": "arXiv:1512.03385",
        "paper_name": "Deep Residual Learning for Image Recognition",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "cifar_resnet20": _cfg(),
        "cifar_resnet32": _cfg(),
        "cifar_resnet44": _cfg(),
        "cifar_resnet56": _cfg(),
    }
)


def _create(variant: str, depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, blocks_per_stage=(depth - 2) // 6, **kwargs
    )


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, 0.27M parameters)."""
    return _create("cifar_resnet20", 20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage, 0.46M parameters)."""
    return _create("cifar_resnet32", 32, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR (7 blocks per stage, 0.66M parameters)."""
    return _create("cifar_resnet44", 44, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage, 0.85M parameters)."""
    return _create("cifar_resnet56", 56, pretrained, **kwargs)
