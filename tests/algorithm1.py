"""Algorithm 1 of the paper written plainly, as the reference the engine is tested against (no lpconvert inside)."""

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def reference_algorithm1(members: list[nn.Module], batches, theta_factory: Callable,
                         phi_optimizer: Callable[[nn.Module], torch.optim.Optimizer], gamma: float,
                         is_late: Callable[[str], bool]):
    """K model copies, one per member, each starting from its own late-phase weights (the parameters `is_late`
    names); θ, all other parameters, is kept apart and copied into copy k before its minibatch. Copy k's late-phase
    weights step at once with `phi_optimizer(copy)`; θ accumulates Δθ_k over the iteration and steps once on γθ Σ_k.
    The same copy listed several times is one member trained several times. Returns θ and the copies."""
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in members[0].named_parameters() if not is_late(n)}
    theta_opt = theta_factory(list(theta.values()))
    optimizers = {id(m): phi_optimizer(m) for m in members}
    for xs, ys in batches:
        accumulated = {n: torch.zeros_like(p) for n, p in theta.items()}
        for k, m in enumerate(members):
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if n in theta:
                        p.copy_(theta[n])
            m.zero_grad()
            F.cross_entropy(m(xs[k]), ys[k]).backward()
            for n, p in m.named_parameters():
                if n in theta:
                    accumulated[n] += p.grad  # Δθ_k, θ not changed yet
            optimizers[id(m)].step()  # φ_k updated immediately
        for n, p in theta.items():
            p.grad = gamma * accumulated[n]
        theta_opt.step()
    return theta, members
