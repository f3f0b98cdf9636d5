"""Late-phase layers, one file per family; each holds K members and averages back to the original layer."""

from .base import LatePhaseLayer, MemberSelection, StackedLayer
from .batchnorm import BN_STATS_MODES, LatePhaseBatchNorm
from .linear import LatePhaseLinear
from .norm import LatePhaseGroupNorm, LatePhaseLayerNorm
from .rank1 import Rank1Layer

__all__ = [
    "BN_STATS_MODES",
    "LatePhaseBatchNorm",
    "LatePhaseGroupNorm",
    "LatePhaseLayer",
    "LatePhaseLayerNorm",
    "LatePhaseLinear",
    "MemberSelection",
    "Rank1Layer",
    "StackedLayer",
]
