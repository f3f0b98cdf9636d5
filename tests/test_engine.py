"""The engine equals a plain, hand-written Algorithm 1 with K separate model copies sharing θ by hand."""

import copy
from functools import partial

import algorithm1
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lpconvert
from lpconvert import LatePhaseEngine

K = 3
BATCH = 6
ITERATIONS = 5


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


OPTIMIZERS = {
    "sgd-nesterov": (
        partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3),
    ),
    "adam": (
        partial(torch.optim.Adam, lr=1e-2, weight_decay=1e-3),
        partial(torch.optim.Adam, lr=2e-2),
    ),
    "sgd": (partial(torch.optim.SGD, lr=0.1), partial(torch.optim.SGD, lr=0.1)),
}
LATE = ("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "fc.weight", "fc.bias")
STATS = ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var")
MOVING_THETA = ("conv1.weight", "conv2.weight")


def data(iterations=ITERATIONS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            [torch.randn(BATCH, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(K)],
            [torch.randint(0, 5, (BATCH,), generator=g) for _ in range(K)],
        )
        for _ in range(iterations)
    ]


def reference_algorithm1(members, batches, theta_factory, phi_factory, gamma):
    """The plain reference with this file's late-phase weights (BN and classifier)."""
    return algorithm1.reference_algorithm1(
        members, batches, theta_factory, lambda m: phi_factory([p for n, p in m.named_parameters() if n in LATE]),
        gamma, lambda name: name in LATE)


def converted(model, sigma0=0.05):
    return lpconvert.convert(copy.deepcopy(model), K=K, targets=("batchnorm", "classifier"), sigma0=sigma0, seed=3)


@pytest.mark.parametrize("optim", sorted(OPTIMIZERS))
@pytest.mark.parametrize("gamma", [1.0 / K, 1.0])
@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
def test_engine_equals_reference_algorithm1(optim, gamma, mode):
    torch.manual_seed(0)
    base = SmallNet().double().train()
    lp = converted(base)
    # the reference starts from the same perturbed members
    start = [lpconvert.unload(lp, k) for k in range(K)]
    assert not torch.equal(start[0].fc.weight, start[1].fc.weight)
    theta_factory, phi_factory = OPTIMIZERS[optim]
    batches = data()

    engine = LatePhaseEngine(lp, theta_factory, phi_factory, gamma_theta=gamma, mode=mode)
    for xs, ys in batches:
        engine.step(xs, ys)

    theta, members = reference_algorithm1(start, batches, theta_factory, phi_factory, gamma)

    state = lp.state_dict()
    for n, p in theta.items():
        torch.testing.assert_close(state[n], p.detach(), atol=1e-6, rtol=0, msg=f"θ {n}")
    # a convolution bias feeding a train-mode BatchNorm has an exactly zero gradient (the batch mean removes it), so
    # whether it moves is a matter of rounding and thread count: only parameters with a real gradient must move
    for n in MOVING_THETA:
        assert (state[n] - base.state_dict()[n]).abs().max() > 1e-6, f"θ {n} did not move"
    for k, m in enumerate(members):
        ref = m.state_dict()
        for n in LATE + STATS:
            torch.testing.assert_close(state[n][k], ref[n], atol=1e-6, rtol=0, msg=f"member {k} {n}")
        assert state["bn1.num_batches_tracked"][k] == ITERATIONS


def test_reference_with_identical_members_matches_sigma0_zero():
    """σ0 = 0: the reference built from the plain model and the engine agree too (members start identical)."""
    torch.manual_seed(1)
    base = SmallNet().double().train()
    lp = converted(base, sigma0=0.0)
    theta_factory, phi_factory = OPTIMIZERS["sgd-nesterov"]
    batches = data(3, seed=1)
    engine = LatePhaseEngine(lp, theta_factory, phi_factory)
    for xs, ys in batches:
        engine.step(xs, ys)
    copies = [copy.deepcopy(base) for _ in range(K)]
    theta, members = reference_algorithm1(copies, batches, theta_factory, phi_factory, 1.0 / K)
    state = lp.state_dict()
    for n, p in theta.items():
        torch.testing.assert_close(state[n], p.detach(), atol=1e-6, rtol=0)
    for k, m in enumerate(members):
        torch.testing.assert_close(state["fc.weight"][k], m.fc.weight.detach(), atol=1e-6, rtol=0)
    # different minibatches drove the members apart
    assert (state["fc.weight"][0] - state["fc.weight"][1]).abs().max() > 1e-4


def test_inactive_members_do_not_move_at_all():
    torch.manual_seed(2)
    lp = converted(SmallNet().train())
    engine = LatePhaseEngine(lp, *OPTIMIZERS["sgd-nesterov"])
    (xs, ys), (xs2, ys2) = data(2, seed=2)
    engine.step([x.float() for x in xs], ys)  # every member has momentum now
    before = {n: t.clone() for n, t in lp.state_dict().items()}
    engine.step([xs2[1].float()], [ys2[1]], members=[1])
    after = lp.state_dict()
    for n in LATE + STATS:
        for k in (0, 2):
            assert torch.equal(after[n][k], before[n][k]), f"inactive member {k} moved in {n}"
        assert not torch.equal(after[n][1], before[n][1]), f"member 1 did not move in {n}"


def test_member_views_share_storage_with_the_model():
    lp = converted(SmallNet())
    engine = LatePhaseEngine(lp, partial(torch.optim.SGD, lr=0.1))
    with torch.no_grad():
        engine.member_params[2][0].add_(1.0)
    assert torch.equal(engine.member_params[2][0], engine.stacked[0][2])
    assert len(engine.member_optimizers) == K
    assert sum(p.numel() for p in engine.theta_params) == sum(
        p.numel() for n, p in SmallNet().named_parameters() if n not in LATE
    )


def test_engine_is_deterministic_and_refuses_moved_parameters():
    def run():
        torch.manual_seed(5)
        lp = converted(SmallNet().train())
        engine = LatePhaseEngine(lp, partial(torch.optim.SGD, lr=0.1, momentum=0.9), mode="vectorized")
        for xs, ys in data(2, seed=5):
            losses = engine.step([x.float() for x in xs], ys)
        return lp.state_dict(), losses

    (a, la), (b, lb) = run(), run()
    assert torch.equal(la, lb) and la.shape == (K,)
    assert all(torch.equal(a[n], b[n]) for n in a)

    lp = converted(SmallNet())
    engine = LatePhaseEngine(lp, partial(torch.optim.SGD, lr=0.1))
    lp.double()  # re-allocates every parameter
    xs, ys = data(1)[0]
    with pytest.raises(lpconvert.LatePhaseError, match="build the LatePhaseEngine"):
        engine.step(xs, ys)


def test_engine_bad_input():
    lp = converted(SmallNet())
    with pytest.raises(lpconvert.LatePhaseError, match="execution mode"):
        LatePhaseEngine(lp, partial(torch.optim.SGD, lr=0.1), mode="parallel")
    with pytest.raises(lpconvert.LatePhaseError, match="converted model"):
        LatePhaseEngine(SmallNet(), partial(torch.optim.SGD, lr=0.1))
    engine = LatePhaseEngine(lp, partial(torch.optim.SGD, lr=0.1))
    xs, ys = data(1)[0]
    with pytest.raises(lpconvert.LatePhaseError, match="one target per input"):
        engine.step(xs, ys[:2])
    with pytest.raises(lpconvert.LatePhaseError, match="one minibatch per trained member"):
        engine.step(xs[:2], ys[:2], members=[0])
    only_head = lpconvert.convert(SmallNet(), K=K, targets="classifier")
    with pytest.raises(lpconvert.LatePhaseError, match="shared BatchNorm"):
        LatePhaseEngine(only_head, partial(torch.optim.SGD, lr=0.1), mode="vectorized")


def test_engine_state_dict_round_trip():
    torch.manual_seed(6)
    lp = converted(SmallNet().train())
    engine = LatePhaseEngine(lp, *OPTIMIZERS["adam"])
    batches = data(3, seed=6)
    engine.step([x.float() for x in batches[0][0]], batches[0][1])
    saved_model, saved_engine = copy.deepcopy(lp.state_dict()), copy.deepcopy(engine.state_dict())
    for xs, ys in batches[1:]:
        engine.step([x.float() for x in xs], ys)
    expected = lp.state_dict()

    lp2 = converted(SmallNet())
    lp2.load_state_dict(saved_model)
    engine2 = LatePhaseEngine(lp2, *OPTIMIZERS["adam"])
    engine2.load_state_dict(saved_engine)
    for xs, ys in batches[1:]:
        engine2.step([x.float() for x in xs], ys)
    assert all(torch.equal(expected[n], lp2.state_dict()[n]) for n in expected)


@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
def test_a_member_trained_twice_in_one_iteration_equals_two_plain_steps(mode):
    """K = 1 with the member listed K times is the paper's gradient-accumulation control (Table 10): φ steps on
    every minibatch, θ accumulates over all of them and steps once."""
    torch.manual_seed(7)
    base = SmallNet().double().train()
    lp = lpconvert.convert(copy.deepcopy(base), K=1, targets=("batchnorm", "classifier"))
    theta_factory, phi_factory = OPTIMIZERS["sgd-nesterov"]
    engine = LatePhaseEngine(lp, theta_factory, phi_factory, gamma_theta=1.0, mode=mode)
    batches = data(2, seed=7)
    for xs, ys in batches:
        engine.step(xs, ys, members=[0] * K)
    # the reference: one copy playing all K "members" (φ updated after each minibatch, θ after K)
    member = copy.deepcopy(base)
    theta, _ = reference_algorithm1([member] * K, batches, theta_factory, phi_factory, 1.0)
    state = lp.state_dict()
    for n, p in theta.items():
        torch.testing.assert_close(state[n], p.detach(), atol=1e-6, rtol=0)
    for n in LATE + STATS:
        torch.testing.assert_close(state[n][0], member.state_dict()[n], atol=1e-6, rtol=0)


def _uneven_loader(seed=8):
    """Eight minibatches (not a multiple of K = 3), the last one short: what a DataLoader without drop_last gives."""
    g = torch.Generator().manual_seed(seed)
    sizes = [BATCH] * 7 + [BATCH // 2 - 1]
    return [(torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g))
            for n in sizes]


def test_partial_rounds_continue_round_robin_and_vectorized_equals_sequential():
    """iterate_members + step run for any loader: a partial round trains the next members, the round robin goes on
    in the next epoch (every member gets its share), and vectorized mode handles minibatches of different sizes
    exactly like sequential mode."""
    torch.manual_seed(8)
    base = SmallNet().double().train()
    states = {}
    for mode in ("sequential", "vectorized"):
        lp = converted(base)
        engine = LatePhaseEngine(lp, *OPTIMIZERS["sgd-nesterov"], mode=mode)
        for epoch in range(2):
            for xs, ys in lpconvert.iterate_members(_uneven_loader(), K):
                engine.step(xs, ys)
        states[mode] = lp.state_dict()
        assert engine.next_member == 16 % K
    # 16 minibatches in rounds 3,3,2 | 3,3,2: members trained 6, 5, 5 times — not 6, 6, 4 (restarting at member 0)
    assert states["sequential"]["bn1.num_batches_tracked"].tolist() == [6, 5, 5]
    for name, value in states["sequential"].items():
        torch.testing.assert_close(states["vectorized"][name], value, atol=1e-10, rtol=0, msg=name)


def test_partial_round_steps_theta_on_the_sum_of_its_minibatches():
    """A round of 2 minibatches (K = 3): members 0 and 1 step, member 2 does not move, θ steps on γθ·(Δθ_0 + Δθ_1)."""
    torch.manual_seed(9)
    base = SmallNet().double().train()
    lp = converted(base)
    start = [lpconvert.unload(lp, k) for k in range(K)]
    theta_factory, phi_factory = OPTIMIZERS["sgd"]
    (xs, ys), = data(1, seed=9)
    engine = LatePhaseEngine(lp, theta_factory, phi_factory, gamma_theta=1.0 / K)
    engine.step(xs[:2], ys[:2])
    theta, members = reference_algorithm1(start[:2], [(xs[:2], ys[:2])], theta_factory, phi_factory, 1.0 / K)
    state = lp.state_dict()
    for n, p in theta.items():
        torch.testing.assert_close(state[n], p.detach(), atol=1e-10, rtol=0, msg=n)
    for k in (0, 1):
        torch.testing.assert_close(state["fc.weight"][k], members[k].fc.weight.detach(), atol=1e-10, rtol=0)
    assert torch.equal(state["fc.weight"][2], start[2].fc.weight) and engine.next_member == 2


def test_clip_grad_bounds_every_member_step_and_the_theta_step():
    """Plain SGD (lr 1, no momentum) with --clip-grad c: a member's step and θ's step have norm c (torch's clip,
    c·|g|/(|g| + 1e-6)) when the gradient is larger; far above the gradient norm, clipping changes nothing."""
    from functools import partial

    import lpconvert

    def engine_after_step(clip):
        torch.manual_seed(0)
        model = lpconvert.convert(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double(),
                                  K=2, targets="bn")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        engine = lpconvert.LatePhaseEngine(model, partial(torch.optim.SGD, lr=1.0), clip_grad=clip)
        g = torch.Generator().manual_seed(1)
        xs = [10 * torch.randn(16, 6, generator=g, dtype=torch.float64) for _ in range(2)]
        ys = [torch.randint(0, 3, (16,), generator=g) for _ in range(2)]
        engine.step(xs, ys)
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}

    clipped, free, loose = engine_after_step(1e-3), engine_after_step(None), engine_after_step(1e6)
    assert all(torch.equal(free[n], loose[n]) for n in free)
    theta = torch.cat([d.flatten() for n, d in clipped.items() if not n.startswith("1.")])
    assert theta.norm().item() == pytest.approx(1e-3, rel=1e-4)
    for k in range(2):
        member = torch.cat([d[k].flatten() for n, d in clipped.items() if n.startswith("1.")])
        assert member.norm().item() == pytest.approx(1e-3, rel=1e-4)
    assert torch.cat([d.flatten() for d in free.values()]).norm() > 1e-2


