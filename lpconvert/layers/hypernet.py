"""Late-phase hypernetwork embeddings (paper §2.2): a linear hypernetwork generates the weights of a group of layers
of the same shape, W^(l) = θ φ^(l), with θ (n × d) shared by the group and a small embedding φ^(l) ∈ R^d per layer —
the late-phase weights, K members each.

Conversion of a pretrained model is exact: θ = [vec W^(1) … vec W^(L)] and φ^(l) = e_l (d = L), so θ φ^(l) = vec W^(l)
bit for bit. Option ``rank=d`` (< L) takes θ, φ from a truncated SVD of the group's weights instead; its relative
reconstruction error is shown by ``plan`` and refused above ``tolerance`` (default 1e-3) unless ``allow_error``.
Members follow Eq. 2 on the embeddings and get no weight decay (as in the paper). W is linear in φ, so the average
of the members is exact (Eq. 1): W̄^(l) = θ mean_k φ_k^(l), stored as the original layer's weight.

Groups: the Linear / Conv layers of one top-level block of the model (``layer1``, ``stages``, …) that share a weight
shape, in module order, at least two of them — for ``cifar_wrn28_10`` the 3×3 convolutions of each stage.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from lpconvert.errors import LatePhaseError
from lpconvert.layers.base import LatePhaseLayer, MemberSelection, _hollow_copy, member_mean
from lpconvert.layers.discovery import Discovery
from lpconvert.layers.options import Option
from lpconvert.layers.registry import register_kind


@register_kind
class HypernetLayer(LatePhaseLayer):
    """One layer of a group: generates its weight as θ φ_k (member k) from the group's shared θ."""

    kind = "hypernet"
    aliases = ("hyper",)
    precedence = 40  # after the classifier, before rank1
    description = "hypernetwork embeddings: W = θ φ per layer, θ shared by layers of one shape"
    module_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    member_weight_decay = False
    option_specs = {
        "rank": Option(int, None, "the embedding size d, by truncated SVD; default: exact, d = the group's layers",
                       minimum=1),
        "tolerance": Option(float, 1e-3, "the largest relative reconstruction error of a smaller embedding",
                            minimum=0),
        "allow_error": Option(bool, False, "accept a larger error: a model that differs from the original"),
    }

    def __init__(
        self,
        module: nn.Module,
        num_members: int,
        selection: MemberSelection,
        theta: nn.Parameter,
        embedding: torch.Tensor,
        sigma0: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_members, selection)
        self.shape = tuple(module.weight.shape)
        self.hyper_theta = theta  # the group's one parameter (registered in each layer; one optimizer state)
        self.hyper_embedding = nn.Parameter(embedding.detach().to(theta).unsqueeze(0).repeat(num_members, 1))
        self.bias = module.bias
        self.__dict__["template"] = _hollow_copy(module, ["weight", "bias"], {})
        self._requires_grad = module.weight.requires_grad
        if sigma0 > 0:
            self.perturb(sigma0, generator)

    # -- the kind ---------------------------------------------------------------------------------------------------
    @classmethod
    def targets(cls, discovery: Discovery) -> list[tuple[str, ...]]:
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name, module in discovery.candidates():
            if isinstance(module, cls.module_types) and not getattr(module, "transposed", False):
                groups[(name.split(".")[0], type(module), tuple(module.weight.shape))].append(name)
        return [tuple(names) for names in groups.values() if len(names) >= 2]

    @classmethod
    def check(cls, modules: Sequence[nn.Module], options: dict[str, Any]) -> list[str]:
        rank = _rank(modules, options)
        if rank == len(modules):
            return []
        error = _checked_factorise(modules, options)[2]
        return [f"hypernet group of {len(modules)} layers {tuple(modules[0].weight.shape)}: rank {rank}, "
                f"relative reconstruction error {error:.3g}"]

    @classmethod
    def member_parameters(cls, modules: Sequence[nn.Module], options: dict[str, Any]) -> int:
        """One embedding of d entries per layer of the group."""
        return len(modules) * _rank(modules, options)

    @classmethod
    def added_parameters(cls, modules: Sequence[nn.Module], num_members: int, options: dict[str, Any]) -> int:
        """The L weights (n entries each) become θ (n × d) and K × L embeddings of d entries."""
        n, rank = modules[0].weight.numel(), _rank(modules, options)
        return n * rank - n * len(modules) + num_members * cls.member_parameters(modules, options)

    @classmethod
    def build(cls, modules: Sequence[nn.Module], num_members: int, selection: MemberSelection, sigma0: float,
              generator: torch.Generator | None, options: dict[str, Any]) -> list[LatePhaseLayer]:
        theta, embeddings, _ = _checked_factorise(modules, options)
        shared = nn.Parameter(theta, requires_grad=modules[0].weight.requires_grad)
        return [cls(module, num_members, selection, shared, embeddings[l], sigma0, generator)
                for l, module in enumerate(modules)]

    # -- members ----------------------------------------------------------------------------------------------------
    def late_phase_parameters(self) -> Iterator[nn.Parameter]:
        yield self.hyper_embedding

    @torch.no_grad()
    def perturb(self, sigma0: float, generator: torch.Generator | None = None) -> None:
        """Eq. 2 on the embedding: φ_k = φ0 + σ0 ‖φ0‖/√d ε_k."""
        phi0 = self.hyper_embedding[0].float()
        noise = torch.randn(self.hyper_embedding.shape, generator=generator, dtype=torch.float32)
        self.hyper_embedding.add_((sigma0 * phi0.norm() / phi0.numel() ** 0.5 * noise).to(self.hyper_embedding))

    def weight_of(self, embedding: torch.Tensor) -> torch.Tensor:
        """W = θ φ in the layer's shape."""
        return (self.hyper_theta @ embedding).view(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embeddings = self.member_rows(self.hyper_embedding)
        outs = [functional_call(self.template, {"weight": self.weight_of(e), "bias": self.bias}, (x_g,))
                for e, x_g in zip(embeddings, self.selection.split(x))]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # -- back to the original type ------------------------------------------------------------------------------------
    def _original(self, embedding: torch.Tensor) -> nn.Module:
        module = _hollow_copy(self.template, [], {})
        module.weight = nn.Parameter(self.weight_of(embedding).detach().clone(), requires_grad=self._requires_grad)
        if self.bias is not None:
            module.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        module.train(self.training)
        return module

    def collapse(self, **options: Any) -> nn.Module:
        """Eq. 1, exact because W is linear in φ: W̄ = θ mean_k φ_k."""
        return self._original(member_mean(self.hyper_embedding))

    def unload(self, k: int) -> nn.Module:
        return self._original(self.hyper_embedding[k])

    def extra_repr(self) -> str:
        return f"K={self.num_members}, original={type(self.template).__name__}, shape={self.shape}, " \
               f"d={self.hyper_embedding.shape[1]}"


def _rank(modules: Sequence[nn.Module], options: dict[str, Any]) -> int:
    """The embedding's size d: option ``rank`` (at most the group's L layers), else L (exact)."""
    rank = options["rank"]
    if rank is None:
        return len(modules)
    if rank > len(modules):
        raise LatePhaseError(f"late-phase options: hypernet.rank must be at most {len(modules)} (the layers of the "
                             f"group of shape {tuple(modules[0].weight.shape)}), got {rank}; lower it")
    return rank


def _checked_factorise(modules: Sequence[nn.Module], options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`_factorise` at the option's rank, refused above ``tolerance`` unless ``allow_error``."""
    rank = _rank(modules, options)
    theta, embeddings, error = _factorise(modules, rank)
    if error > options["tolerance"] and not options["allow_error"]:
        raise LatePhaseError(
            f"a rank-{rank} hypernetwork reproduces the {len(modules)} layers of shape "
            f"{tuple(modules[0].weight.shape)} only to a relative error of {error:.3g} (> {options['tolerance']:g}); "
            "raise hypernet.rank, or set hypernet.allow_error=true to accept a model that differs from the original"
        )
    return theta, embeddings, error


def _factorise(modules: Sequence[nn.Module], rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """θ (n × d), the L embeddings (L × d) and the relative reconstruction error ‖θΦᵀ − W‖/‖W‖ of a group."""
    weights = torch.stack([m.weight.detach().reshape(-1) for m in modules], dim=1)  # n × L
    if rank == len(modules):
        return weights.clone(), torch.eye(rank, dtype=weights.dtype, device=weights.device), 0.0
    u, s, vh = torch.linalg.svd(weights.double(), full_matrices=False)
    theta, embeddings = (u[:, :rank] * s[:rank]), vh[:rank].T
    error = float(torch.linalg.norm(theta @ embeddings.T - weights.double()) / torch.linalg.norm(weights.double()))
    return theta.to(weights.dtype), embeddings.to(weights.dtype), error
