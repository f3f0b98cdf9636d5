"""The registry of late-phase kinds, and what a kind sees of a model when it looks for its targets.

A kind is a :class:`~lpconvert.layers.base.LatePhaseLayer` subclass decorated with :func:`register_kind`, in its own
file of this package (every module here is imported by the package). Kinds are listed in file-name order; when two
kinds want the same module, the earlier one has it (``classifier`` before ``rank1``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import LatePhaseError
from .base import LatePhaseLayer

KINDS: dict[str, type[LatePhaseLayer]] = {}


def register_kind(cls: type[LatePhaseLayer]) -> type[LatePhaseLayer]:
    """Class decorator: make `cls` the late-phase kind ``cls.kind``."""
    if not cls.kind or cls.kind in KINDS:
        raise ValueError(f"late-phase kind {cls.kind!r} is missing or registered twice")
    KINDS[cls.kind] = cls
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
    """The kinds' options for ``--help``: ``kind.option=…`` per kind that has any."""
    return "; ".join(f"{kind}: {cls.options_help}" for kind, cls in KINDS.items() if cls.options_help)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a qualified module name matches one of the glob patterns (or equals one)."""
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


@dataclass
class Discovery:
    """What a kind sees of a model: its modules, the classifier found by torch.fx, include/exclude patterns and the
    kinds' options."""

    model: nn.Module
    modules: dict[str, nn.Module]
    classifier: str | None = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    claimed: set[str] = field(default_factory=set)

    def candidates(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, module) in module order: not the model itself, not claimed by an earlier kind, and passing
        include/exclude."""
        for name, module in self.modules.items():
            if not name or name in self.claimed:
                continue
            if self.include and not matches(name, self.include):
                continue
            if matches(name, self.exclude):
                continue
            yield name, module
