"""Model architectures that lpconvert registers with timm; importing this package registers them.

``cifar_resnet20``, ``cifar_resnet32``, ``cifar_resnet44``, ``cifar_resnet56``: the classic CIFAR ResNets
(see :mod:`lpconvert.models.cifar_resnet`); ``cifar_wrn28_10``, ``cifar_wrn16_4``: wide ResNets for CIFAR;
``cifar_lenet5_bn``: the paper's small ConvNet, LeNet-5 with BatchNorm; ``digits_cnn``: the offline demo's small
BatchNorm CNN.
"""

from lpconvert.models.cifar_resnet import BasicBlock, CifarResNet
from lpconvert.models.digits_cnn import DigitsCNN
from lpconvert.models.lenet import LeNet5BN
from lpconvert.models.wide_resnet import WideResNet

__all__ = ["BasicBlock", "CifarResNet", "DigitsCNN", "LeNet5BN", "WideResNet", "is_lpconvert_architecture"]

_MODULES = ("cifar_resnet", "digits_cnn", "lenet", "wide_resnet")


def is_lpconvert_architecture(name: str) -> bool:
    """True for the architectures registered here (loading them with timm needs ``import lpconvert`` first)."""
    from timm.models import is_model_in_modules

    return is_model_in_modules(name, _MODULES)
