"""Algorithm 1 of the paper, exactly, for any training loop (no I/O).

One iteration trains every member once::

    for k in members:                                  # sequential, or G members per forward (vectorized)
        Δθ_k = ∇θ L(M_k, θ, φ_k)                       # accumulated in θ.grad, θ unchanged
        φ_k ← U_φ(φ_k, ∇φ_k L(M_k, θ, φ_k))            # LatePhaseEngine.step_member: member k moves at once
    θ ← U_θ(θ, γθ Σ_k Δθ_k)                            # LatePhaseEngine.step_theta

U_φ and U_θ are ordinary torch optimizers. Each member has its own U_φ instance over views of its row of the stacked
(K, …) parameters, so optimizer state is per member and a member that is not trained in a step does not move at all
(no momentum coasting, no weight decay).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lpconvert.convert.members import late_phase_layers, num_members, select_members, unwrap
from lpconvert.errors import LatePhaseError
from lpconvert.layers import LatePhaseLayer

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
EXECUTION_MODES = ("sequential", "vectorized")


def shared_batch_norms(model: nn.Module) -> list[str]:
    """BatchNorm layers that are NOT late-phase: in training they mix the statistics of stacked members."""
    late = {id(m) for layer in late_phase_layers(model).values() for m in layer.modules()}
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, LatePhaseLayer) and id(m) not in late
    ]


def time_major_modules(model: nn.Module) -> dict[str, str]:
    """The layers that read (time, batch) inputs (``batch_first=False``: RNN / LSTM / GRU, attention), late-phase ones
    included: qualified name → the original layer's type."""
    originals = {name: getattr(m, "template", m) if isinstance(m, LatePhaseLayer) else m
                 for name, m in model.named_modules() if name}
    return {name: type(m).__name__ for name, m in originals.items() if getattr(m, "batch_first", True) is False}


def why_not_vectorized(model: nn.Module) -> str | None:
    """Why vectorized mode would not compute what sequential mode computes on `model` (one line), or None.

    Vectorized mode stacks the members' minibatches along dim 0 and each late-phase layer runs member g on slice g:
    exact when every layer reads the batch along dim 0 and keeps examples apart. Refused: BatchNorm layers that stay
    shared (they would mix the members' batch statistics) and layers that read (time, batch) inputs (dim 0 is time:
    the members' sequences would run on one after another)."""
    if shared := shared_batch_norms(model):
        return (f"vectorized mode would mix the members' batch statistics in {len(shared)} shared BatchNorm layer(s) "
                f"(e.g. {shared[0]}); convert them too (targets include 'batchnorm') or use mode='sequential'")
    if time_major := time_major_modules(model):
        name, module_type = next(iter(time_major.items()))
        return (f"vectorized mode stacks the members' minibatches along dim 0, but {name} ({module_type}) reads "
                "(time, batch) inputs (batch_first=False); use mode='sequential', or a batch-first model")
    return None


