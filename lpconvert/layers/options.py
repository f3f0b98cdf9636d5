"""A kind's options as settings: each kind declares them (``option_specs``: type, lower bound, default, help, the
layers they concern) and every value is read the same way, whether it comes from ``--late-phase-options
KIND.OPTION=VALUE``, a recipe, a saved run or ``convert(options={kind: {option: value}})``: unknown options are
refused with the list of valid ones, booleans are read strictly (``true/false/yes/no/1/0``), numbers must be finite
and in range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lpconvert.errors import LatePhaseError

#: The one boolean vocabulary of flags, recipes, saved runs and kind options.
BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def read_bool(value: Any) -> bool:
    """`value` as a boolean: a bool, 0 or 1, or a word of :data:`BOOLEAN_WORDS` (any case); ValueError otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[value.strip().lower()]
    raise ValueError(value)


def read_int(value: Any) -> int:
    """`value` as an integer: an int (not a bool), an integral float, or integer text; ValueError otherwise."""
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(value)


def read_float(value: Any) -> float:
    """`value` as a finite number: an int or float (not a bool), or numeric text; ValueError otherwise."""
    if isinstance(value, str):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(value)
    return float(value)


#: How each scalar type is read from a flag, a recipe, a saved run or a kind option: the one schema of values.
READERS: dict[type, Any] = {bool: read_bool, int: read_int, float: read_float}


@dataclass(frozen=True)
class Option:
    """One option of a kind.

    Args:
        type: ``bool``, ``int`` or ``float``.
        default: the value when the option is not given (None: the kind decides, as ``help`` says).
        help: what it does, for ``--help``.
        minimum: the smallest value allowed (numbers).
        applies_to: the module types it concerns (``nn.RNNBase`` for rank-1's input matrices); given for a model
            whose targets of the kind include none of them, it is refused. Empty: every target.
    """

    type: type
    default: bool | int | float | None
    help: str
    minimum: float | None = None
    applies_to: tuple[type[nn.Module], ...] = ()

    def describe(self) -> str:
        """The values it takes, e.g. ``an integer >= 1``."""
        if self.type is bool:
            return "a boolean (true/false/yes/no/1/0)"
        what = "an integer" if self.type is int else "a finite number"
        return what if self.minimum is None else f"{what} >= {self.minimum:g}"

    def coerce(self, value: Any) -> bool | int | float | None:
        """`value` as this option's type (text from the command line, or a Python value of the type); ValueError
        when it is not one, or out of range. None stands for an option whose default is None (not set)."""
        if value is None and self.default is None:
            return None
        number = READERS[self.type](value)
        if self.type is bool:
            return number
        if self.minimum is not None and number < self.minimum:
            raise ValueError(value)
        return number

    def applies(self, modules: Sequence[nn.Module]) -> bool:
        """Whether the option concerns one of `modules` (a kind's targets)."""
        return not self.applies_to or any(isinstance(m, self.applies_to) for m in modules)

    def text(self, name: str) -> str:
        """``name=TYPE >= minimum (help; default …)`` for ``--help``."""
        shown = {bool: "BOOL", int: "INT", float: "FLOAT"}[self.type]
        bound = "" if self.minimum is None else f" >= {self.minimum:g}"
        default = "" if self.default is None else f"; default {str(self.default).lower()}"
        return f"{name}={shown}{bound} ({self.help}{default})"


def check_options(kind: str, specs: Mapping[str, Option], values: Mapping[str, Any],
                  source: str = "late-phase options") -> dict[str, Any]:
    """`values` of `kind`'s options converted by their `specs`; an unknown option or a bad value is a
    :class:`LatePhaseError` naming ``KIND.OPTION``, after `source` (the flag or API that gave it)."""
    if not isinstance(values, Mapping):
        raise LatePhaseError(f"{source}: the options of {kind} must be a mapping of option names to values, "
                             f"got {values!r}")
    checked = {}
    for name, value in values.items():
        if name not in specs:
            valid = f"{kind}'s options are {', '.join(specs)}" if specs else f"{kind} has no options"
            raise LatePhaseError(f"{source}: unknown option {kind}.{name}; {valid}")
        try:
            checked[name] = specs[name].coerce(value)
        except ValueError:
            raise LatePhaseError(f"{source}: {kind}.{name} must be {specs[name].describe()}, got {value!r}") from None
    return checked
