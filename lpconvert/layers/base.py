"""Machinery shared by every late-phase layer.

A late-phase layer holds K members of a few low-dimensional weights φ_1..φ_K (paper §2) stacked along a new leading
dimension, so a member is selected with a tensor index (one compiled graph for every member) and DDP sees one
parameter that receives a gradient at every step.

Which members run is decided by a :class:`MemberSelection` shared by all late-phase layers of one model. With G
selected members the batch is read as G equal slices, slice g running member ``members[g]``: G = 1 is the sequential
mode of Algorithm 1, G > 1 the vectorized mode (the members' minibatches stacked in one forward pass).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from lpconvert.errors import LatePhaseError
from lpconvert.layers.discovery import Discovery
from lpconvert.layers.options import Option


class MemberSelection:
    """The members that the next forward pass runs, shared by all late-phase layers of a model.

    ``members[g]`` runs on slice g of the batch; the slices are ``sizes`` rows long, or equal when ``sizes`` is None.
    Under torch.compile the layers read the members from ``index``, a tensor updated in place, so one compiled graph
    serves every member (a new graph only when the number of slices changes). Run backward before selecting other
    members: a compiled graph saves the index for its backward pass.
    """

    def __init__(self, num_members: int) -> None:
        self.num_members = num_members
        self.members: tuple[int, ...] = (0,)
        self.groups = 1
        self.sizes: tuple[int, ...] | None = None
        self.index = torch.zeros(1, dtype=torch.long)

    def select(self, members: Sequence[int], sizes: Sequence[int] | None = None) -> None:
        members = tuple(int(k) for k in members)
        if not members or any(not 0 <= k < self.num_members for k in members):
            raise LatePhaseError(
                f"member indices must lie in [0, {self.num_members - 1}], got {list(members)}"
            )
        if sizes is not None:
            sizes = tuple(int(s) for s in sizes)
            if len(sizes) != len(members) or any(s < 1 for s in sizes):
                raise LatePhaseError(f"give one positive slice size per member: {list(sizes)} for {list(members)}")
        self.members, self.groups = members, len(members)
        self.sizes = sizes if len(members) > 1 else None
        chosen = torch.tensor(members, dtype=torch.long)
        if self.index.shape == chosen.shape:
            self.index.copy_(chosen)
        else:
            self.index = chosen.to(self.index.device)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch slices of `x`, one per selected member."""
        if self.groups == 1:
            return (x,)
        if self.sizes is not None:
            if sum(self.sizes) != x.shape[0]:
                raise LatePhaseError(f"a batch of {x.shape[0]} does not split into member slices of {list(self.sizes)}")
            return x.split(self.sizes)
        if x.shape[0] % self.groups:
            raise LatePhaseError(
                f"a batch of {x.shape[0]} cannot be split evenly between {self.groups} members; "
                "give every member a minibatch of the same size, or select(members, sizes=...)"
            )
        return x.chunk(self.groups)

    def index_on(self, device: torch.device) -> torch.Tensor:
        """The selected members as a long tensor on `device` (moved once, then updated in place)."""
        if self.index.device != device:
            self.index = self.index.to(device)
        return self.index


def member_mean(stacked: torch.Tensor) -> torch.Tensor:
    """Eq. 1's mean_k φ_k over the leading member dimension, as φ_1 + mean_k(φ_k − φ_1) in float64.

    Identical members give back φ_1 bit for bit (a float32 mean of K equal values need not be that value), and the
    float64 sum keeps the result independent of the summation order to float32 precision."""
    first = stacked[0].double()
    return (first + (stacked.double() - first).mean(0)).to(stacked.dtype)


def _hollow_copy(module: nn.Module, tensor_names: Sequence[str], children: dict[str, nn.Module]) -> nn.Module:
    """A copy of `module` whose own tensors named `tensor_names` are None, sharing `children` with the caller."""
    memo = {id(child): child for child in children.values()}
    hollow = copy.copy(module)
    hollow._parameters = dict(module._parameters)
    hollow._buffers = dict(module._buffers)
    hollow._modules = dict(module._modules)
    for name in tensor_names:
        if name in hollow._parameters:
            hollow._parameters[name] = None
        else:
            hollow._buffers[name] = None
    for name, child in module._modules.items():
        hollow._modules[name] = memo.get(id(child), child)
    return hollow


