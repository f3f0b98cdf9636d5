"""A small BatchNorm CNN for scikit-learn's 8x8 handwritten digits: the model of the offline demo.

Three 3x3 conv-BN-ReLU stages (16/32/64 channels, one 2x2 max-pool), global average pooling, ``fc`` (64 → 10).
Registered with timm as ``digits_cnn`` (and ``digits_cnn_gn`` with GroupNorm); there are no pretrained weights (the demo trains its own T0 checkpoint).
"""

from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from lpconvert.data import DIGITS_MEAN, DIGITS_STD

__all__ = ["DigitsCNN"]


def _conv_norm(in_chs: int, out_chs: int, norm: str) -> nn.Sequential:
    norm_layer = nn.BatchNorm2d(out_chs) if norm == "batchnorm" else nn.GroupNorm(4, out_chs)
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), norm_layer, nn.ReLU())


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0, norm: str = "batchnorm") -> None:
        super().__init__()
        self.num_classes, self.num_features, self.drop_rate = num_classes, 64, drop_rate
        self.features = nn.Sequential(
            _conv_norm(in_chans, 16, norm), _conv_norm(16, 32, norm), nn.MaxPool2d(2), _conv_norm(32, 64, norm)
        )
        self.fc = nn.Linear(64, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = nn.functional.dropout(x.mean(dim=(2, 3)), self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_CFG = {
    "url": "", "hf_hub_id": None, "num_classes": 10, "input_size": (1, 8, 8), "pool_size": (4, 4),
    "crop_pct": 1.0, "interpolation": "nearest", "mean": (DIGITS_MEAN,), "std": (DIGITS_STD,),
    "first_conv": "features.0.0", "classifier": "fc", "license": "bsd-3-clause",
}
default_cfgs = generate_default_cfgs({"digits_cnn": dict(_CFG), "digits_cnn_gn": dict(_CFG)})


@register_model
def digits_cnn(pretrained: bool = False, **kwargs) -> DigitsCNN:
    """Small BatchNorm CNN for 8x8 digits (24k parameters)."""
    return build_model_with_cfg(DigitsCNN, "digits_cnn", pretrained, **kwargs)


@register_model
def digits_cnn_gn(pretrained: bool = False, **kwargs) -> DigitsCNN:
    """The same CNN with GroupNorm: no batch statistics, so many processes compute exactly what one does."""
    return build_model_with_cfg(DigitsCNN, "digits_cnn_gn", pretrained, norm="groupnorm", **kwargs)
