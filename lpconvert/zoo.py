"""What ``lpconvert zoo`` prints: each recipe of zoo/ with the paper's numbers and lpconvert's.

A recipe's ``measured:`` holds the numbers zoo/README.md states for it, as strings (``"77.70 ± 0.30"``: YAML would
read 77.70 as 77.7): one set, or several labelled sets (reduced runs of a recipe not run in full).
"""

from __future__ import annotations

from typing import Any

__all__ = ["describe_recipe"]


def numbers(values: Any, empty: str) -> str:
    """``paper:`` / ``measured:`` numbers after a space on one line (``base 77.51 ± 0.34 → late-phase …``), or one
    indented line per labelled set; `empty` when there are none."""
    if isinstance(values, dict) and values and all(isinstance(v, dict) for v in values.values()):
        return "".join(f"\n    {label}:{numbers(sets, empty)}" for label, sets in values.items())
    if isinstance(values, dict):
        return " " + (" → ".join(f"{k} {v}" for k, v in values.items()) or empty)
    return f" {values if values else empty}"


def describe_recipe(recipe: dict[str, Any]) -> str:
    """One recipe of :func:`lpconvert.config.list_recipes`: name, file, the paper's numbers, lpconvert's and the
    description."""
    return (f"{recipe['name']}\n  {recipe['file']}\n  paper:{numbers(recipe['paper'], 'no paper numbers')}\n"
            f"  measured:{numbers(recipe['measured'], 'not run yet')}\n  {recipe['description']}")
