"""The registry of late-phase kinds.

A kind is a :class:`~lpconvert.layers.base.LatePhaseLayer` subclass decorated with :func:`register_kind`, in its own
file of this package (every module here is imported by the package). ``KINDS`` is kept in decreasing
:attr:`~lpconvert.layers.base.LatePhaseLayer.precedence` (ties by kind name), whatever the order of registration:
kinds look for their targets in that order, so when two kinds want the same module the one of higher precedence has
it (``classifier`` before ``hypernet`` before ``rank1``). ``--help`` and ``plan`` list kinds in that order too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from lpconvert.errors import LatePhaseError
from lpconvert.layers.base import LatePhaseLayer
from lpconvert.layers.options import check_options

KINDS: dict[str, type[LatePhaseLayer]] = {}


def register_kind(cls: type[LatePhaseLayer]) -> type[LatePhaseLayer]:
    """Class decorator: make `cls` the late-phase kind ``cls.kind``, in its place by precedence."""
    if not cls.kind or cls.kind in KINDS:
        raise ValueError(f"late-phase kind {cls.kind!r} is missing or registered twice")
    ordered = sorted([*KINDS.values(), cls], key=lambda c: (-c.precedence, c.kind))
    KINDS.clear()
    KINDS.update((c.kind, c) for c in ordered)
    return cls


def kind_names() -> tuple[str, ...]:
    return tuple(KINDS)


def aliases() -> dict[str, tuple[str, ...]]:
    """Every accepted target name (kinds and their aliases) → the kinds it stands for."""
    table: dict[str, list[str]] = {kind: [kind] for kind in KINDS}
    for kind, cls in KINDS.items():
        for alias in cls.aliases:
            table.setdefault(alias, []).append(kind)
    return {name: tuple(kinds) for name, kinds in table.items()}


def resolve_kinds(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Kinds named by `targets` (a comma-separated string or names; aliases such as ``bn``, ``norm``, ``head``
    expanded), in registry order."""
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    table, kinds = aliases(), set()
    for target in targets:
        name = str(target).strip().lower()
        if name not in table:
            raise LatePhaseError(f"unknown late-phase target {target!r}; choose from {', '.join(sorted(table))}")
        kinds.update(table[name])
    if not kinds:
        raise LatePhaseError(f"no late-phase targets given; choose from {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in kinds)


def module_types() -> tuple[type[nn.Module], ...]:
    """Module types some kind replaces: torch.fx keeps them as leaves."""
    return tuple(t for cls in KINDS.values() for t in cls.module_types)


def kinds_help() -> str:
    """One line per kind for ``--help``: name, aliases, what it replaces."""
    return "; ".join(
        f"{kind}{' (' + ', '.join(cls.aliases) + ')' if cls.aliases else ''}: {cls.description}"
        for kind, cls in KINDS.items()
    )


def options_help() -> str:
    """The kinds' options for ``--help``: ``kind: option=TYPE (help; default)`` per kind that has any."""
    return "; ".join(f"{kind}: " + ", ".join(spec.text(name) for name, spec in cls.option_specs.items())
                     for kind, cls in KINDS.items() if cls.option_specs)


def check_kind_options(options: Mapping[str, Mapping[str, Any]] | None,
                       source: str = "late-phase options") -> dict[str, dict[str, Any]]:
    """``{kind: {option: value}}`` with every kind and option known and every value converted by the kind's declared
    :class:`~lpconvert.layers.options.Option` (text as on the command line, or Python values); anything else is a
    one-line :class:`LatePhaseError` naming `source` and the valid kinds or options."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise LatePhaseError(f"{source} must be a mapping {{kind: {{option: value}}}}, got {options!r}")
    unknown = [kind for kind in options if kind not in KINDS]
    if unknown:
        with_options = ", ".join(kind for kind, cls in KINDS.items() if cls.option_specs)
        raise LatePhaseError(f"{source}: unknown late-phase kind {unknown[0]!r}; kinds with options: {with_options}")
    return {kind: check_options(kind, KINDS[kind].option_specs, values, source) for kind, values in options.items()}
