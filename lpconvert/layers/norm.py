"""Late-phase LayerNorm / RMSNorm / GroupNorm: K × (γ, β), no statistics.

Goes beyond the paper so that BatchNorm-free models (ViT, ConvNeXt, Swin) get late-phase weights too. Subclasses
such as timm's ``LayerNorm2d`` keep their own forward (channels-first permutes and so on).
"""

from .base import StackedLayer


class LatePhaseLayerNorm(StackedLayer):
    kind = "layernorm"


class LatePhaseGroupNorm(StackedLayer):
    kind = "groupnorm"
