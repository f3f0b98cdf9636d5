"""Rank-1 late-phase weights on recurrent layers (paper §3.4: the LSTM's recurrent weight matrix).

For every layer l (and direction) of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, member k uses
W_hh^(l) ∘ u_k^(l) v_k^(l)ᵀ — and, with ``input_weights=True``, W_ih^(l) ∘ u'_k v'_kᵀ too — with the matrices and
biases shared. The effective matrices are formed once per forward pass (not per time step) and the layer's own fused
kernel runs with them. Members average to W̄ = W ∘ mean_k(u_k v_kᵀ) (Eq. 1), an ``nn.LSTM`` again.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lpconvert.errors import LatePhaseError
from lpconvert.layers.base import LatePhaseLayer, MemberSelection, _hollow_copy, mean_outer, perturb_factors


class Rank1RecurrentLayer(LatePhaseLayer):
    """Wraps an ``nn.RNNBase``: shared matrices and biases under their original names, K × (u, v) per factored
    matrix as ``rank1_u_<name>`` / ``rank1_v_<name>``."""

    kind = "rank1"

    def __init__(
        self,
        module: nn.RNNBase,
        num_members: int,
        selection: MemberSelection,
        sigma0: float = 0.0,
        generator: torch.Generator | None = None,
        input_weights: bool = False,
    ) -> None:
        super().__init__(num_members, selection)
        self.factored = self.factored_names(module, input_weights)
        self.shared_names = [n for n in module._flat_weights_names if getattr(module, n, None) is not None]
        for name in self.shared_names:
            self.register_parameter(name, module._parameters[name])
        for name in self.factored:
            rows, cols = module._parameters[name].shape
            factory = {"dtype": module._parameters[name].dtype, "device": module._parameters[name].device}
            self.register_parameter(f"rank1_u_{name}", nn.Parameter(torch.ones(num_members, rows, **factory)))
            self.register_parameter(f"rank1_v_{name}", nn.Parameter(torch.ones(num_members, cols, **factory)))
        self.__dict__["template"] = _hollow_copy(module, self.shared_names, {})
        self.template._init_flat_weights()  # its own list of (absent) weights, not the original module's
        self.batch_dim = 0 if module.batch_first else 1
        self.train(module.training)
        if sigma0 > 0:
            self.perturb(sigma0, generator)

    @staticmethod
    def factored_names(module: nn.RNNBase, input_weights: bool = False) -> list[str]:
        prefixes = ("weight_hh", "weight_ih") if input_weights else ("weight_hh",)
        return [n for n in module._flat_weights_names if n.startswith(prefixes)]

    @classmethod
    def factor_entries(cls, module: nn.RNNBase, input_weights: bool = False) -> int:
        """Entries of u and v that one member adds."""
        return sum(sum(module._parameters[n].shape) for n in cls.factored_names(module, input_weights))

    def late_phase_parameters(self) -> Iterator[nn.Parameter]:
        for name in self.factored:
            yield getattr(self, f"rank1_u_{name}")
            yield getattr(self, f"rank1_v_{name}")

    def perturb(self, sigma0: float, generator: torch.Generator | None = None) -> None:
        perturb_factors(list(self.late_phase_parameters()), sigma0, generator)

    def _weights(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The layer's matrices with W ∘ u vᵀ for the factored ones."""
        weights = {n: getattr(self, n) for n in self.shared_names}
        for name, (u, v) in factors.items():
            weights[name] = weights[name] * torch.outer(u, v)
        return weights

    def forward(self, x: Any, hx: Any = None) -> Any:
        rows = {n: (self.member_rows(getattr(self, f"rank1_u_{n}")), self.member_rows(getattr(self, f"rank1_v_{n}")))
                for n in self.factored}
        if self.selection.groups == 1:
            return self._run(self._weights({n: (u[0], v[0]) for n, (u, v) in rows.items()}), x, hx)
        if isinstance(x, PackedSequence):
            raise LatePhaseError("vectorized mode cannot split a PackedSequence between members; use mode='sequential'")
        xs = self.selection.split(x.movedim(self.batch_dim, 0))
        states = None
        if hx is not None:  # (layers·directions, batch, hidden), or a pair of them for an LSTM
            parts = [self.selection.split(h.movedim(1, 0)) for h in (hx if isinstance(hx, tuple) else (hx,))]
            states = [tuple(p[g].movedim(0, 1) for p in parts) for g in range(len(xs))]
        outputs, finals = [], []
        for g, x_g in enumerate(xs):
            weights = self._weights({n: (u[g], v[g]) for n, (u, v) in rows.items()})
            state = None if states is None else (states[g] if isinstance(hx, tuple) else states[g][0])
            out, final = self._run(weights, x_g.movedim(0, self.batch_dim), state)
            outputs.append(out)
            finals.append(final if isinstance(final, tuple) else (final,))
        final = tuple(torch.cat(parts, dim=1) for parts in zip(*finals))
        return torch.cat(outputs, dim=self.batch_dim), (final if len(final) > 1 else final[0])

    def _run(self, weights: dict[str, torch.Tensor], x: Any, hx: Any) -> Any:
        """The recurrent layer's own forward (its fused kernel) with `weights`, handed over in the list the layer
        reads its weights from."""
        template = self.template
        template._flat_weights = [weights[n] for n in template._flat_weights_names]
        try:
            return template(x, hx)
        finally:
            template._flat_weights = [None] * len(template._flat_weights_names)

    def _original(self, multipliers: dict[str, torch.Tensor]) -> nn.Module:
        module = _hollow_copy(self.template, [], {})
        for name in self.shared_names:
            weight = getattr(self, name)
            value = weight * multipliers[name] if name in multipliers else weight
            module._parameters[name] = nn.Parameter(value.detach().clone(), requires_grad=weight.requires_grad)
        module._init_flat_weights()
        module.train(self.training)
        return module

    def collapse(self, **options: Any) -> nn.Module:
        """W̄ = W ∘ mean_k(u_k v_kᵀ) for every factored matrix (float64 sums: identical members are exact)."""
        return self._original({n: mean_outer(getattr(self, f"rank1_u_{n}"), getattr(self, f"rank1_v_{n}"))
                               for n in self.factored})

    def unload(self, k: int) -> nn.Module:
        return self._original({n: torch.outer(getattr(self, f"rank1_u_{n}")[k], getattr(self, f"rank1_v_{n}")[k])
                               for n in self.factored})
