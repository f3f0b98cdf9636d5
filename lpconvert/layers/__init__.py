"""Late-phase layers, one file per kind; each holds K members and averages back to the original layer.

Every module of this package is imported here, so a kind registers itself (``@register_kind``) by existing:
adding a kind is one file in this folder and its tests. Import order does not matter: the registry orders kinds by
their ``precedence``.
"""

import importlib
import pkgutil

from lpconvert.layers.base import LatePhaseLayer, MemberSelection, StackedLayer, member_mean
from lpconvert.layers.discovery import Discovery
from lpconvert.layers.options import Option
from lpconvert.layers.registry import (
    KINDS,
    aliases,
    check_kind_options,
    kind_names,
    kinds_help,
    options_help,
    register_kind,
    resolve_kinds,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from lpconvert.layers.batchnorm import BN_STATS_MODES, LatePhaseBatchNorm  # noqa: E402
from lpconvert.layers.classifier import LatePhaseLinear  # noqa: E402
from lpconvert.layers.hypernet import HypernetLayer  # noqa: E402
from lpconvert.layers.norm import LatePhaseGroupNorm, LatePhaseLayerNorm  # noqa: E402
from lpconvert.layers.rank1 import Rank1Layer  # noqa: E402
from lpconvert.layers.rank1_recurrent import Rank1RecurrentLayer  # noqa: E402

__all__ = [
    "BN_STATS_MODES",
    "KINDS",
    "Discovery",
    "HypernetLayer",
    "LatePhaseBatchNorm",
    "LatePhaseGroupNorm",
    "LatePhaseLayer",
    "LatePhaseLayerNorm",
    "LatePhaseLinear",
    "MemberSelection",
    "Option",
    "Rank1Layer",
    "Rank1RecurrentLayer",
    "StackedLayer",
    "aliases",
    "check_kind_options",
    "kind_names",
    "kinds_help",
    "member_mean",
    "options_help",
    "register_kind",
    "resolve_kinds",
]
