"""Rank-1 late-phase weights on LSTM / GRU recurrent matrices (paper §3.4): exact conversion, members, vectorized
slices, exact collapse into the original recurrent layer, and the engine against a plain K-copy Algorithm 1."""

import copy
from functools import partial

import pytest
import torch
from algorithm1 import reference_algorithm1
from torch import nn

import lpconvert
from lpconvert import LatePhaseEngine

K = 3


class CharModel(nn.Module):
    def __init__(self, cell=nn.LSTM, batch_first=False, bidirectional=True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(11, 6)
        self.rnn = cell(6, 8, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
        self.head = nn.Linear(16 if bidirectional else 8, 11)

    def forward(self, x):
        out, _ = self.rnn(self.embed(x))
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out).reshape(-1, 11)


def _tokens(batch, batch_first, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 11, (batch, 5), generator=g)
    return x if batch_first else x.t().contiguous()


@pytest.mark.parametrize("cell, batch_first", [(nn.LSTM, False), (nn.GRU, True)])
@pytest.mark.parametrize("input_weights", [False, True])
def test_conversion_members_slices_and_collapse(cell, batch_first, input_weights):
    torch.manual_seed(0)
    model = CharModel(cell, batch_first).double().eval()
    options = {"rank1": {"input_weights": input_weights}}
    x = _tokens(4, batch_first)
    exact = lpconvert.convert(copy.deepcopy(model), K=K, targets="rank1", include="rnn", options=options)
    torch.testing.assert_close(exact(x), model(x), rtol=0, atol=1e-12)  # identical members: the original function
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in lpconvert.collapse(exact).state_dict().items())

    lp = lpconvert.convert(copy.deepcopy(model), K=K, targets="rank1", include="rnn", options=options, sigma0=0.3,
                           seed=1)
    factored = [n for n in lp.rnn.factored]
    assert factored == [n for n in model.rnn._flat_weights_names if n.startswith(
        ("weight_hh", "weight_ih") if input_weights else "weight_hh")]
    assert lpconvert.late_phase_config(lp).options == options
    xs = _tokens(8, batch_first, seed=2)
    lpconvert.select_members(lp, [2, 0])
    both = lp(xs)
    halves = (xs[:4], xs[4:]) if batch_first else (xs[:, :4], xs[:, 4:])
    members = []
    for k, half in zip((2, 0), halves):
        lpconvert.select_members(lp, k)
        members.append(lp(half))
        torch.testing.assert_close(lpconvert.unload(lp, k)(half), members[-1], rtol=0, atol=1e-12)
    # the model flattens (batch, time): member slices are rows of the batch
    torch.testing.assert_close(both.reshape(8, 5, 11), torch.cat([m.reshape(4, 5, 11) for m in members]),
                               rtol=0, atol=1e-12)
    assert not torch.allclose(members[0], model(halves[0]))

    averaged = lpconvert.collapse(lp)
    assert type(averaged.rnn) is cell
    fresh = CharModel(cell, batch_first).double()
    fresh.load_state_dict(averaged.state_dict(), strict=True)
    for name in factored:
        u, v = getattr(lp.rnn, f"rank1_u_{name}"), getattr(lp.rnn, f"rank1_v_{name}")
        expected = getattr(model.rnn, name) * torch.stack([torch.outer(u[k], v[k]) for k in range(K)]).mean(0)
        torch.testing.assert_close(getattr(averaged.rnn, name), expected, rtol=0, atol=1e-12)


def test_plan_counts_the_factors():
    model = CharModel()
    hh = lpconvert.plan(model, K=K, targets="rank1", include="rnn")
    both = lpconvert.plan(model, K=K, targets="rank1", include="rnn", options={"rank1": {"input_weights": True}})
    assert hh.layers == {"rnn": "rank1"}
    assert hh.params_per_member == 4 * (32 + 8)  # 2 layers × 2 directions × (u: 4H, v: H)
    assert both.params_per_member == hh.params_per_member + 2 * (32 + 6) + 2 * (32 + 16)
    with pytest.raises(lpconvert.LatePhaseError, match="options given for layernorm"):
        lpconvert.plan(model, targets="rank1", options={"layernorm": {}})


@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
def test_engine_equals_a_plain_k_copy_algorithm_1(mode):
    """Member k's factors and the shared weights (matrices, embeddings, head) follow Algorithm 1 exactly: the
    reference trains K separate models (each the K = 1 late-phase model holding member k's factors), θ shared by hand."""
    torch.manual_seed(3)
    base = CharModel(batch_first=True).double().train()
    lp = lpconvert.convert(copy.deepcopy(base), K=K, targets="rank1", include="rnn", sigma0=0.2, seed=4)
    copies = []
    for k in range(K):
        one = lpconvert.convert(copy.deepcopy(base), K=1, targets="rank1", include="rnn")
        with torch.no_grad():
            for name, p in one.named_parameters():
                if "rank1_" in name:
                    p.copy_(lp.state_dict()[name][k : k + 1])
        copies.append(one)
    theta_factory = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    phi_factory = partial(torch.optim.SGD, lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    batches = [([torch.randint(0, 11, (3, 5), generator=g) for _ in range(K)],
                [torch.randint(0, 11, (15,), generator=g) for _ in range(K)]) for _ in range(3)]

    engine = LatePhaseEngine(lp, theta_factory, phi_factory, gamma_theta=1.0 / K, mode=mode)
    for xs, ys in batches:
        engine.step(xs, ys)

    theta, copies = reference_algorithm1(
        copies, batches, theta_factory, lambda m: phi_factory([p for n, p in m.named_parameters() if "rank1_" in n]),
        1.0 / K, lambda name: "rank1_" in name)

    state = lp.state_dict()
    for n, p in theta.items():
        torch.testing.assert_close(state[n], p.detach(), rtol=0, atol=1e-9, msg=n)
        assert (state[n] - base.state_dict()[n]).abs().max() > 1e-6, f"θ {n} did not move"
    for k, m in enumerate(copies):
        for n, p in m.named_parameters():
            if "rank1_" in n:
                torch.testing.assert_close(state[n][k], p.detach()[0], rtol=0, atol=1e-9, msg=f"member {k} {n}")
