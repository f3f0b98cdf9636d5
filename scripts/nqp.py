"""Noisy quadratic problem (NQP) of von Oswald et al., ICLR 2021, §3.1 / Fig. 1: late-phase weights vs. ensembles.

Problem: L(w) = ½ (w − w* + ε)ᵀ H (w − w* + ε), H = diag(1/i), i = 1..n, ε ~ N(0, Σ) with Σ = H⁻¹, one noise sample
per gradient step (batch size 1), plain gradient descent with learning rate η.

* Ensemble: K models trained independently (own noise), averaged in weight space, w̄ = mean_k w_k.
* Late-phase weights (Algorithm 1 with T0 = 0): w_k = φ_k θ with θ ∈ Rⁿ shared and a scalar φ_k per member. Per step,
  for every member k: g_k = H(φ_k θ − w* + ε_k); φ_k ← φ_k − η θᵀg_k; and θ ← θ − η γθ Σ_k φ_k g_k afterwards, with
  γθ = 1/K (``--theta-scale mean``, default) or 1 (``sum``); all gradients at the same (θ, φ_k). w̄ = θ · mean_k φ_k.

Reported loss: the excess expected loss of the averaged model, E_ε[L(w̄)] − ½ tr(HΣ) = ½ (w̄ − w*)ᵀ H (w̄ − w*),
averaged over a window at the end of the run (the constant ½ tr(HΣ) = n/2 would hide the 1/K law). For the ensemble its
steady state is known exactly: Σ_i η h_i / (2 (2 − η h_i)) / K, which the tables show next to the simulation.

Closed-form steady state of the late-phase model (derivation in zoo/results/nqp.md): the noise balances the quantity
Q = Σ_k φ_k² − |θ|²/γθ that gradient flow keeps, which puts c = mean_k φ_k at c⁴ = w*ᵀHw*/(γθ tr H) (η → 0;
``scale_theory`` also gives its O(η) terms) and the excess loss at (η/4) √(γθ w*ᵀHw* tr H) (1 + 1/K)
(``late_phase_theory``), ∝ (1 + 1/K)/√K for γθ = 1/K. A run tracks mean_k φ_k and mean_k φ_k² averaged over every
window and compares them and the loss with these predictions (``predictions``) in the report and the figure.

Start: w* has norm ``--wstar-norm`` (default 1) in a random direction, w0 = w* + a random unit vector, θ = w0, φ_k = 1,
and every ensemble member starts at w0. With w* = 0 the optimum would be the degenerate point φθ = 0 of the late-phase
model, where the φ_k collapse to 0 (see the notes the report writes).

Everything (learning rates, seeds, K values, members) is one batched float64 torch computation; the Gaussian noise is
drawn in float32 (twice as fast on CPU) and promoted. Run ``python scripts/nqp.py --help``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_KS = (1, 2, 5, 10, 15, 20, 25)
DEFAULT_LRS = (0.05, 0.02, 0.01, 0.005)
EVAL_EVERY = 10  # the loss of the mean model is sampled every EVAL_EVERY steps


@dataclass(frozen=True)
class NQPResult:
    """Excess losses averaged over consecutive windows of ``window`` steps, indexed [window, lr, seed, K]."""

    Ks: tuple[int, ...]
    lrs: tuple[float, ...]
    steps: int
    window: int
    n: int
    wstar_norm: float
    theta_scale: str
    late_phase: np.ndarray
    ensemble: np.ndarray
    phi_mean: np.ndarray  # [window, lr, seed, K]: mean_k φ_k of the late-phase model at the end of each window
    wstar: np.ndarray  # [seed, n]: the optimum w* of each seed
    phi_avg: np.ndarray  # [window, lr, seed, K]: mean_k φ_k averaged over the window (sampled every EVAL_EVERY)
    phi_sq_avg: np.ndarray  # [window, lr, seed, K]: mean_k φ_k², averaged likewise

    def final(self, method: str) -> np.ndarray:
        """Losses of the last window, [lr, seed, K]."""
        return {"late_phase": self.late_phase, "ensemble": self.ensemble}[method][-1]


def ensemble_theory(lr: float, K: int, n: int = 100) -> float:
    """Exact steady-state excess loss of the weight average of K independent GD runs: Σ_i η h_i / (2(2 − η h_i)) / K."""
    h = 1.0 / np.arange(1, n + 1)
    return float(np.sum(lr * h / (2.0 * (2.0 - lr * h))) / K)


def _gamma_theta(K: int, theta_scale: str) -> float:
    if theta_scale not in ("mean", "sum"):
        raise ValueError("theta_scale must be 'mean' (γθ = 1/K) or 'sum' (γθ = 1)")
    return 1.0 / K if theta_scale == "mean" else 1.0


def _spectrum(wstar: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """h = diag H for n = wstar.shape[-1], w*ᵀHw* (one per leading index of ``wstar``) and tr H."""
    wstar = np.asarray(wstar, dtype=np.float64)
    h = 1.0 / np.arange(1, wstar.shape[-1] + 1)
    return h, (h * wstar * wstar).sum(-1), float(h.sum())


def _phi_variance(lr: float, K: int, gK: float, c2: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """mean_k Var φ_k at first order in η: η/(2K) · |θ*|²/(γθ K c² + |θ*|²) for mean_k φ_k (its share of the mean
    model's fluctuation along θ* = w*/c) plus η(1 − 1/K)/2 for the members' differences from their mean."""
    t = m2 / c2
    return lr / (2 * K) * t / (gK * c2 + t) + lr * (1 - 1 / K) / 2


def scale_theory(K: int, wstar: np.ndarray, lr: float = 0.0, theta_scale: str = "mean") -> np.ndarray:
    """Steady-state mean_k φ_k of the late-phase model, set by the noise balance of Q = Σ_k φ_k² − |θ|²/γθ.

    ``lr = 0``: the η → 0 limit c⁴ = w*ᵀHw* / (γθ tr H), i.e. c⁴ = K w*ᵀHw*/tr H for γθ = 1/K. ``lr > 0``: the same
    balance E[Σ_k (θᵀg_k)²] = γθ E[|Σ_k φ_k g_k|²] with its O(η) terms (the Gaussian fluctuations of φ_k and θ in the
    linearised dynamics and the shift of E θ they cause), solved for c = E[mean_k φ_k] by bisection; see nqp.md.
    ``wstar``: [..., n]; returns one value per leading index (0 where w* = 0: no balance point, c decays to 0).
    """
    g = _gamma_theta(K, theta_scale)
    h, a, b = _spectrum(wstar)
    if lr == 0:
        return (a / (g * b)) ** 0.25
    wstar = np.asarray(wstar, dtype=np.float64)
    m2, a2, b2, gK = (wstar * wstar).sum(-1), (h * h * wstar * wstar).sum(-1), float((h * h).sum()), g * K

    def excess(c):  # E[Σ_k (θᵀg_k)²] − γθ E[|Σ_k φ_k g_k|²], divided by K; > 0 below the balance point
        c2 = c * c
        s, t, r = a / c2, m2 / c2, a2 / c2  # θ*ᵀHθ*, |θ*|², |Hθ*|² at θ* = w*/c
        d = gK * c2 + t
        var_phi = _phi_variance(lr, K, gK, c2, m2)
        theta_h = s * (c2 * (1 - lr * g / d) / (c2 + var_phi)) ** 2 + lr * g / 2 * (b - s / d)  # E θᵀHθ
        lhs = theta_h + lr / (2 * K) * (gK * c2 * r + s * s) + lr * (1 - 1 / K) / 2 * s * s
        rhs = g * b * (c2 + var_phi) + g * c2 * lr / 2 * (gK * c2 * b2 + r)
        return lhs - rhs

    lo, hi = np.full_like(a, 1e-3), np.full_like(a, 1e3)
    for _ in range(100):
        mid = np.sqrt(lo * hi)
        below = excess(mid) > 0
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(a > 0, np.sqrt(lo * hi), 0.0)


def phi_moment_theory(K: int, wstar: np.ndarray, lr: float, theta_scale: str = "mean") -> np.ndarray:
    """Predicted E[mean_k φ_k²] at steady state: c² + mean_k Var φ_k, with c from ``scale_theory`` (O(η) terms)."""
    g = _gamma_theta(K, theta_scale)
    c2 = scale_theory(K, wstar, lr, theta_scale) ** 2
    m2 = (np.asarray(wstar, dtype=np.float64) ** 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(m2 > 0, c2 + _phi_variance(lr, K, g * K, c2, m2), 0.0)


def late_phase_theory(lr: float, K: int, wstar: np.ndarray, theta_scale: str = "mean") -> np.ndarray:
    """Leading-order steady-state excess loss of the late-phase mean model: (η/4) √(γθ w*ᵀHw* tr H) (1 + 1/K),
    = (η/4) √(w*ᵀHw* tr H) (1 + 1/K)/√K for γθ = 1/K. ``wstar``: [..., n]; returns one value per leading index."""
    g = _gamma_theta(K, theta_scale)
    _, a, b = _spectrum(wstar)
    return lr / 4 * np.sqrt(g * a * b) * (1 + 1 / K)


def relaxation_steps(lr: float, K: int, wstar: np.ndarray, theta_scale: str = "mean") -> np.ndarray:
    """Steps for the scale c = mean_k φ_k to relax to its balance point (1/rate, linearised; ∝ η⁻²):
    (c⁴ + |w*|²/(γθ K)) / (2 η² w*ᵀHw*). The mean model itself relaxes much faster, in ~1/(η c² min h) steps."""
    g = _gamma_theta(K, theta_scale)
    _, a, _ = _spectrum(wstar)
    m2 = (np.asarray(wstar, dtype=np.float64) ** 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = (scale_theory(K, wstar, 0.0, theta_scale) ** 4 + m2 / (g * K)) / (2 * lr * lr * a)
    return np.where(a > 0, steps, np.inf)


def loglog_slope(Ks: tuple[int, ...] | list[int], losses: np.ndarray) -> np.ndarray:
    """Least-squares slope of log(loss) vs log(K) along the last axis of ``losses``."""
    x = np.log(np.asarray(Ks, dtype=np.float64))
    y = np.log(np.asarray(losses, dtype=np.float64))
    xc = x - x.mean()
    return ((y - y.mean(axis=-1, keepdims=True)) * xc).sum(axis=-1) / (xc * xc).sum()


def simulate(
    Ks: tuple[int, ...] | list[int],
    lrs: tuple[float, ...] | list[float],
    steps: int,
    window: int,
    seeds: int,
    *,
    n: int = 100,
    wstar_norm: float = 1.0,
    theta_scale: str = "mean",
    seed: int = 0,
) -> NQPResult:
    """Run late-phase weights and ensembles for every (lr, seed, K) in one batch.

    Each seed draws w* (norm ``wstar_norm``, random direction) and a start w0 = w* + u with a random unit vector u;
    θ = w0, φ_k = 1 and every ensemble member starts at w0. The ensembles are nested: the ensemble of size K is the
    first K of max(Ks) independent runs. Losses are sampled every ``EVAL_EVERY`` steps and averaged over each of the
    steps / window consecutive windows; the last window is the result, the earlier ones show the approach to it.
    Runs single-threaded: the tensors are small, and extra threads only add synchronisation overhead.
    """
    Ks = tuple(int(k) for k in Ks)
    lrs = tuple(float(lr) for lr in lrs)
    if not Ks or min(Ks) < 1:
        raise ValueError("Ks must be positive integers")
    if not lrs or min(lrs) <= 0:
        raise ValueError("learning rates must be positive")
    if seeds < 1 or n < 1:
        raise ValueError("seeds and n must be at least 1")
    if not wstar_norm >= 0:
        raise ValueError("wstar_norm must be >= 0")
    if window < EVAL_EVERY or steps < 2 * window or steps % window:
        raise ValueError(f"need window >= {EVAL_EVERY} and steps a multiple of window, at least 2 windows")
    if theta_scale not in ("mean", "sum"):
        raise ValueError("theta_scale must be 'mean' (γθ = 1/K) or 'sum' (γθ = 1)")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _simulate(Ks, lrs, steps, window, seeds, n, wstar_norm, theta_scale, seed)
    finally:
        torch.set_num_threads(threads)


def _simulate(
    Ks: tuple[int, ...], lrs: tuple[float, ...], steps: int, window: int, seeds: int, n: int, wstar_norm: float,
    theta_scale: str, seed: int,
) -> NQPResult:
    f64 = torch.float64
    gen = torch.Generator().manual_seed(seed)
    L, S, G, M, K_max = len(lrs), seeds, len(Ks), sum(Ks), max(Ks)
    h = 1.0 / torch.arange(1, n + 1, dtype=f64)
    sqrt_h = h.sqrt()  # Hε with ε ~ N(0, H⁻¹) is sqrt(h) ⊙ z, z ~ N(0, I)
    lr = torch.tensor(lrs, dtype=f64).view(L, 1, 1, 1)

    group = torch.repeat_interleave(torch.arange(G), torch.tensor(Ks))  # late-phase member -> its K group
    member_mean = torch.zeros(G, M, dtype=f64)
    member_mean[group, torch.arange(M)] = 1.0
    member_sum = member_mean.clone()
    member_mean /= torch.tensor(Ks, dtype=f64)[:, None]
    theta_weights = member_mean if theta_scale == "mean" else member_sum
    ens_last = torch.tensor(Ks) - 1
    ens_div = torch.tensor(Ks, dtype=f64)[:, None]

    direction = torch.randn(S, n, generator=gen, dtype=f64)
    wstar = (wstar_norm * direction / direction.norm(dim=-1, keepdim=True)).view(1, S, 1, n)
    u = torch.randn(S, n, generator=gen, dtype=f64)
    w0 = wstar + (u / u.norm(dim=-1, keepdim=True)).view(1, S, 1, n)

    theta = w0.expand(L, S, G, n).clone()
    phi = torch.ones(L, S, M, dtype=f64)
    w_ens = w0.expand(L, S, K_max, n).clone()
    z_lp = torch.empty(L, S, M, n, dtype=torch.float32)
    z_ens = torch.empty(L, S, K_max, n, dtype=torch.float32)
    blocks = steps // window
    sums = torch.zeros(2, blocks, L, S, G, dtype=f64)  # [method, window, lr, seed, K]
    counts = torch.zeros(blocks, dtype=f64)
    phi_mean = torch.zeros(blocks, L, S, G, dtype=f64)
    moments = torch.zeros(2, blocks, L, S, G, dtype=f64)  # window sums of mean_k φ_k and mean_k φ_k²

    for t in range(steps):
        z_lp.normal_(generator=gen)
        z_ens.normal_(generator=gen)
        theta_m = theta.index_select(2, group)
        grad_w = h * (phi[..., None] * theta_m - wstar) + sqrt_h * z_lp
        grad_phi = (grad_w * theta_m).sum(-1)
        grad_theta = theta_weights @ (phi[..., None] * grad_w)
        phi -= lr[..., 0] * grad_phi
        theta -= lr * grad_theta
        w_ens -= lr * (h * (w_ens - wstar) + sqrt_h * z_ens)

        block = t // window
        if t % EVAL_EVERY == 0:
            diff_lp = theta * (phi @ member_mean.T)[..., None] - wstar
            diff_ens = w_ens.cumsum(2).index_select(2, ens_last) / ens_div - wstar
            sums[0, block] += 0.5 * (h * diff_lp * diff_lp).sum(-1)
            sums[1, block] += 0.5 * (h * diff_ens * diff_ens).sum(-1)
            moments[0, block] += phi @ member_mean.T
            moments[1, block] += (phi * phi) @ member_mean.T
            counts[block] += 1
        if (t + 1) % window == 0:
            phi_mean[block] = phi @ member_mean.T

    means = (sums / counts.view(1, blocks, 1, 1, 1)).numpy()
    moments = (moments / counts.view(1, blocks, 1, 1, 1)).numpy()
    return NQPResult(
        Ks=Ks, lrs=lrs, steps=steps, window=window, n=n, wstar_norm=float(wstar_norm), theta_scale=theta_scale,
        late_phase=means[0], ensemble=means[1], phi_mean=phi_mean.numpy(), wstar=wstar.view(S, n).numpy(),
        phi_avg=moments[0], phi_sq_avg=moments[1],
    )


def _window_ends(result: NQPResult) -> np.ndarray:
    return result.window * np.arange(1, result.late_phase.shape[0] + 1)


def predictions(result: NQPResult) -> dict[str, np.ndarray]:
    """The closed-form steady state for every (lr, seed, K) of ``result``, each [lr, seed, K]: ``scale0`` (c, η → 0),
    ``scale1`` (c with its O(η) terms), ``phi_sq`` (E[mean_k φ_k²] with them), ``loss`` (leading-order excess loss)
    and ``relax`` (steps for c to relax)."""
    out = {key: np.zeros((len(result.lrs), result.wstar.shape[0], len(result.Ks)))
           for key in ("scale0", "scale1", "phi_sq", "loss", "relax")}
    for i, lr in enumerate(result.lrs):
        for j, K in enumerate(result.Ks):
            out["scale0"][i, :, j] = scale_theory(K, result.wstar, 0.0, result.theta_scale)
            out["scale1"][i, :, j] = scale_theory(K, result.wstar, lr, result.theta_scale)
            out["phi_sq"][i, :, j] = phi_moment_theory(K, result.wstar, lr, result.theta_scale)
            out["loss"][i, :, j] = late_phase_theory(lr, K, result.wstar, result.theta_scale)
            out["relax"][i, :, j] = relaxation_steps(lr, K, result.wstar, result.theta_scale)
    return out


def plot(result: NQPResult, path: Path) -> None:
    """Top: log-log loss vs K per learning rate, with c/K through the exact K = 1 ensemble loss and the closed-form
    late-phase loss. Middle: how the log-log slopes and the mean late-phase scalar φ (window averages) evolve over the
    run, with its predicted steady state. Bottom: measured vs predicted mean φ and late-phase loss per K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ks, ends, L = np.asarray(result.Ks), _window_ends(result), len(result.lrs)
    theory = predictions(result)
    closed = result.wstar_norm > 0  # w* = 0 has no balance point (c decays to 0) and no closed-form loss
    top = [f"k{i}" for i in range(L) for _ in range(2)]
    fig, axes = plt.subplot_mosaic([top, ["slope"] * L + ["phi"] * L, ["phiK"] * L + ["ratio"] * L],
                                   figsize=(3.7 * max(L, 2), 11), gridspec_kw={"height_ratios": [1.15, 1, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shape = "(1 + 1/K)/√K" if result.theta_scale == "mean" else "(1 + 1/K)"
    for i, lr in enumerate(result.lrs):
        ax = axes[f"k{i}"]
        for method, label, color, marker in (
            ("ensemble", "ensemble", "tab:blue", "s"),
            ("late_phase", "late-phase (w = φ_k θ)", "tab:red", "o"),
        ):
            loss = result.final(method)[i]
            slope = loglog_slope(Ks, loss.mean(0))
            ax.errorbar(Ks, loss.mean(0), yerr=loss.std(0), color=color, marker=marker, ms=4, capsize=2,
                        label=f"{label}, slope {slope:.2f}")
        ax.plot(Ks, ensemble_theory(lr, 1, result.n) / Ks, "k--", lw=1, label="1/K (exact ensemble)")
        if closed:
            predicted = theory["loss"][i].mean(0)
            ax.plot(Ks, predicted, color="tab:red", ls="--", lw=1,
                    label=f"closed form ∝ {shape}, slope {loglog_slope(Ks, predicted):.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"η = {lr:g}, last {result.window} of {result.steps} steps", fontsize=9)
        ax.set_xlabel("K")
        ax.set_xticks(Ks, [str(k) for k in Ks], fontsize=7)
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower left")
    axes["k0"].set_ylabel("excess loss of the mean model")

    ax = axes["slope"]
    for i, lr in enumerate(result.lrs):
        color = colors[i % len(colors)]
        ax.plot(ends, loglog_slope(Ks, result.late_phase[:, i].mean(1)), "o-", color=color,
                label=f"late-phase, η = {lr:g}")
        ax.plot(ends, loglog_slope(Ks, result.ensemble[:, i].mean(1)), "x:", color=color, label=f"ensemble, η = {lr:g}")
    ax.axhline(-1, color="k", lw=1, ls="--")
    if closed:
        ax.axhline(loglog_slope(Ks, theory["loss"][0].mean(0)), color="tab:red", lw=1, ls="--",
                   label=f"closed form ∝ {shape}")
    ax.set_xlabel("step (end of the averaging window)")
    ax.set_ylabel("log-log slope of loss vs K")
    ax.set_title("slopes over the run", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)

    ax = axes["phi"]
    for i, lr in enumerate(result.lrs):
        color = colors[i % len(colors)]
        phi = result.phi_avg[:, i].mean(1)
        ax.plot(ends, phi[:, 0], "o-", color=color, label=f"K = {Ks[0]}, η = {lr:g}")
        ax.plot(ends, phi[:, -1], "s--", color=color, label=f"K = {Ks[-1]}, η = {lr:g}")
        for j in (0, -1):
            ax.axhline(theory["scale1"][i, :, j].mean(), color=color, lw=0.8, ls=":")
    ax.set_xlabel("step (end of the averaging window)")
    ax.set_ylabel("mean_k φ_k, window average (starts at 1)")
    ax.set_title("late-phase scale over the run (dotted: predicted, with O(η) terms)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)

    ax = axes["phiK"]
    ax.plot(Ks, theory["scale0"][0].mean(0), "k--", lw=1,
            label="η → 0: c⁴ = " + ("K " if result.theta_scale == "mean" else "") + "w*ᵀHw*/tr H")
    for i, lr in enumerate(result.lrs):
        color = colors[i % len(colors)]
        phi = result.phi_avg[-1, i]
        ax.errorbar(Ks * (1 + 0.03 * (i - (L - 1) / 2)), phi.mean(0), yerr=phi.std(0), color=color, marker="o", ms=4,
                    ls="none", capsize=2, label=f"measured, η = {lr:g}")
        ax.plot(Ks, theory["scale1"][i].mean(0), color=color, lw=1, ls=":", label=f"with O(η) terms, η = {lr:g}")
    ax.set_xscale("log")
    ax.set_xticks(Ks, [str(k) for k in Ks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("K")
    ax.set_ylabel("mean_k φ_k (last window, seeds' mean ± std)")
    ax.set_title("steady-state scale: measured vs noise balance", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")

    ax = axes["ratio"]
    for i, lr in enumerate(result.lrs * closed):
        ratio = result.final("late_phase")[i] / theory["loss"][i]
        ax.errorbar(Ks * (1 + 0.03 * (i - (L - 1) / 2)), ratio.mean(0), yerr=ratio.std(0),
                    color=colors[i % len(colors)], marker="o", ms=4, capsize=2, label=f"η = {lr:g}")
    ax.axhline(1, color="k", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_xticks(Ks, [str(k) for k in Ks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("K")
    ax.set_ylabel("measured / closed-form loss (per seed)")
    ax.set_title("late-phase loss / (η/4)√(γθ w*ᵀHw* tr H)(1 + 1/K)", fontsize=9)
    ax.grid(True, alpha=0.3)
    if closed:
        ax.legend(fontsize=7, ncol=2)

    gamma = "1/K" if result.theta_scale == "mean" else "1"
    fig.suptitle(f"Noisy quadratic problem (n = {result.n}, |w*| = {result.wstar_norm:g}, γθ = {gamma}): "
                 "late-phase weights vs. ensembles", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _hardware() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} CPU cores available, torch {torch.__version__}, single-threaded"


def _pm(values: np.ndarray) -> str:
    return f"{values.mean():.3e} ± {values.std():.1e}"


_DERIVATION = [
    "## Closed-form steady state of the late-phase model",
    "",
    "Notation: member k's gradient in w is g_k = H(φ_k θ − w* + ε_k), the steps are φ_k ← φ_k − η θᵀg_k and "
    "θ ← θ − η γθ Σ_k φ_k g_k (all at the same θ, φ_k); a = w*ᵀHw*, b = tr H (= 5.19 for n = 100), γθ = 1/K (default) "
    "or 1 (`--theta-scale sum`).",
    "",
    "1. *What gradient flow keeps.* The loss is unchanged by φ_k → αφ_k, θ → θ/α. Correspondingly "
    "Q = Σ_k φ_k² − |θ|²/γθ changes in one step by exactly ΔQ = η² [Σ_k (θᵀg_k)² − γθ |Σ_k φ_k g_k|²]: the "
    "O(η) terms cancel, so gradient flow keeps Q and only the O(η²) terms of the discrete noisy step move it.",
    "2. *Noise balance.* ε_k is independent of the current state, E(θᵀHε_k)² = θᵀHθ and "
    "E|Σ_k φ_k Hε_k|² = b Σ_k φ_k². So E ΔQ = η² [K θᵀHθ − γθ b Σ_k φ_k²] plus terms in w_k − w*, which are O(η) "
    "relative at steady state.",
    "3. *Scale separation.* For small η the members stay within O(√η) of the valley φ_k = c, θ = w*/c and relax to "
    "it in O(1/η) steps, while c moves with Q, in O(1/η²) steps. On the valley E ΔQ = η² K [a/c² − γθ b c²]: "
    "positive below c⁴ = a/(γθ b), negative above, and Q grows with c, so c settles at "
    "**c⁴ = K w*ᵀHw*/tr H for γθ = 1/K** (the constant is exactly 1), and at c⁴ = w*ᵀHw*/tr H, independent of K, "
    "for γθ = 1. Linearised, c relaxes at the rate 2η² a / (c⁴ + |w*|²/(γθ K)) per step (column τ below: "
    "≈ 4·10³ steps at η = 0.05 but ≈ 4·10⁵ at η = 0.005 for |w*| = 1).",
    "4. *Loss.* Around (c, θ* = w*/c) the mean model u = w̄ − w* steps as u ← u − η P H (u + ε̄) with "
    "P = γθ K c² I + θ*θ*ᵀ and ε̄ ~ N(0, H⁻¹/K). To first order in η its stationary covariance S solves "
    "PHS + SHP = η PHP/K, so S = ηP/(2K) and the excess loss is ½ tr(HS) = η (γθ K c² b + a/c²)/(4K). At the "
    "balance point both terms are equal and "
    "**L_LP(K) = (η/4) √(γθ a b) (1 + 1/K)**, i.e. (η/4) √(w*ᵀHw* tr H) (1 + 1/K)/√K for γθ = 1/K "
    "(plain GD, P = I, gives the ensemble's η b/(4K)). The shape (1 + 1/K)/√K has log-log slope −0.693 over "
    "K ∈ {1, 2, 5, 10, 15, 20, 25} (−0.663 over every K = 1…25), independent of η and |w*|; the prefactor is "
    "∝ η |w*|. Had c not depended on K, the same formula would be a 1/K law: the shortfall against 1/K is the "
    "K-dependence of the balance point. Against the ensemble, L_LP/L_ens = c²(1 + 1/K), below 1 while "
    "K a (1 + 1/K)²/b < 1 (up to K ≈ 100 for a typical a/b ≈ 0.01). At K = 1 the balance point is also the c that "
    "minimises the loss, so an error in c barely moves the K = 1 loss.",
    "5. *O(η) terms.* Every φ_k fluctuates with variance ≈ η/2 about c, not small against c² ≈ 0.1 at K = 1, "
    "|w*| = 1, so the η → 0 balance holds only up to O(η/(2c²)). `scale_theory(K, w*, lr)` keeps these terms: it "
    "solves E[Σ_k (θᵀg_k)²] = γθ E|Σ_k φ_k g_k|² with the Gaussian fluctuations of the linearised dynamics "
    "(covariance of u from S, member differences φ_k − mean φ with variance η(1 − 1/K)/2, their split between φ "
    "and θ along Q = const), the terms in w_k − w*, and the shift of E θ that the exact stationarity condition "
    "E[Σ_k φ_k² θ] = E[Σ_k φ_k] w* implies. The loss formula is kept at leading order.",
    "",
    "Assumptions: w* ≠ 0 (at w* = 0, a = 0 and c decays to 0); η small: η·max eig(PH) ≪ 1, η/2 ≪ c² and "
    "n η c²/2 ≪ |w*|² (fluctuations small against the valley's scale); a run much longer than τ.",
]


def write_report(result: NQPResult, path: Path, command: str, wall_s: float) -> None:
    """Markdown: slopes per learning rate, their course over the run, the steady-state check, losses per K and the
    closed-form steady state (derivation and measured vs predicted)."""
    Ks, S, ends = result.Ks, result.late_phase.shape[2], _window_ends(result)
    methods = (("late_phase", "late-phase"), ("ensemble", "ensemble"))
    theory = predictions(result)
    lines = [
        "# Noisy quadratic problem: late-phase weights vs. ensembles (Fig. 1 of von Oswald et al., ICLR 2021)",
        "",
        f"`{command}` — wall time {wall_s:.0f} s on {_hardware()}. Figure: `nqp.png`.",
        "",
        f"Setup: L(w) = ½(w − w* + ε)ᵀH(w − w* + ε), H = diag(1/i), n = {result.n}, ε ~ N(0, H⁻¹), batch size 1, "
        f"plain GD. |w*| = {result.wstar_norm:g} (random direction per seed), start w0 at distance 1 from w* (random "
        f"direction), θ = w0, φ_k = 1, every ensemble member at w0. Late-phase model w_k = φ_k θ with scalar φ_k, "
        f"γθ = {'1/K' if result.theta_scale == 'mean' else '1'}. {S} seeds, {result.steps} steps. Loss: the excess "
        f"loss ½(w̄ − w*)ᵀH(w̄ − w*) of the averaged model (E_ε L(w̄) minus the constant n/2), sampled every "
        f"{EVAL_EVERY} steps and averaged over windows of {result.window} steps; the last window is reported. "
        f"Ensembles of different K are nested (the first K of {max(Ks)} independent runs).",
        "",
        "## Log-log slopes of loss vs K (last window)",
        "",
        "Slope of the seed-averaged losses; in brackets mean ± std of the per-seed slopes.",
        "",
        "| η | late-phase | late-phase, closed form | ensemble |",
        "|---|---|---|---|",
    ]
    for i, lr in enumerate(result.lrs):
        cells = []
        for method, _ in methods:
            loss = result.final(method)[i]
            per_seed = loglog_slope(Ks, loss)
            cells.append(f"{loglog_slope(Ks, loss.mean(0)):.2f} ({per_seed.mean():.2f} ± {per_seed.std():.2f})")
        predicted = f"{loglog_slope(Ks, theory['loss'][i].mean(0)):.3f}" if result.wstar_norm > 0 else "–"
        lines.append(f"| {lr:g} | {cells[0]} | {predicted} | {cells[1]} |")

    header = "| η | " + " | ".join(f"{e / 1000:g}k" for e in ends) + " |"
    rule = "|---" * (len(ends) + 1) + "|"
    lines += ["", "## Slopes over the run", "", "Log-log slope of the seed-averaged losses in each window "
              "(column: step at the window's end).", ""]
    for method, name in methods:
        lines += [f"{name}:", "", header, rule]
        for i, lr in enumerate(result.lrs):
            slopes = loglog_slope(Ks, getattr(result, method)[:, i].mean(1))
            lines.append(f"| {lr:g} | " + " | ".join(f"{s:.2f}" for s in slopes) + " |")
        lines.append("")
    lines += [f"mean_k φ_k of the late-phase model averaged over each window (seed mean), K = {Ks[0]} / K = {Ks[-1]}:",
              "", header, rule]
    for i, lr in enumerate(result.lrs):
        phi = result.phi_avg[:, i].mean(1)
        lines.append(f"| {lr:g} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(phi[:, 0], phi[:, -1])) + " |")

    lines += [
        "",
        "## Steady-state check",
        "",
        "Relative change (B − A)/A of the seed-averaged loss per K between the window before the last (A) and the "
        "last window (B), as its mean over K and the one of largest magnitude.",
        "",
        "| η | method | mean change | largest change |",
        "|---|---|---|---|",
    ]
    for i, lr in enumerate(result.lrs):
        for method, name in methods:
            a, b = (getattr(result, method)[w, i].mean(0) for w in (-2, -1))
            change = (b - a) / a
            lines.append(f"| {lr:g} | {name} | {change.mean():+.1%} | {change[np.argmax(np.abs(change))]:+.1%} |")

    for i, lr in enumerate(result.lrs):
        lines += [
            "",
            f"## η = {lr:g}: loss in the last window (mean ± std over seeds)",
            "",
            "| K | late-phase | ensemble | ensemble, exact |",
            "|---|---|---|---|",
        ]
        for j, K in enumerate(Ks):
            lines.append(f"| {K} | {_pm(result.final('late_phase')[i, :, j])} | "
                         f"{_pm(result.final('ensemble')[i, :, j])} | {ensemble_theory(lr, K, result.n):.3e} |")
    lines += ["", *_DERIVATION, ""]
    gamma = "1/K" if result.theta_scale == "mean" else "1"
    lines += [
        f"### Measured vs predicted (this run, γθ = {gamma})",
        "",
        "Seed means. c₀: the η → 0 balance point; c₁: with its O(η) terms; φ̄: mean_k φ_k averaged over the last "
        "window; φ²: mean_k φ_k² averaged over the last window, predicted c₁² + mean_k Var φ_k (the fluctuations "
        "are ≈ η/2 of it); the ratios (measured / predicted) are mean ± std over seeds. τ: relaxation steps of c; "
        "where τ is not well below the run length, the run has not reached the steady state the formulas describe.",
    ]
    if result.wstar_norm == 0:
        lines += ["", "Not applicable to this run: with w* = 0 there is no balance point (a = 0), c decays to 0."]
    for i, lr in enumerate(result.lrs * (result.wstar_norm > 0)):
        lines += [
            "",
            f"η = {lr:g}:",
            "",
            "| K | c₀ | c₁ | φ̄ | φ̄/c₁ | φ², predicted | φ², measured | loss, closed form | loss, measured | loss ratio "
            "| τ (steps) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for j, K in enumerate(Ks):
            phi = result.phi_avg[-1, i, :, j]
            loss = result.final("late_phase")[i, :, j]
            phi_ratio, loss_ratio = phi / theory["scale1"][i, :, j], loss / theory["loss"][i, :, j]
            lines.append(
                f"| {K} | {theory['scale0'][i, :, j].mean():.3f} | {theory['scale1'][i, :, j].mean():.3f} | "
                f"{phi.mean():.3f} | {phi_ratio.mean():.2f} ± {phi_ratio.std():.2f} | "
                f"{theory['phi_sq'][i, :, j].mean():.3f} | {result.phi_sq_avg[-1, i, :, j].mean():.3f} | "
                f"{theory['loss'][i, :, j].mean():.3e} | {loss.mean():.3e} | "
                f"{loss_ratio.mean():.2f} ± {loss_ratio.std():.2f} | {theory['relax'][i, :, j].mean():.2g} |")
    lines += [
        "",
        "## Notes",
        "",
        "* Linearised around the valley φ_k = c, θ* = w*/c, Algorithm 1 moves the mean model as "
        "w̄ ← w̄ − η (γθ K c² I + θ*θ*ᵀ) H (w̄ − w* + ε̄), with ε̄ the mean of the K members' noises: an exact 1/K law "
        "for fixed c. The deviation from 1/K comes from the noise-driven scale c = mean_k φ_k, which settles at a "
        "K-dependent balance point (previous section) and sets the effective step size γθ K c² η along most directions.",
        "* With `--wstar-norm 0` the optimum w* = 0 is the degenerate point φθ = 0 of the late-phase model, where φ has "
        "no restoring force: the φ_k decay towards 0 and the late-phase loss falls far below the ensemble's.",
        "* The first window holds the transient from w0; compare the last two windows (steady-state check) before "
        "reading the slopes.",
        "* The verdict on the closed form, with longer runs and other settings: `nqp_closed_form.md`.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=200_000, help="GD steps per run (default 200000)")
    parser.add_argument("--window", type=int, default=20_000,
                        help="averaging window (steps must be a multiple); the last one is reported (default 20000)")
    parser.add_argument("--seeds", type=int, default=3, help="independent problem instances and noise (default 3)")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="learning rates η")
    parser.add_argument("--Ks", type=int, nargs="+", default=list(DEFAULT_KS), help="ensemble sizes K")
    parser.add_argument("--wstar-norm", type=float, default=1.0,
                        help="|w*| (default 1; 0 puts the optimum on the degenerate point φθ = 0 of w = φθ)")
    parser.add_argument("--theta-scale", choices=("mean", "sum"), default="mean", help="γθ = 1/K (mean) or 1 (sum)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for nqp.png and nqp.md (default zoo/results; --quick writes only when given)")
    parser.add_argument("--quick", action="store_true", help="small smoke-test configuration (seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.window, args.seeds, args.lrs, args.Ks = 10_000, 2_500, 2, [0.05, 0.01], [1, 5, 25]
    out = args.out if args.out is not None or args.quick else Path("zoo/results")

    start = time.perf_counter()
    try:
        result = simulate(args.Ks, args.lrs, args.steps, args.window, args.seeds, wstar_norm=args.wstar_norm,
                          theta_scale=args.theta_scale, seed=args.seed)
    except ValueError as err:
        parser.error(str(err))
    wall_s = time.perf_counter() - start

    for i, lr in enumerate(result.lrs):
        lp, ens = (loglog_slope(result.Ks, result.final(m)[i].mean(0)) for m in ("late_phase", "ensemble"))
        print(f"lr {lr:g}: slope late-phase {lp:.3f}, ensemble {ens:.3f}")
    print(f"wall time {wall_s:.1f} s ({_hardware()})")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        command = "python scripts/nqp.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
        plot(result, out / "nqp.png")
        write_report(result, out / "nqp.md", command.rstrip(), wall_s)
        print(f"wrote {out / 'nqp.png'} and {out / 'nqp.md'}")


if __name__ == "__main__":
    main()