class LatePhaseEngine:
    """Runs Algorithm 1 on a model converted by :func:`lpconvert.convert`.

    Args:
        model: the converted model (optionally wrapped in DistributedDataParallel).
        theta_optimizer: U_θ, a factory ``params -> Optimizer`` for the shared weights θ,
            e.g. ``functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9, nesterov=True)``.
        member_optimizer: U_φ, a factory called once per member with that member's parameters
            (defaults to `theta_optimizer`; give it its own weight decay, e.g. the paper's 5e-4·K).
        gamma_theta: γθ scaling Σ_k Δθ_k (default 1/K, the usual step size; the paper's CIFAR runs use 1).
        mode: ``"sequential"`` (one member per forward, lowest memory) or ``"vectorized"`` (G members' minibatches
            stacked along dim 0 in one forward, each late-phase layer running member g on slice g). Both give the
            same result; a model for which they would not is refused (:func:`why_not_vectorized`).
        group_size: G in vectorized mode (default K).
        loss_fn: ``loss_fn(logits, targets)``, a mean over the minibatch.
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype (bf16/fp16).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16.
        clip_grad: clip the gradient norm of each member's step (∇φ_k L) and of θ's step (γθ Σ_k Δθ_k) to this.

    >>> engine = LatePhaseEngine(model, partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    >>> losses = engine.step([x_1, …, x_K], [y_1, …, y_K])   # one iteration: K minibatches, K member steps, one θ step
    """

    def __init__(
        self,
        model: nn.Module,
        theta_optimizer: OptimizerFactory,
        member_optimizer: OptimizerFactory | None = None,
        *,
        gamma_theta: float | None = None,
        mode: str = "sequential",
        group_size: int | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        autocast_dtype: torch.dtype | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        clip_grad: float | None = None,
    ) -> None:
        self.model = model
        self.base = unwrap(model)
        layers = late_phase_layers(self.base)
        if not layers:
            raise LatePhaseError("the engine needs a converted model; run lpconvert.convert(model, K=...) first")
        self.num_members = num_members(self.base)
        if mode not in EXECUTION_MODES:
            raise LatePhaseError(f"unknown execution mode {mode!r}; choose from {', '.join(EXECUTION_MODES)}")
        if mode == "vectorized" and (reason := why_not_vectorized(self.base)):
            raise LatePhaseError(reason)
        self.mode = mode
        self.group_size = min(group_size or self.num_members, self.num_members)
        if self.group_size < 1:
            raise LatePhaseError(f"group_size must be >= 1, got {group_size}")
        self.gamma_theta = 1.0 / self.num_members if gamma_theta is None else float(gamma_theta)
        self.next_member = 0  # round-robin position: the member that the next minibatch trains by default
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype
        self.grad_scaler = grad_scaler
        self.clip_grad = clip_grad

        # a parameter shared by several layers (a kind's group state) is one parameter: one view, one step
        stacked = {id(p): (p, layer.member_weight_decay) for layer in layers.values()
                   for p in layer.late_phase_parameters()}
        stacked_ids = set(stacked)
        self.stacked = [p for p, _ in stacked.values() if p.requires_grad]
        no_decay = {id(p) for p, decay in stacked.values() if not decay}
        self.theta_params = [p for p in self.base.parameters() if p.requires_grad and id(p) not in stacked_ids]
        self.theta_optimizer = theta_optimizer(self.theta_params) if self.theta_params else None
        # member k's parameters are leaf views of row k of the stacked parameters: in-place optimizer updates on
        # them update the model, and each member gets an optimizer (and optimizer state) of its own
        self.member_params = [[nn.Parameter(p.data[k]) for p in self.stacked] for k in range(self.num_members)]
        factory = member_optimizer or theta_optimizer
        self.member_optimizers = [factory(_decay_groups(params, self.stacked, no_decay)) for params in self.member_params]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """U_θ followed by the K member optimizers (for learning-rate schedulers)."""
        return ([self.theta_optimizer] if self.theta_optimizer else []) + self.member_optimizers

    # -- Algorithm 1 ----------------------------------------------------------------------------------------------
    def step(
        self,
        inputs: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        members: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One iteration of Algorithm 1: minibatch ``inputs[i], targets[i]`` trains member ``members[i]``, then θ
        steps once on γθ times the sum of the minibatches' θ-gradients. Returns the losses (detached, no host sync).

        By default the minibatches train the members in round-robin order, continuing where the previous call
        stopped: K minibatches train every member once, and a partial round (fewer than K minibatches, e.g. the end
        of an epoch) trains the next ones, so over many rounds every member gets its share. θ's step after a partial
        round sums only the gradients of the minibatches it had (γθ unchanged). Minibatches may differ in size."""
        if len(inputs) != len(targets):
            raise LatePhaseError(f"got {len(inputs)} inputs but {len(targets)} targets; give one target per input")
        if members is None:
            members = [(self.next_member + i) % self.num_members for i in range(len(inputs))]
            self.next_member = (self.next_member + len(inputs)) % self.num_members
        members = list(members)
        if len(inputs) != len(members):
            raise LatePhaseError(
                f"one minibatch per trained member: got {len(inputs)} minibatches for members {members}"
            )
        self._check_views()
        self.zero_grad()
        losses = []
        groups = self.groups(members)
        for g, group in enumerate(groups):
            x = torch.cat([inputs[i] for i in group]) if len(group) > 1 else inputs[group[0]]
            y = torch.cat([targets[i] for i in group]) if len(group) > 1 else targets[group[0]]
            sizes = [inputs[i].shape[0] for i in group]
            losses.append(self.forward_backward([members[i] for i in group], x, y, sizes, sync=g == len(groups) - 1))
            for i in group:
                self.step_member(members[i], clear=members[i] in members[i + 1 :])
        self.step_theta()
        return torch.cat(losses)

    def groups(self, members: Sequence[int]) -> list[tuple[int, ...]]:
        """Positions in `members` run together in one forward pass: singletons (sequential), or up to G positions
        of distinct members (vectorized)."""
        size = 1 if self.mode == "sequential" else self.group_size
        groups: list[list[int]] = []
        for i, k in enumerate(members):
            if not groups or len(groups[-1]) == size or k in (members[j] for j in groups[-1]):
                groups.append([])
            groups[-1].append(i)
        return [tuple(group) for group in groups]

    def forward_backward(self, group: Sequence[int], x: torch.Tensor, y: torch.Tensor,
                         sizes: Sequence[int] | None = None, sync: bool = True) -> torch.Tensor:
        """Forward the members of `group` on their stacked minibatches (``sizes`` rows each, default equal) and
        back-propagate Σ_g L(M_g, θ, φ_g).

        θ's gradient accumulates; under DDP it is all-reduced only when `sync` (the last group of an iteration)
        while the members' gradients, needed at once, are all-reduced here every time."""
        sizes = list(sizes) if sizes is not None else [x.shape[0] // len(group)] * len(group)
        select_members(self.base, group, sizes)
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        context = self.model.no_sync() if ddp and not sync else contextlib.nullcontext()
        with context:
            with self._autocast(x):
                logits = self.model(x)
                member_losses = torch.stack([self.loss_fn(out, target) for out, target in
                                             zip(_member_rows(logits, sizes), _member_rows(y, sizes))])
            loss = member_losses.sum()
            (self.grad_scaler.scale(loss) if self.grad_scaler else loss).backward()
        if ddp and not sync:
            self._all_reduce_member_grads()
        return member_losses.detach().float()

    def step_member(self, k: int, clear: bool = False) -> None:
        """U_φ for member k alone: φ_k ← U_φ(φ_k, ∇φ_k L), with member k's own optimizer state.

        `clear` zeroes member k's gradient afterwards, for a member trained again in the same iteration."""
        for view, stacked in zip(self.member_params[k], self.stacked):
            view.grad = None if stacked.grad is None else stacked.grad[k]
        self._clip(self.member_params[k])
        if self.grad_scaler:
            self.grad_scaler.step(self.member_optimizers[k])
        else:
            self.member_optimizers[k].step()
        if clear:
            for view in self.member_params[k]:
                if view.grad is not None:
                    view.grad.zero_()

    def step_theta(self) -> None:
        """U_θ on γθ · Σ_k Δθ_k, the gradients accumulated over the iteration's members."""
        if self.theta_optimizer is not None:
            if self.gamma_theta != 1.0:
                grads = [p.grad for p in self.theta_params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, self.gamma_theta)
            self._clip(self.theta_params)
            if self.grad_scaler:
                self.grad_scaler.step(self.theta_optimizer)
            else:
                self.theta_optimizer.step()
        if self.grad_scaler:
            self.grad_scaler.update()

    def zero_grad(self) -> None:
        for p in self.theta_params + self.stacked:
            p.grad = None

    # -- internals --------------------------------------------------------------------------------------------------
    def _clip(self, params: Sequence[nn.Parameter]) -> None:
        """Gradient-norm clipping of one step (gradients still scaled by the grad scaler are clipped at the scaled
        norm, the same as unscaling, clipping and scaling again)."""
        if self.clip_grad is not None:
            scale = self.grad_scaler.get_scale() if self.grad_scaler else 1.0
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.clip_grad * scale)

    def _autocast(self, x: torch.Tensor):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)

    def _check_views(self) -> None:
        for stacked, view in zip(self.stacked, self.member_params[0]):
            if view.data_ptr() != stacked.data_ptr():
                raise LatePhaseError(
                    "the model's parameters were re-allocated after the engine was built (e.g. model.to(device)); "
                    "move the model first, then build the LatePhaseEngine"
                )

    def _all_reduce_member_grads(self) -> None:
        import torch.distributed as dist

        grads = [p.grad for p in self.stacked if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)

    # -- checkpointing ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Optimizer states of U_θ and of every member (and the grad scaler)."""
        return {
            "theta_optimizer": self.theta_optimizer.state_dict() if self.theta_optimizer else None,
            "member_optimizers": [opt.state_dict() for opt in self.member_optimizers],
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else None,
            "next_member": self.next_member,
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["member_optimizers"]) != self.num_members:
            raise LatePhaseError(
                f"the optimizer state holds {len(state['member_optimizers'])} members but the model has "
                f"{self.num_members}; resume with the same K"
            )
        if self.theta_optimizer and state["theta_optimizer"] is not None:
            self.theta_optimizer.load_state_dict(state["theta_optimizer"])
        for opt, opt_state in zip(self.member_optimizers, state["member_optimizers"]):
            opt.load_state_dict(opt_state)
        if self.grad_scaler and state.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.next_member = int(state.get("next_member", 0))


