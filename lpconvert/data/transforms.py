"""The model's preprocessing, from its timm data config: evaluation transform and training augmentation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from timm.data import create_transform, resolve_data_config
from timm.data.constants import DEFAULT_CROP_PCT
from torch import nn
from torchvision import transforms

from lpconvert.errors import LatePhaseError

if TYPE_CHECKING:
    from lpconvert.data.settings import DataSettings

__all__ = ["INPUT_KEYS", "MAX_SIDE", "build_transform", "data_config"]

#: The data-config entries that ``--input-size`` / ``--img-size`` and ``--crop-pct`` set.
INPUT_KEYS = ("input_size", "crop_pct")

#: The most pixels a side an image is resized to: one image of 3 × 8192 × 8192 float32 already takes 0.8 GB.
MAX_SIDE = 8192

_SMALL_INPUT = 64  # inputs up to this many pixels a side get the CIFAR training augmentation by default
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def data_config(model: nn.Module, config: DataSettings) -> dict[str, Any]:
    """The model's timm data config (``timm.data.resolve_data_config(model=model)``) with the run's ``--input-size C H
    W`` or ``--img-size N`` (square, the model's channels) and ``--crop-pct F`` in place of the model's own. Sizes
    that resize images beyond :data:`MAX_SIDE` pixels a side are refused, naming the flag."""
    cfg = dict(resolve_data_config(model=model))
    if config.input_size:
        cfg["input_size"] = tuple(config.input_size)
    elif config.img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], config.img_size, config.img_size)
    if config.crop_pct is not None:
        cfg["crop_pct"] = config.crop_pct
    _check_sizes(cfg, config)
    return cfg


def _check_sizes(cfg: Mapping[str, Any], config: DataSettings) -> None:
    """Refuse an input size, or a crop fraction (evaluation resizes to the input size / crop_pct), that makes images
    larger than :data:`MAX_SIDE` pixels a side: they would exhaust the memory, blamed on the first image read."""
    channels, height, width = cfg["input_size"]
    if max(height, width) > MAX_SIDE:
        given = (f"--input-size {' '.join(map(str, config.input_size))}" if config.input_size
                 else f"--img-size {config.img_size}" if config.img_size is not None
                 else f"the model's input size {height}×{width}")
        raise LatePhaseError(f"{given} is too large: images of {height}×{width} pixels exceed the {MAX_SIDE} pixels a "
                             f"side lpconvert resizes to (one {channels}×{MAX_SIDE}×{MAX_SIDE} float32 image already "
                             f"takes {4 * channels * MAX_SIDE**2 / 2**30:.2g} GiB); pass a smaller size")
    crop_pct = cfg.get("crop_pct") or DEFAULT_CROP_PCT
    resized = math.floor(max(height, width) / crop_pct)
    if resized > MAX_SIDE:
        least = math.ceil(max(height, width) / MAX_SIDE * 1000) / 1000
        given = f"--crop-pct {crop_pct:g}" if config.crop_pct is not None else f"the model's crop_pct {crop_pct:g}"
        raise LatePhaseError(f"{given} resizes the images to {resized} pixels a side before the center crop of "
                             f"{max(height, width)}, above the {MAX_SIDE} lpconvert allows; use a --crop-pct of at "
                             f"least {least:g}")


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
