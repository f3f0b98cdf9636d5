"""The flags of ``lpconvert evaluate`` for what ensembles are for — corruptions (mCE) and temperature scaling on
held-out images — as one click decorator, and their values as :func:`lpconvert.evaluate.command.evaluate`'s arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from lpconvert.errors import LatePhaseError

__all__ = ["robustness_arguments", "robustness_options"]

_F = TypeVar("_F", bound=Callable[..., Any])

_OPTIONS = [
    click.option("--corruptions", is_flag=True,
                 help="Also the 15 common corruptions (Hendrycks & Dietterich) at severities 1-5, generated from the "
                      "evaluation images (after the model's resize and crop; seeded per corruption, severity and "
                      "image: the same images for every model) by imagecorruptions-imaug (pip install "
                      "'lpconvert[corruptions]') and cached under LPCONVERT_CACHE. Top-1 per type and severity and "
                      "the mean corruption error mCE. ImageNet-C's severity parameters: harsher on 32-px images than "
                      "the published CIFAR-10-C (use --corruption-dir for that)."),
    click.option("--corruption-dir", type=click.Path(exists=True, file_okay=False),
                 help="Published corrupted sets instead: CIFAR-10-C's <corruption>.npy + labels.npy, or ImageNet-C's "
                      "<corruption>/<severity>/<class>/<image> folders."),
    click.option("--corruption-types", metavar="A,B", help="Only these corruption types (default: the 15)."),
    click.option("--severities", metavar="1,3,5", help="Only these severities (default 1,2,3,4,5), for quick runs."),
    click.option("--reference", metavar="MODEL",
                 help="Reference for Hendrycks' relative corruption error CE = sum of errors over severities / the "
                      "reference's, per type, and mCE_ref, their mean (100 = the reference): a model spec (weights "
                      "with --reference-weights), evaluated on the same corruptions, or the --json of an earlier "
                      "evaluation."),
    click.option("--reference-weights", type=click.Path(dir_okay=False), help="Local weights for --reference."),
    click.option("--calibration-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), metavar="F",
                 help="Temperature scaling, fairly: a fixed stratified fraction F of the evaluation images (the same "
                      "for every model) fits one temperature by minimising NLL; NLL, ECE and Brier before and after "
                      "are reported on the other images."),
    click.option("--calibration-data", metavar="PATH",
                 help="Fit the temperature on this held-out set instead (tree, root or archive) and report on the "
                      "whole evaluation set. The training split is refused: the model trained on those images."),
    click.option("--calibration-on-train", is_flag=True,
                 help="Allow --calibration-data train (a stratified sample of the training split, as many images as "
                      "the evaluation set) although the model trained on those images: T comes out too low."),
]


def robustness_options(function: _F) -> _F:
    """Add the corruption and calibration flags to a click command."""
    for option in reversed(_OPTIONS):
        function = option(function)
    return function


def robustness_arguments(values: dict[str, Any]) -> dict[str, Any]:
    """The flags' values as keyword arguments of :func:`lpconvert.evaluate.command.evaluate` (comma lists split)."""
    names = values["corruption_types"]
    try:
        severities = [int(v) for v in (values["severities"] or "").split(",") if v.strip()] or None
    except ValueError:
        raise LatePhaseError(f"--severities takes comma-separated integers such as 1,3,5, got "
                             f"{values['severities']!r}") from None
    types = [t.strip() for t in (names or "").split(",") if t.strip()] or None
    return {**values, "corruption_types": types, "severities": severities}
