"""Recipes: settings files (YAML or TOML) read as flags (:func:`read_recipe`), their schedule stretched to another
``--epochs`` (:func:`scale_schedule`), and what ``lpconvert zoo`` prints — each recipe of zoo/ with the paper's
numbers and lpconvert's (:func:`list_recipes`, :func:`describe_recipe`).

A recipe's ``measured:`` holds the numbers zoo/README.md states for it, as strings (``"77.70 ± 0.30"``: YAML would
read 77.70 as 77.7): one set, or several labelled sets (reduced runs of a recipe not run in full).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from lpconvert.config import flag
from lpconvert.errors import LatePhaseError

__all__ = ["describe_recipe", "list_recipes", "read_recipe", "scale_schedule"]

#: Settings that only the command line may set: a recipe cannot make lpconvert replace anything.
COMMAND_LINE_ONLY = ("force",)
#: Settings that are points (or spans) on the epoch axis: a recipe's scale with an --epochs given apart from it.
SCHEDULE_POINTS = ("milestones", "anneal_start", "anneal_end", "warmup_epochs", "t0", "swa_start", "swa_anneal_epochs")


def scale_schedule(recipe: dict[str, Any], epochs: int, keep: set[str] = frozenset()) -> dict[str, tuple[Any, Any]]:
    """A recipe's schedule (:data:`SCHEDULE_POINTS`, except those in `keep`) stretched in place to `epochs` from the
    recipe's own ``epochs``, so ``--recipe R --epochs 3`` runs R's schedule in 3 epochs: T0 and the SWA start rounded
    to whole epochs (and kept before the end), the other points to 1/1000 of an epoch. Returns {setting: (before,
    after)} for what changed."""
    before = recipe.get("epochs")
    try:
        factor = epochs / float(before)
    except (TypeError, ValueError, ZeroDivisionError):
        return {}
    changed = {}
    for name in SCHEDULE_POINTS:
        value = recipe.get(name)
        if name in keep or value is None or factor == 1:
            continue
        try:
            if name in ("t0", "swa_start"):
                scaled: Any = min(round(float(value) * factor), max(epochs - 1, 0))
            elif isinstance(value, (list, tuple)):
                scaled = [round(float(v) * factor, 3) for v in value]
            else:
                scaled = round(float(value) * factor, 3)
        except (TypeError, ValueError):
            continue  # refused with its flag's name when the settings are read
        if scaled != value:
            recipe[name], changed[name] = scaled, (value, scaled)
    return changed


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The settings of a recipe file (YAML or TOML); keys are FinetuneConfig fields (dashes allowed).

    A recipe may carry documentation under ``paper:`` / ``measured:`` / ``description:``; those are not settings."""
    path = Path(path)
    if not path.is_file():
        raise LatePhaseError(f"recipe {path} does not exist; `lpconvert zoo` lists the recipes that ship with lpconvert")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except Exception as exc:  # yaml.YAMLError / tomllib.TOMLDecodeError
        raise LatePhaseError(f"cannot parse recipe {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise LatePhaseError(f"recipe {path} must be a mapping of settings")
    settings = raw.get("settings", raw)
    if not isinstance(settings, dict):
        raise LatePhaseError(f"recipe {path}: 'settings' must be a mapping of settings")
    settings = {str(k).replace("-", "_"): v for k, v in settings.items()
                if k not in ("paper", "measured", "description", "name")}
    for name in COMMAND_LINE_ONLY:
        if name in settings:
            raise LatePhaseError(f"recipe {path} sets '{name}'; that can only come from the command line ({flag(name)})")
    return settings


ZOO = Path(__file__).resolve().parents[1] / "zoo"  # the recipes of a source checkout


def list_recipes(folder: Path = ZOO) -> list[dict[str, Any]]:
    """Name, file, description and the paper's / measured numbers of every recipe in `folder`."""
    import yaml

    if not folder.is_dir():
        raise LatePhaseError(f"no recipe folder at {folder}; the zoo ships with the source checkout of lpconvert")
    recipes = []
    for path in sorted(folder.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        recipes.append({"name": raw.get("name", path.stem), "file": str(path), "paper": raw.get("paper"),
                        "measured": raw.get("measured"), "description": " ".join(str(raw.get("description", "")).split())})
    return recipes


def numbers(values: Any, empty: str) -> str:
    """``paper:`` / ``measured:`` numbers after a space on one line (``base 77.51 ± 0.34 → late-phase …``), or one
    indented line per labelled set; `empty` when there are none."""
    if isinstance(values, dict) and values and all(isinstance(v, dict) for v in values.values()):
        return "".join(f"\n    {label}:{numbers(sets, empty)}" for label, sets in values.items())
    if isinstance(values, dict):
        return " " + (" → ".join(f"{k} {v}" for k, v in values.items()) or empty)
    return f" {values if values else empty}"


def describe_recipe(recipe: dict[str, Any]) -> str:
    """One recipe of :func:`list_recipes`: name, file, the paper's numbers, lpconvert's and the
    description."""
    return (f"{recipe['name']}\n  {recipe['file']}\n  paper:{numbers(recipe['paper'], 'no paper numbers')}\n"
            f"  measured:{numbers(recipe['measured'], 'not run yet')}\n  {recipe['description']}")
