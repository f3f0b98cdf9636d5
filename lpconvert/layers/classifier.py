"""Late-phase classifier: K × (W, b) of the layer that produces the logits (paper §2: the classifier as late-phase
weights) — a linear layer, or a 1×1 convolution followed by pooling (SqueezeNet)."""

from __future__ import annotations

from torch import nn

from lpconvert.layers.base import StackedLayer
from lpconvert.layers.discovery import Discovery
from lpconvert.layers.registry import register_kind


@register_kind
class LatePhaseLinear(StackedLayer):
    kind = "classifier"
    aliases = ("head", "fc")
    precedence = 50  # before hypernet and rank1, which take Linear / Conv layers too
    description = "the layer producing the logits"

    @classmethod
    def accepts(cls, name: str, module: nn.Module, discovery: Discovery) -> bool:
        return name == discovery.classifier
