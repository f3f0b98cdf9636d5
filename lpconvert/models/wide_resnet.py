"""Wide residual networks for CIFAR (Zagoruyko & Komodakis, 2016): the paper's CIFAR from-scratch architecture.

WRN-d-k: a 3x3 stem conv (16 channels), three groups of (d − 4)/6 pre-activation blocks (BN-ReLU-conv3x3, twice) at
16k/32k/64k channels (stride 2 at groups 2 and 3, a 1x1 conv shortcut where the shape changes), BN-ReLU, global
average pooling and ``fc``. Registered with timm as ``cifar_wrn28_10`` (36.5M parameters) and ``cifar_wrn16_4``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["WideResNet"]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class _PreActBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None if in_chs == out_chs and stride == 1 else nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = F.dropout(F.relu(self.bn2(out)), self.drop_rate, self.training)
        return self.conv2(out) + residual


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        blocks = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        layers, in_chs = [], 16
        for width, stride in zip(widths, (1, 2, 2)):
            layers.append(nn.Sequential(*[
                _PreActBlock(in_chs if i == 0 else width, width, stride if i == 0 else 1, drop_rate)
                for i in range(blocks)
            ]))
            in_chs = width
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = nn.BatchNorm2d(in_chs)
        self.num_classes, self.num_features = num_classes, in_chs
        self.fc = nn.Linear(in_chs, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return F.relu(self.bn(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg() -> dict:
    return {"url": "", "hf_hub_id": None, "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8),
            "crop_pct": 1.0, "interpolation": "bilinear", "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
            "first_conv": "conv1", "classifier": "fc", "paper_ids": "arXiv:1605.07146"}


default_cfgs = generate_default_cfgs({"cifar_wrn28_10": _cfg(), "cifar_wrn16_4": _cfg()})


@register_model
def cifar_wrn28_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10 for CIFAR (36.5M parameters), the paper's CIFAR architecture."""
    return build_model_with_cfg(WideResNet, "cifar_wrn28_10", pretrained, depth=28, widen=10, **kwargs)


@register_model
def cifar_wrn16_4(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-4 for CIFAR (2.7M parameters)."""
    return build_model_with_cfg(WideResNet, "cifar_wrn16_4", pretrained, depth=16, widen=4, **kwargs)
