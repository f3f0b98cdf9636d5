
import numpy as np
import pytest
import torch
from script_module import load_script

nqp = load_script("nqp")

KS = (1, 4, 16)


@pytest.fixture(scope="module")
def tiny():
    return nqp.simulate(KS, [0.05], steps=6000, window=2000, seeds=2, seed=1)


def test_ensemble_follows_one_over_k(tiny):
    ensemble = tiny.final("ensemble")[0]
    assert nqp.loglog_slope(KS, ensemble.mean(0)) == pytest.approx(-1.0, abs=0.15)
    exact = np.array([nqp.ensemble_theory(0.05, K) for K in KS])
    assert np.allclose(ensemble.mean(0), exact, rtol=0.2)


def test_late_phase_loss_falls_with_k(tiny):
    late_phase = tiny.final("late_phase")[0]
    assert nqp.loglog_slope(KS, late_phase.mean(0)) < -0.4


def test_k1_losses_are_sensible(tiny):
    # K = 1 late-phase is GD on the product φθ, not on w: same problem and noise, but the noise shrinks φ and with it
    # the effective step size along θ, so its loss ends below plain GD's (which matches the exact value).
    late_phase, ensemble = tiny.final("late_phase")[0, :, 0], tiny.final("ensemble")[0, :, 0]
    assert np.all(np.isfinite(late_phase)) and np.all(late_phase > 0)
    assert ensemble.mean() == pytest.approx(nqp.ensemble_theory(0.05, 1), rel=0.15)
    assert ensemble.mean() / 20 < late_phase.mean() < ensemble.mean()
    assert np.all(tiny.phi_mean[-1, 0, :, 0] < 1)


def test_simulation_is_reproducible(tiny):
    again = nqp.simulate(KS, [0.05], steps=6000, window=2000, seeds=2, seed=1)
    assert np.array_equal(again.late_phase, tiny.late_phase)
    assert np.array_equal(again.ensemble, tiny.ensemble)


def test_helpers_by_hand():
    # n = 2, h = (1, 1/2), η = 0.1: 0.1 / (2 · 1.9) + 0.05 / (2 · 1.95)
    assert nqp.ensemble_theory(0.1, 1, n=2) == pytest.approx(0.0263158 + 0.0128205, abs=1e-7)
    assert nqp.ensemble_theory(0.1, 4, n=2) == pytest.approx((0.0263158 + 0.0128205) / 4, abs=1e-7)
    assert nqp.loglog_slope([1, 2, 8], 3.0 * np.array([1, 2, 8]) ** -0.7) == pytest.approx(-0.7)


@pytest.mark.parametrize(
    "kwargs",
    [{"steps": 1000, "window": 300}, {"steps": 1000, "window": 1000}, {"Ks": [0]}, {"lrs": [-0.1]},
     {"theta_scale": "max"}],
)
def test_simulate_rejects_bad_arguments(kwargs):
    args = {"Ks": [1, 2], "lrs": [0.05], "steps": 1000, "window": 500, "seeds": 1} | kwargs
    with pytest.raises(ValueError):
        nqp.simulate(**args)


def test_cli_writes_figure_and_table(tmp_path):
    nqp.main(["--steps", "2000", "--window", "500", "--seeds", "2", "--lrs", "0.05", "--Ks", "1", "3",
              "--out", str(tmp_path)])
    assert (tmp_path / "nqp.png").stat().st_size > 10_000
    text = (tmp_path / "nqp.md").read_text()
    assert "Steady-state check" in text and "--Ks 1 3" in text
    assert "Closed-form steady state" in text and "| K | c₀ | c₁ |" in text