class LatePhaseLayer(nn.Module):
    """Interface of every late-phase layer: K members, a shared :class:`MemberSelection`, a way back.

    A subclass registered with :func:`~lpconvert.layers.registry.register_kind` is a *kind* of late-phase weights.
    It declares its name and aliases, its precedence, its options (:attr:`option_specs`), the module types torch.fx
    keeps as leaves, how it finds its targets in a model (:meth:`targets`: single modules, or groups of modules that
    share state), how many parameters a member adds (:meth:`member_parameters`) and how it is built (:meth:`build`).
    Surgery, plan, the CLI and loading read that.
    """

    kind: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # which kind gets a module that two kinds claim: kinds look for targets in decreasing precedence (ties by kind
    # name), each among the modules no earlier kind took; the default 0 puts a new kind after the built-in ones
    precedence: ClassVar[int] = 0
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    member_weight_decay: ClassVar[bool] = True  # False: U_φ applies no weight decay to this kind's members
    # the kind's options (``convert(options={kind: {...}})``, ``--late-phase-options KIND.OPTION=VALUE``): every value
    # is checked against its Option before the kind sees it, and the kind's methods get all of them (defaults filled)
    option_specs: ClassVar[dict[str, Option]] = {}
    num_members: int
    selection: MemberSelection

    def __init__(self, num_members: int, selection: MemberSelection) -> None:
        super().__init__()
        self.num_members = num_members
        self.__dict__["selection"] = selection  # shared by every layer of the model, not a submodule

    # -- the kind ---------------------------------------------------------------------------------------------------
    @staticmethod
    def example() -> nn.Module | None:
        """A tiny image model that holds targets of this kind — input (N, 3, 5, 5), output (N, 5) logits — on which
        tests/test_kinds.py sweeps the kind beside its own tiny models, so that a kind is added in one file. None:
        the sweep's models hold its targets already."""
        return None

    @classmethod
    def option_values(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every option of this kind: the declared defaults, overridden by `given` (values already checked)."""
        return {name: spec.default for name, spec in cls.option_specs.items()} | dict(given)

    @classmethod
    def accepts(cls, name: str, module: nn.Module, discovery: Discovery) -> bool:
        """Whether `module` (qualified name `name`) is a target of this kind on its own."""
        return False

    @classmethod
    def targets(cls, discovery: Discovery) -> list[tuple[str, ...]]:
        """The targets of this kind in a model: tuples of qualified names, one module each unless the kind groups
        layers that share state. The default: every module that :meth:`accepts`."""
        return [(name,) for name, module in discovery.candidates() if cls.accepts(name, module, discovery)]

    @classmethod
    def check(cls, modules: Sequence[nn.Module], options: dict[str, Any]) -> list[str]:
        """Refuse a target this kind cannot convert as asked (a :class:`LatePhaseError`); notes for the plan."""
        return []

    @classmethod
    def member_parameters(cls, modules: Sequence[nn.Module], options: dict[str, Any]) -> int:
        """Late-phase parameters that one member adds for a target."""
        raise NotImplementedError

    @classmethod
    def added_parameters(cls, modules: Sequence[nn.Module], num_members: int, options: dict[str, Any]) -> int:
        """Parameters the conversion adds to the model for a target (default: the K members replace the modules' own
        parameters, so K − 1 members' worth)."""
        return (num_members - 1) * cls.member_parameters(modules, options)

    @classmethod
    def build(cls, modules: Sequence[nn.Module], num_members: int, selection: MemberSelection, sigma0: float,
              generator: torch.Generator | None, options: dict[str, Any]) -> list[LatePhaseLayer]:
        """The late-phase layers replacing a target's modules, in order (Eq. 2 initialisation with `sigma0`);
        `options` are this kind's options (:meth:`option_values`), passed to the constructor as keywords."""
        return [cls(module, num_members, selection, sigma0, generator, **options) for module in modules]

    def late_phase_parameters(self) -> Iterator[nn.Parameter]:
        """The stacked (K, ...) late-phase parameters φ of this layer."""
        raise NotImplementedError

    def member_rows(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        """Row k of `stacked` for each selected member k: views in eager mode (no copy; a BatchNorm updates its
        running statistics in place in the member's row), gathered with one tensor index under torch.compile (one
        graph for every member)."""
        if torch.compiler.is_compiling():
            return list(stacked.index_select(0, self.selection.index_on(stacked.device)).unbind(0))
        return [stacked[k] for k in self.selection.members]

    def perturb(self, sigma0: float, generator: torch.Generator | None = None) -> None:
        raise NotImplementedError

    def member_state_names(self) -> list[str]:
        """The names of this layer's own tensors that hold one row per member (leading dimension K): by default its
        :meth:`late_phase_parameters`; a kind with per-member buffers too (BatchNorm's statistics) names them."""
        members = {id(p) for p in self.late_phase_parameters()}
        return [name for name, p in self._parameters.items() if p is not None and id(p) in members]

    @torch.no_grad()
    def keep_members(self, members: Sequence[int]) -> None:
        """Reduce this layer, in place, to the rows `members` (in that order) of every member tensor: a layer of
        ``len(members)`` members, whose :meth:`collapse` is Eq. 1 over those members only. The caller updates the
        model's shared :class:`MemberSelection` and configuration (:func:`lpconvert.collapse.soup.keep_members`)."""
        members = [int(k) for k in members]
        if not members or any(not 0 <= k < self.num_members for k in members):
            raise LatePhaseError(f"member indices must lie in [0, {self.num_members - 1}], got {members}")
        for name in self.member_state_names():
            stacked = getattr(self, name)
            rows = stacked.index_select(0, torch.tensor(members, device=stacked.device)).clone()
            if name in self._parameters:
                self._parameters[name] = nn.Parameter(rows, requires_grad=stacked.requires_grad)
            else:
                self._buffers[name] = rows
        self.num_members = len(members)

    def collapse(self, **options) -> nn.Module:
        """Eq. 1: the original module with the members averaged."""
        raise NotImplementedError

    def unload(self, k: int) -> nn.Module:
        """The original module holding member k alone."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"K={self.num_members}, original={type(self.template).__name__}"


class StackedLayer(LatePhaseLayer):
    """A layer with K members of a module's own tensors (by default all its parameters and buffers), running the
    original module's forward.

    The original module is kept as a hollow template (its own tensors removed, its submodules shared with this
    layer), and member g's forward is ``functional_call(template, member_g_tensors | shared_tensors, x_g)``: any
    subclass of the original type (timm's ``BatchNormAct2d``, ``LayerNorm2d`` …) keeps its exact behaviour. Member
    tensors keep the original names, with shape ``(K, *original_shape)``; the tensors :meth:`member_tensor_names`
    leaves out stay shared under their names (the same objects: parameters of θ) and submodules (e.g. a norm-act
    layer's ``act``) stay shared.
    """

    def __init__(
        self,
        module: nn.Module,
        num_members: int,
        selection: MemberSelection,
        sigma0: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_members, selection)
        stacked = set(self.member_tensor_names(module))
        own = {**{n: p for n, p in module._parameters.items() if p is not None},
               **{n: b for n, b in module._buffers.items() if b is not None}}
        self.param_names = [n for n in own if n in stacked and n in module._parameters]
        self.buffer_names = [n for n in own if n in stacked and n in module._buffers]
        self.shared_names = [n for n in own if n not in stacked]
        if not self.param_names:
            raise LatePhaseError(f"{type(module).__name__} has no parameters to turn into late-phase members")
        self._requires_grad = {n: p.requires_grad for n, p in module._parameters.items() if p is not None}
        for name, tensor in own.items():
            if name in self._requires_grad:
                self.register_parameter(name, tensor if name in self.shared_names else nn.Parameter(
                    self._stack(tensor), requires_grad=self._requires_grad[name]))
            else:
                self.register_buffer(name, tensor if name in self.shared_names else self._stack(tensor))
        for name, child in module.named_children():
            self.add_module(name, child)
        self.__dict__["template"] = _hollow_copy(module, list(own), dict(self.named_children()))
        self.template.train(module.training)
        self.train(module.training)
        if sigma0 > 0:
            self.perturb(sigma0, generator)

    @classmethod
    def member_tensor_names(cls, module: nn.Module) -> tuple[str, ...]:
        """The names of `module`'s own tensors that get K members (default: all its parameters and buffers). The
        others stay shared: ordinary parameters (θ) and buffers of this layer, given back unchanged by collapse."""
        return tuple(n for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None)

    @classmethod
    def accepts(cls, name: str, module: nn.Module, discovery: Discovery) -> bool:
        """Every module of the kind's `module_types` with a parameter among its member tensors (affine norms)."""
        return isinstance(module, cls.module_types) and any(
            module._parameters.get(n) is not None for n in cls.member_tensor_names(module))

    @classmethod
    def member_parameters(cls, modules: Sequence[nn.Module], options: dict[str, Any]) -> int:
        """The parameters among the modules' member tensors (:meth:`member_tensor_names`)."""
        return sum(m._parameters[n].numel() for m in modules for n in cls.member_tensor_names(m)
                   if m._parameters.get(n) is not None)

    def _stack(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().unsqueeze(0).repeat(self.num_members, *([1] * tensor.dim())).clone()

    # -- members ------------------------------------------------------------------------------------------------
    def late_phase_parameters(self) -> Iterator[nn.Parameter]:
        for name in self.param_names:
            yield getattr(self, name)

    @torch.no_grad()
    def perturb(self, sigma0: float, generator: torch.Generator | None = None) -> None:
        """Eq. 2: φ_k = φ0 + σ0 · ‖φ0‖/√D · ε_k with ε_k ~ N(0, I), φ0 all member parameters of this layer (D
        entries)."""
        phi0 = torch.cat([getattr(self, n)[0].reshape(-1).float() for n in self.param_names])
        scale = sigma0 * phi0.norm() / phi0.numel() ** 0.5
        for name in self.param_names:
            stacked = getattr(self, name)
            noise = torch.randn(stacked.shape, generator=generator, dtype=torch.float32)
            stacked.add_((scale * noise).to(stacked))

    def member_state_names(self) -> list[str]:
        """Every member tensor: the stacked parameters and buffers (running statistics included)."""
        return self.param_names + self.buffer_names

    def member_tensors(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's tensors under the original names (views of row k)."""
        return {n: getattr(self, n)[k] for n in self.param_names + self.buffer_names}

    def mean_tensors(self) -> dict[str, torch.Tensor]:
        """Eq. 1: φ̄ = mean_k φ_k (and the mean of the members' buffers), exact for identical members."""
        out = {}
        for name in self.param_names + self.buffer_names:
            stacked = getattr(self, name)
            if stacked.is_floating_point():
                out[name] = member_mean(stacked)
            else:  # integer counters such as num_batches_tracked
                out[name] = stacked.max(0).values
        return out

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slices = self.selection.split(x)
        rows = {n: self.member_rows(getattr(self, n)) for n in self.param_names + self.buffer_names}
        shared = {n: getattr(self, n) for n in self.shared_names}
        self.template.training = self.training
        outs = [
            functional_call(self.template, {**shared, **{n: r[g] for n, r in rows.items()}}, (x_g,))
            for g, x_g in enumerate(slices)
        ]
        if torch.compiler.is_compiling() and self.training and self.buffer_names:
            # running statistics were updated in gathered copies: write them back
            with torch.no_grad():
                index = self.selection.index_on(x.device)
                for name in self.buffer_names:
                    getattr(self, name).index_copy_(0, index, torch.stack(rows[name]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # -- back to the original type ------------------------------------------------------------------------------
    def to_original(self, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """A module of the original class holding `tensors` (the member tensors, original names and shapes), copies
        of the shared tensors and this layer's children."""
        module = _hollow_copy(self.template, [], dict(self.named_children()))
        shared = {n: getattr(self, n) for n in self.shared_names}
        for name, tensor in {**shared, **tensors}.items():
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(tensor.detach().clone(), requires_grad=self._requires_grad[name])
            else:
                module._buffers[name] = tensor.detach().clone()
        module.train(self.training)
        return module

    def collapse(self, **options) -> nn.Module:
        return self.to_original(self.mean_tensors())

    def unload(self, k: int) -> nn.Module:
        return self.to_original(self.member_tensors(k))


@torch.no_grad()
def perturb_factors(factors: Sequence[nn.Parameter], sigma0: float, generator: torch.Generator | None) -> None:
    """Eq. 2 with φ0 = 1 (so ‖φ0‖/√D = 1): u_k, v_k = 1 + σ0 ε_k."""
    for stacked in factors:
        noise = torch.randn(stacked.shape, generator=generator, dtype=torch.float32)
        stacked.add_((sigma0 * noise).to(stacked))


def mean_outer(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """mean_k u_k v_kᵀ of (K, out) and (K, in) factors, summed in float64: products of float32 factors and their sums
    over up to 32 members are exact there, so identical members give back u vᵀ bit for bit."""
    return (torch.einsum("ko,ki->oi", u.double(), v.double()) / u.shape[0]).to(u.dtype)
