"""Late-phase LayerNorm / RMSNorm / GroupNorm: K × (γ, β), no statistics.

Goes beyond the paper so that BatchNorm-free models (ViT, ConvNeXt, Swin) get late-phase weights too. Subclasses
such as timm's ``LayerNorm2d`` keep their own forward (channels-first permutes and so on).
"""

from __future__ import annotations

from torch import nn

from lpconvert.layers.base import StackedLayer
from lpconvert.layers.registry import register_kind


@register_kind
class LatePhaseLayerNorm(StackedLayer):
    kind = "layernorm"
    aliases = ("ln", "norm")
    precedence = 30
    description = "LayerNorm and RMSNorm scale/shift"
    module_types = (nn.LayerNorm, nn.RMSNorm)


@register_kind
class LatePhaseGroupNorm(StackedLayer):
    kind = "groupnorm"
    aliases = ("gn", "norm")
    precedence = 20
    description = "GroupNorm scale/shift"
    module_types = (nn.GroupNorm,)
