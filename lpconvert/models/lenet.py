"""The paper's "Small ConvNet" (von Oswald et al. 2021, Appendix): LeNet-5 with ReLU and BatchNorm for CIFAR.

conv 5x5 3→6, ReLU, BN, max-pool 2; conv 5x5 6→16, ReLU, BN, max-pool 2; flatten (16·5·5 = 400); ``fc1`` 400→120,
ReLU, BN; ``fc2`` 120→84, ReLU, BN; ``fc`` 84→classes. A BatchNorm follows each hidden activation, so late-phase
BatchNorm has four layers to convert (62,458 parameters at 10 classes). Importing this module registers
``cifar_lenet5_bn`` with timm::

    import timm, lpconvert.models
    model = timm.create_model("cifar_lenet5_bn", num_classes=10)

Inputs are 32x32 RGB in [0, 1] normalized with the CIFAR-10 mean/std. No weights are downloadable (``pretrained=True``
raises timm's "No pretrained weights exist" error unless a file is given): train from scratch with
``lpconvert finetune cifar_lenet5_bn --pretrained false`` or start from ``--weights``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from lpconvert.errors import LatePhaseError
from lpconvert.models.wide_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["LeNet5BN"]


class LeNet5BN(nn.Module):
    """LeNet-5 with ReLU and a BatchNorm after each hidden activation, answering timm's model API.

    ``forward_features`` gives the (N, 16, 5, 5) feature map of the two conv stages; ``forward_head`` the two hidden
    fully connected layers, dropout (``drop_rate``) and the classifier ``fc``."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.num_features = self.head_hidden_size = 84
        self.conv1, self.bn1 = nn.Conv2d(in_chans, 6, 5), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16)
        self.fc1, self.bn3 = nn.Linear(16 * 5 * 5, 120), nn.BatchNorm1d(120)
        self.fc2, self.bn4 = nn.Linear(120, 84), nn.BatchNorm1d(84)
        self.fc = self._make_classifier(num_classes)

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        """The classification layer (``fc``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialized one for ``num_classes`` (0: no classifier)."""
        if global_pool is not None:
            raise LatePhaseError(f"LeNet5BN flattens its features and has no global pooling, got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = self._make_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The two conv stages (conv, ReLU, BN, max-pool): shape (N, 16, 5, 5) for 32x32 inputs."""
        x = F.max_pool2d(self.bn1(F.relu(self.conv1(x))), 2)
        return F.max_pool2d(self.bn2(F.relu(self.conv2(x))), 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Flatten, ``fc1`` and ``fc2`` (each ReLU, BN), dropout and ``fc``; ``pre_logits`` stops before ``fc``."""
        x = self.bn3(F.relu(self.fc1(x.flatten(1))))
        x = self.bn4(F.relu(self.fc2(x)))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "cifar_lenet5_bn": {
        "url": "", "hf_hub_id": None, "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (5, 5),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        "first_conv": "conv1", "classifier": "fc", "paper_ids": "arXiv:2007.12927",
        "paper_name": "Neural networks with late-phase weights",
    }
})


@register_model
def cifar_lenet5_bn(pretrained: bool = False, **kwargs) -> LeNet5BN:
    """LeNet-5 with ReLU and BatchNorm for CIFAR, the paper's small ConvNet (62k parameters)."""
    return build_model_with_cfg(LeNet5BN, "cifar_lenet5_bn", pretrained, **kwargs)
