"""Late-phase classifier: K × (W, b) of the model's final linear layer (paper §2: the classifier as late-phase weights)."""

from .base import StackedLayer


class LatePhaseLinear(StackedLayer):
    kind = "classifier"