def _decay_groups(views: list[nn.Parameter], stacked: list[nn.Parameter], no_decay: set[int]) -> list:
    """A member's parameters for its optimizer: one group, or two when a kind turns weight decay off for its late-phase
    weights (hypernetwork embeddings, as the paper does)."""
    if not no_decay:
        return views
    groups = [{"params": [v for v, p in zip(views, stacked) if id(p) not in no_decay]},
              {"params": [v for v, p in zip(views, stacked) if id(p) in no_decay], "weight_decay": 0.0,
               "no_weight_decay": True}]
    return [group for group in groups if group["params"]]


def _member_rows(t: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Member g's rows of an output or target: ``sizes[g]`` rows each, or as many times that as the tensor has rows
    per input example (a sequence model's (batch·time, classes) logits)."""
    if len(sizes) == 1:
        return (t,)
    per_example, rest = divmod(t.shape[0], sum(sizes))
    if rest:
        raise LatePhaseError(f"cannot tell the members' rows apart in an output of {t.shape[0]} rows for "
                             f"{sum(sizes)} inputs; use mode='sequential'")
    return t.split([size * per_example for size in sizes])


def iterate_members(batches: Iterable, K: int) -> Iterable[tuple[list, list]]:
    """Group a stream of ``(x, y)`` minibatches into iterations of K: the minibatches M_1..M_K of Algorithm 1.

    A last incomplete iteration is yielded with fewer minibatches; :meth:`LatePhaseEngine.step` trains the next
    members with them (round robin), so ``for xs, ys in iterate_members(loader, K): engine.step(xs, ys)`` works for
    any loader."""
    xs, ys = [], []
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        if len(xs) == K:
            yield xs, ys
            xs, ys = [], []
    if xs:
        yield xs, ys
