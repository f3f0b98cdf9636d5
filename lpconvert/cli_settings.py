"""The flags of the ``lpconvert`` commands that set :class:`~lpconvert.config.FinetuneConfig` fields, made from the
fields themselves, and the configuration a command line gives: defaults ← recipe (or a resumed run's settings) ←
flags."""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from lpconvert.config import LEGACY_SETTINGS, SAME_QUANTITY, FinetuneConfig, field_types, flag
from lpconvert.errors import LatePhaseError
from lpconvert.files import read_json_object
from lpconvert.zoo import read_recipe, scale_schedule


def names(text: str | None) -> tuple[str, ...]:
    """A comma-separated list flag."""
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


# --------------------------------------------------------------------------------------------------------------------
# the flags of FinetuneConfig's fields
# --------------------------------------------------------------------------------------------------------------------
_DEFAULTS = FinetuneConfig()
_FIELDS = {field.name: field for field in dataclasses.fields(FinetuneConfig)}
_TYPES = field_types()
#: Every setting that ``finetune`` takes as a flag: all but its MODEL argument.
FLAG_SETTINGS = tuple(name for name, field in _FIELDS.items() if not field.metadata.get("argument"))
_PATH_TYPES = {"file": click.Path(dir_okay=False), "dir": click.Path(file_okay=False)}
_F = TypeVar("_F", bound=Callable[..., Any])


def config_option(name: str) -> Callable[[_F], _F]:
    """The flag of setting `name`, all from its FinetuneConfig field: the help (the default shown unless the help
    says it), the type (choices, a path, an on/off pair for a bool; lists are comma-separated text). Its value is None
    when not given, so that a recipe's value stands."""
    field = _FIELDS[name]
    help_text = field.metadata.get("help")  # none: tests/test_cli.py names the flag
    if help_text and "[default:" not in help_text:
        help_text = f"{help_text}  [default: {show(getattr(_DEFAULTS, name))}]"
    hint = _TYPES[name]
    base = tuple if typing.get_origin(hint) is tuple else next(
        (t for t in typing.get_args(hint) if t is not type(None)), hint)
    declaration = flag(name)
    kind: click.ParamType | type | None = None
    if "choices" in field.metadata:
        kind = click.Choice(field.metadata["choices"])
    elif "path" in field.metadata:
        kind = _PATH_TYPES[field.metadata["path"]]
    elif base is bool:
        declaration = f"{declaration}/--no-{declaration[2:]}"
    elif "nargs" in field.metadata:  # a list of that many separate values
        kind = typing.get_args(hint)[0]
    else:
        kind = base if base in (int, float) else str  # lists: comma-separated text
    extra = {"is_flag": False, "flag_value": field.metadata["flag_value"]} if "flag_value" in field.metadata else {}
    if "nargs" in field.metadata:
        extra["nargs"] = field.metadata["nargs"]
    return click.option(declaration, *field.metadata.get("aliases", ()), name, type=kind, default=None,
                        help=help_text, **extra)


def config_options(*names: str) -> Callable[[_F], _F]:
    """:func:`config_option` of each of `names`, listed in that order."""
    def decorate(function: _F) -> _F:
        for name in reversed(names):
            function = config_option(name)(function)
        return function

    return decorate


def show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def given_settings(flags: dict[str, Any]) -> dict[str, Any]:
    """The settings given on the command line: the flags whose value is not None."""
    return {k: v for k, v in flags.items() if v is not None}


def build_config(model: str | None, recipe: str | None, flags: dict[str, Any]) -> FinetuneConfig:
    """Defaults ← recipe file (or, for a bare --resume, the run's own settings) ← flags given on the command line."""
    values: dict[str, Any] = read_recipe(recipe) if recipe else {}
    saved = Path(flags["resume"]) / "config.json" if flags.get("resume") else None
    ran = read_json_object(saved) if saved is not None and saved.is_file() else None
    if model is None and recipe is None and ran is not None:
        values = {k: v for k, v in ran.items() if k not in ("resume", "force")}
    if model is not None:
        values["model"] = model
    if "model" not in values:
        raise LatePhaseError("no MODEL given; name one (e.g. resnet152, tv:resnet50, hf-hub:ORG/NAME) or use --recipe")
    given = given_settings(flags)
    if recipe and "epochs" in given and "epochs" in values:
        changed = scale_schedule(values, given["epochs"], keep=set(given))
        if changed:
            logging.getLogger("lpconvert").info(
                "--epochs %s stretches the recipe's %s-epoch schedule: %s", given["epochs"], values["epochs"],
                ", ".join(f"{flag(k)} {show(a)} → {show(b)}" for k, (a, b) in changed.items()))
    for pair in SAME_QUANTITY:  # --batch-size-per-gpu replaces a recipe's batch_size (and the other way round)
        for name in pair:
            if name in given:
                values.update({other: FinetuneConfig.__dataclass_fields__[other].default for other in pair
                               if other != name and other not in given})
    if ran is not None:  # a run saved before a setting existed continues as that version behaved, unless it is given
        values.update({k: v for k, v in LEGACY_SETTINGS.items() if k not in ran and k not in given})
    values.update(given)
    config = FinetuneConfig.from_dict(values)
    late = [m for m in config.milestones if m >= config.epochs]
    if "milestones" in given and config.schedule == "multistep" and late and os.environ.get("RANK", "0") == "0":
        logging.getLogger("lpconvert").warning("--milestones %s: those at or after --epochs %d never take effect",
                                               ",".join(map(str, late)), config.epochs)
    return config


MODEL_OPTION = click.option("--model", "model_option", metavar="MODEL", help="MODEL given as a flag (timm's spelling).")


def model_argument(argument: str | None, option: str | None) -> str | None:
    if argument and option and argument != option:
        raise LatePhaseError(f"two models given, {argument} and --model {option}; name one")
    return argument or option