class AttentionNet(nn.Module):
    """Self-attention over 5 steps, a late-phase-able LayerNorm and head; batch first or (time, batch)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.attn(x, x, x, need_weights=False)[0]).mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_vectorized_mode_is_exact_or_refused_for_sequence_layouts(batch_first):
    """Vectorized mode stacks the members' minibatches along dim 0: for a batch-first model it equals sequential mode,
    a model that reads (time, batch) inputs — attention here, an LSTM in tests/test_kinds.py, a late-phase GRU — is
    refused at construction with one line (the members' sequences would be run as one)."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(*((2, 5) if batch_first else (5, 2)), 4, generator=g, dtype=torch.float64) for _ in range(K)]
    ys = [torch.randint(0, 3, (2,), generator=g) for _ in range(K)]
    states = {}
    for mode in ("sequential", "vectorized"):
        torch.manual_seed(1)
        model = lpconvert.convert(AttentionNet(batch_first).double(), K=K, targets="layernorm,classifier", sigma0=0.5,
                                  seed=2)
        if mode == "vectorized" and not batch_first:
            assert lpconvert.train.engine.time_major_modules(model) == {"attn": "MultiheadAttention"}
            with pytest.raises(lpconvert.LatePhaseError, match=r"^vectorized mode stacks the members' minibatches "
                               r"along dim 0, but attn \(MultiheadAttention\) reads \(time, batch\) inputs "
                               r"\(batch_first=False\); use mode='sequential', or a batch-first model$"):
                LatePhaseEngine(model, partial(torch.optim.SGD, lr=0.5), mode=mode)
            return
        LatePhaseEngine(model, partial(torch.optim.SGD, lr=0.5), mode=mode).step(xs, ys)
        states[mode] = model.state_dict()
    assert any(not torch.equal(v, AttentionNet(True).double().state_dict()[k]) for k, v in states["sequential"].items()
               if "in_proj" in k)
    for name, value in states["sequential"].items():
        torch.testing.assert_close(states["vectorized"][name], value, rtol=0, atol=1e-12, msg=name)


def test_a_late_phase_time_major_recurrent_layer_is_found_through_its_template():
    """A rank-1 GRU keeps the original layer as its template: its (time, batch) layout still refuses vectorized
    mode, and the batch-first one does not."""
    for batch_first, expected in ((False, {"rnn": "GRU"}), (True, {})):
        model = nn.Sequential()
        model.add_module("rnn", nn.GRU(4, 4, batch_first=batch_first))
        lp = lpconvert.convert(model, K=2, targets="rank1")
        assert type(lp.rnn).__name__ == "Rank1RecurrentLayer"
        assert lpconvert.train.engine.time_major_modules(lp) == expected
        assert (lpconvert.train.engine.why_not_vectorized(lp) is None) is batch_first