def _algorithm_1_by_loop(Ks, lr, steps, window, n=100, wstar_norm=1.0, seed=0):
    """One seed of simulate(), written as the per-member loops of Algorithm 1, drawing the same random numbers."""
    gen = torch.Generator().manual_seed(seed)
    h = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    direction = torch.randn(1, n, generator=gen, dtype=torch.float64)[0]
    wstar = wstar_norm * direction / direction.norm()
    u = torch.randn(1, n, generator=gen, dtype=torch.float64)[0]
    w0 = wstar + u / u.norm()
    thetas = [w0.clone() for _ in Ks]
    phis = [[1.0] * K for K in Ks]
    members = [w0.clone() for _ in range(max(Ks))]
    z_lp, z_ens = torch.empty(1, 1, sum(Ks), n), torch.empty(1, 1, max(Ks), n)
    sums = np.zeros((2, steps // window, len(Ks)))
    counts = np.zeros(steps // window)
    for t in range(steps):
        z_lp.normal_(generator=gen)
        z_ens.normal_(generator=gen)
        eps_lp = z_lp[0, 0].double() / h.sqrt()  # ε ~ N(0, H⁻¹)
        m = 0
        for g, K in enumerate(Ks):
            accumulated = torch.zeros(n, dtype=torch.float64)
            for k in range(K):
                grad_w = h * (phis[g][k] * thetas[g] - wstar + eps_lp[m])
                m += 1
                accumulated += phis[g][k] * grad_w  # Δθ_k with φ_k before its update
                phis[g][k] -= lr * float(grad_w @ thetas[g])
            thetas[g] = thetas[g] - lr * accumulated / K
        for k in range(max(Ks)):
            members[k] = members[k] - lr * h * (members[k] - wstar + z_ens[0, 0, k].double() / h.sqrt())
        if t % nqp.EVAL_EVERY == 0:
            for g, K in enumerate(Ks):
                for method, w_bar in enumerate((thetas[g] * np.mean(phis[g]), sum(members[:K]) / K)):
                    sums[method, t // window, g] += 0.5 * float((h * (w_bar - wstar) ** 2).sum())
            counts[t // window] += 1
    return sums / counts[None, :, None]


def test_vectorised_simulation_matches_the_per_member_loops():
    Ks, steps, window = (1, 3), 60, 20
    batched = nqp.simulate(Ks, [0.05], steps=steps, window=window, seeds=1, seed=4)
    looped = _algorithm_1_by_loop(Ks, 0.05, steps, window, seed=4)
    assert np.allclose(batched.late_phase[:, 0, 0], looped[0], rtol=1e-9, atol=0)
    assert np.allclose(batched.ensemble[:, 0, 0], looped[1], rtol=1e-9, atol=0)


# The closed-form steady state (nqp.md, "Closed-form steady state"): the noise balance of Q = Σ_k φ_k² − |θ|²/γθ puts
# c = mean_k φ_k at c⁴ = w*ᵀHw*/(γθ tr H), and the mean model's excess loss at (η/4) √(γθ w*ᵀHw* tr H) (1 + 1/K).


def test_closed_forms_by_hand():
    # n = 2, w* = (1, 0): w*ᵀHw* = 1, tr H = 1.5
    wstar = np.array([1.0, 0.0])
    assert nqp.scale_theory(3, wstar) == pytest.approx((3 / 1.5) ** 0.25)  # γθ = 1/K: c⁴ = K a / b
    assert nqp.scale_theory(3, wstar, theta_scale="sum") == pytest.approx((1 / 1.5) ** 0.25)  # γθ = 1: c⁴ = a / b
    assert nqp.late_phase_theory(0.1, 4, wstar) == pytest.approx(0.1 / 4 * np.sqrt(1.5 / 4) * 1.25)
    assert nqp.late_phase_theory(0.1, 4, wstar, "sum") == pytest.approx(0.1 / 4 * np.sqrt(1.5) * 1.25)
    assert nqp.relaxation_steps(0.1, 3, wstar) == pytest.approx((2 + 1) / (2 * 0.01 * 1))  # (c⁴ + |w*|²)/(2η²a)
    # The O(η) terms vanish as η → 0 and lower c for η > 0 (the φ_k fluctuations feed the θ side of the balance).
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 100))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    for K in (1, 7):
        c0 = nqp.scale_theory(K, w)
        assert np.allclose(nqp.scale_theory(K, w, 1e-7), c0, rtol=1e-5)
        assert np.all(nqp.scale_theory(K, w, 0.05) < 0.97 * c0)
        assert np.allclose(nqp.phi_moment_theory(K, w, 1e-7), c0 ** 2, rtol=1e-5)
    # The shape (1 + 1/K)/√K: log-log slope −0.693 over the script's K values, whatever η and w*.
    losses = [nqp.late_phase_theory(0.02, K, 3.0 * w[0]) for K in nqp.DEFAULT_KS]
    assert nqp.loglog_slope(nqp.DEFAULT_KS, np.array(losses)) == pytest.approx(-0.6925, abs=5e-4)


BALANCE_KS = (1, 4)


@pytest.fixture(scope="module")
def balanced():
    # n = 10 and η = 0.1: c relaxes in ~300 steps (relaxation_steps), and the O(η) terms lower c by ~7 %, which
    # the comparison below resolves. The first window is the transient; the second is averaged.
    return nqp.simulate(BALANCE_KS, [0.1], steps=12_000, window=6_000, seeds=4, n=10, seed=1)


def test_mean_phi_settles_at_the_noise_balance(balanced):
    theory = nqp.predictions(balanced)
    assert np.all(theory["relax"] < 0.1 * balanced.window)  # the last window is at steady state
    phi = balanced.phi_avg[-1, 0]  # [seed, K], mean_k φ_k averaged over the last window
    ratio = phi / theory["scale1"][0]
    assert np.all(np.abs(ratio - 1) < 0.07), ratio  # per seed: window averages of a fluctuating φ
    assert np.all(np.abs(ratio.mean(0) - 1) < 0.03), ratio.mean(0)
    # The O(η) terms matter: the η → 0 value c₀ is further off, by ~10 % at K = 1.
    ratio0 = phi / theory["scale0"][0]
    assert np.all(np.abs(ratio0.mean(0) - 1) > np.abs(ratio.mean(0) - 1))
    assert ratio0[:, 0].mean() < 0.95
    # K-dependence: c ∝ K^(1/4) (not K^(1/2), not constant); the ratio of c₁ at K = 4 and 1 is ≈ 1.48 here.
    growth = phi[:, 1] / phi[:, 0]
    predicted = theory["scale1"][0, :, 1] / theory["scale1"][0, :, 0]
    assert np.allclose(growth, predicted, rtol=0.06), (growth, predicted)
    assert np.all((1.3 < growth) & (growth < 1.65))
    # The second moment includes the fluctuations Var φ_k ≈ η/2.
    assert np.allclose(balanced.phi_sq_avg[-1, 0], theory["phi_sq"][0], rtol=0.1)


def test_late_phase_loss_matches_the_closed_form(balanced):
    theory = nqp.predictions(balanced)
    ratio = balanced.final("late_phase")[0] / theory["loss"][0]
    assert np.all(np.abs(ratio - 1) < 0.2), ratio
    assert np.all(np.abs(ratio.mean(0) - 1) < 0.1), ratio.mean(0)


def test_theta_sum_makes_the_scale_independent_of_k():
    # γθ = 1: c⁴ = w*ᵀHw*/tr H for every K, and the loss ∝ (1 + 1/K).
    result = nqp.simulate(BALANCE_KS, [0.1], steps=8_000, window=4_000, seeds=2, n=10, seed=3, theta_scale="sum")
    theory = nqp.predictions(result)
    phi = result.phi_avg[-1, 0]
    assert np.allclose(phi, theory["scale1"][0], rtol=0.07)
    assert np.all(np.abs(phi[:, 1] / phi[:, 0] - 1) < 0.1)
    assert np.allclose(result.final("late_phase")[0], theory["loss"][0], rtol=0.2)
