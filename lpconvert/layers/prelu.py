"""Late-phase PReLU: K × the learned negative slopes a (one per channel, or one for the layer).

PReLU slopes are low-dimensional like BatchNorm's scale and shift, and PReLU networks often have no BatchNorm: a
small set of weights to replicate, averaged back with Eq. 1 into a plain ``nn.PReLU``. Not converted by default.
"""

from __future__ import annotations

from torch import nn

from lpconvert.layers.base import StackedLayer
from lpconvert.layers.registry import register_kind


class _PReLUNet(nn.Module):
    """The kind's example: two convolutions with per-channel and shared PReLU slopes, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.PReLU(4), nn.Conv2d(4, 4, 3, padding=1),
                                      nn.PReLU())
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@register_kind
class LatePhasePReLU(StackedLayer):
    kind = "prelu"
    precedence = 10
    description = "PReLU slopes"
    module_types = (nn.PReLU,)

    @staticmethod
    def example() -> nn.Module:
        return _PReLUNet()
