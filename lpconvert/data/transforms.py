"""The model's preprocessing, from its timm data config: evaluation transform and training augmentation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from timm.data import create_transform, resolve_data_config
from torch import nn
from torchvision import transforms

from lpconvert.errors import LatePhaseError

if TYPE_CHECKING:
    from lpconvert.config import FinetuneConfig

__all__ = ["INPUT_KEYS", "build_transform", "data_config"]

#: The data-config entries that ``--input-size`` / ``--img-size`` and ``--crop-pct`` set.
INPUT_KEYS = ("input_size", "crop_pct")

_SMALL_INPUT = 64  # inputs up to this many pixels a side get the CIFAR training augmentation by default
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def data_config(model: nn.Module, config: FinetuneConfig) -> dict[str, Any]:
    """The model's timm data config (``timm.data.resolve_data_config(model=model)``) with the run's ``--input-size C H
    W`` or ``--img-size N`` (square, the model's channels) and ``--crop-pct F`` in place of the model's own."""
    cfg = dict(resolve_data_config(model=model))
    if config.input_size:
        cfg["input_size"] = tuple(config.input_size)
    elif config.img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], config.img_size, config.img_size)
    if config.crop_pct is not None:
        cfg["crop_pct"] = config.crop_pct
    return cfg


def build_transform(data_config: Mapping[str, Any], *, train: bool, train_transform: str = "auto") -> Any:
    """The model's preprocessing from its timm data config (``timm.data.resolve_data_config(model=model)``).

    Evaluation: timm's resize + center crop + normalize. Training: ``"timm"`` — RandomResizedCrop + horizontal
    flip (timm's ImageNet recipe, colour jitter off); ``"cifar"`` — resize to the input size, RandomCrop with 4 px
    zero padding + horizontal flip, the standard CIFAR augmentation; ``"auto"`` — ``"cifar"`` when the input is at
    most 64 px a side, else ``"timm"``. All end with ToTensor and Normalize(mean, std) of the config.
    """
    cfg = {key: data_config[key] for key in _TRANSFORM_KEYS if key in data_config}
    if "input_size" not in cfg:
        raise LatePhaseError("the data config has no input_size; build it with timm.data.resolve_data_config(model=m)")
    if train_transform not in ("auto", "timm", "cifar"):
        raise LatePhaseError(f"unknown train transform {train_transform!r}; use 'auto', 'timm' or 'cifar'")
    height, width = cfg["input_size"][-2:]
    if train_transform == "auto":
        train_transform = "cifar" if max(height, width) <= _SMALL_INPUT else "timm"
    if not train:
        return create_transform(**cfg, is_training=False)
    if train_transform == "timm":
        return create_transform(**cfg, is_training=True, color_jitter=None)
    interpolation = transforms.InterpolationMode(cfg.get("interpolation", "bilinear"))
    return transforms.Compose(
        [
            transforms.Resize((height, width), interpolation=interpolation),
            transforms.RandomCrop((height, width), padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
