"""What a kind sees of a model when it looks for its targets: the modules, the classifier, include/exclude patterns,
the kinds' options and the modules that a kind of higher precedence has already claimed."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn


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
        """(name, module) in module order: not the model itself, not claimed by a kind of higher precedence, and
        passing include/exclude."""
        for name, module in self.modules.items():
            if not name or name in self.claimed:
                continue
            if self.include and not matches(name, self.include):
                continue
            if matches(name, self.exclude):
                continue
            yield name, module
