"""Model architectures that lpconvert registers with timm; importing this package registers them.

``cifar_resnet20``, ``cifar_resnet32``, ``cifar_resnet44``, ``cifar_resnet56``: the classic CIFAR ResNets
(see :mod:`lpconvert.models.cifar_resnet`); ``cifar_wrn28_10``, ``cifar_wrn16_4``: wide ResNets for CIFAR;
``digits_cnn``: the offline demo's small BatchNorm CNN.
"""

from lpconvert.models.cifar_resnet import BasicBlock, CifarResNet
from lpconvert.models.digits_cnn import DigitsCNN
from lpconvert.models.wide_resnet import WideResNet

__all__ = ["BasicBlock", "CifarResNet", "DigitsCNN", "WideResNet"]
