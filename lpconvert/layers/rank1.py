"""Rank-1 multiplicative late-phase weights (paper §2.2, after Wen et al. 2020) for Linear and Conv layers, and for
the recurrent matrices of LSTM / GRU / RNN layers (:mod:`.rank1_recurrent`, the paper's §3.4).

Member k uses W_k = W ∘ (u_k v_kᵀ) with the full weight W (and bias) shared; for Linear and Conv it is computed
without forming W_k as y = (W (x ∘ v_k)) ∘ u_k + b. Members average to W̄ = W ∘ mean_k(u_k v_kᵀ) (Eq. 1).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from lpconvert.errors import LatePhaseError
from lpconvert.layers.base import LatePhaseLayer, MemberSelection, _hollow_copy, mean_outer, perturb_factors
from lpconvert.layers.discovery import Discovery
from lpconvert.layers.options import Option
from lpconvert.layers.rank1_recurrent import Rank1RecurrentLayer
from lpconvert.layers.registry import register_kind


@register_kind
class Rank1Layer(LatePhaseLayer):
    """Wraps an ``nn.Linear`` or ``nn.Conv{1,2,3}d`` (or a subclass): shared W, b; K × (u ∈ R^out, v ∈ R^in)."""

    kind = "rank1"
    precedence = 10  # the Linear / Conv layers that the classifier and hypernet leave
    description = "multiplicative u vᵀ on Linear / Conv weights and LSTM / GRU recurrent matrices"
    module_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNBase)
    option_specs = {"input_weights": Option(bool, False, "the input matrices of LSTM / GRU / RNN layers too",
                                            applies_to=(nn.RNNBase,))}

    @classmethod
    def accepts(cls, name: str, module: nn.Module, discovery: Discovery) -> bool:
        return isinstance(module, cls.module_types)

    @classmethod
    def member_parameters(cls, modules: Sequence[nn.Module], options: dict[str, Any]) -> int:
        """u and v: out + in entries per matrix (a grouped convolution's v spans all input channels)."""
        return sum(Rank1RecurrentLayer.factor_entries(m, **options) if isinstance(m, nn.RNNBase)
                   else m.weight.shape[0] + m.weight.shape[1] * getattr(m, "groups", 1) for m in modules)

    @classmethod
    def added_parameters(cls, modules: Sequence[nn.Module], num_members: int, options: dict[str, Any]) -> int:
        """W stays (shared); all K members' factors are new."""
        return num_members * cls.member_parameters(modules, options)

    @classmethod
    def build(cls, modules: Sequence[nn.Module], num_members: int, selection: MemberSelection, sigma0: float,
              generator: torch.Generator | None, options: dict[str, Any]) -> list[LatePhaseLayer]:
        """A recurrent layer gets :class:`~.rank1_recurrent.Rank1RecurrentLayer` (option ``input_weights``: the
        input-to-hidden matrices too), a Linear or Conv layer this class."""
        return [Rank1RecurrentLayer(m, num_members, selection, sigma0, generator, **options)
                if isinstance(m, nn.RNNBase) else cls(m, num_members, selection, sigma0, generator) for m in modules]

    def __init__(
        self,
        module: nn.Module,
        num_members: int,
        selection: MemberSelection,
        sigma0: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_members, selection)
        if isinstance(module, nn.Linear):
            out_features, in_features, self.groups = module.out_features, module.in_features, 1
        elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            out_features, in_features, self.groups = module.out_channels, module.in_channels, module.groups
        else:
            raise LatePhaseError(f"rank-1 late-phase weights need a Linear or Conv layer, not {type(module).__name__}")
        self.weight = module.weight
        self.bias = module.bias
        factory = {"dtype": module.weight.dtype, "device": module.weight.device}
        self.rank1_u = nn.Parameter(torch.ones(num_members, out_features, **factory))
        self.rank1_v = nn.Parameter(torch.ones(num_members, in_features, **factory))
        self.__dict__["template"] = _hollow_copy(module, ["weight", "bias"], {})
        if sigma0 > 0:
            self.perturb(sigma0, generator)

    def late_phase_parameters(self) -> Iterator[nn.Parameter]:
        yield self.rank1_u
        yield self.rank1_v

    def perturb(self, sigma0: float, generator: torch.Generator | None = None) -> None:
        perturb_factors((self.rank1_u, self.rank1_v), sigma0, generator)

    def _scale_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        # features sit last for Linear, at dim 1 for convolutions
        return (-1,) if isinstance(self.template, nn.Linear) else (-1,) + (1,) * (x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slices = self.selection.split(x)
        u, v = self.member_rows(self.rank1_u), self.member_rows(self.rank1_v)
        scaled = torch.cat([x_g * v[g].view(self._scale_shape(x_g)) for g, x_g in enumerate(slices)])
        y = functional_call(self.template, {"weight": self.weight, "bias": None}, (scaled,))
        y_slices = y.split([x_g.shape[0] for x_g in slices])
        y = torch.cat([y_g * u[g].view(self._scale_shape(y_g)) for g, y_g in enumerate(y_slices)])
        if self.bias is not None:
            y = y + self.bias.view(self._scale_shape(y))
        return y

    def _original(self, multiplier: torch.Tensor) -> nn.Module:
        """The original layer with W ∘ multiplier, multiplier of shape (out, in)."""
        out_features = multiplier.shape[0]
        if self.groups > 1:  # a grouped weight only holds the block diagonal of the (out, in) multiplier
            out_g, in_g = out_features // self.groups, multiplier.shape[1] // self.groups
            blocks = multiplier.view(self.groups, out_g, self.groups, in_g)
            multiplier = torch.stack([blocks[g, :, g] for g in range(self.groups)]).reshape(out_features, in_g)
        extra = (1,) * (self.weight.dim() - 2)
        module = _hollow_copy(self.template, [], {})
        module.weight = nn.Parameter(
            (self.weight * multiplier.view(*multiplier.shape, *extra)).detach().clone(),
            requires_grad=self.weight.requires_grad,
        )
        if self.bias is not None:
            module.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        module.train(self.training)
        return module

    def collapse(self, **options) -> nn.Module:
        """W̄ = W ∘ mean_k(u_k v_kᵀ)."""
        return self._original(mean_outer(self.rank1_u, self.rank1_v))

    def unload(self, k: int) -> nn.Module:
        return self._original(torch.outer(self.rank1_u[k], self.rank1_v[k]))
