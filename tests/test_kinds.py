"""Every registered kind on tiny models: identity at σ0 = 0, exact collapse, single members, vectorized = sequential
(or refused with one line: shared BatchNorm, a (time, batch) LSTM), rebuilding from the saved LatePhaseConfig, and
Algorithm 1 against the plain reference (tests/algorithm1.py).

The sweep is parametrized over the registry, so a kind added later is tested without editing this file: it runs on
every tiny model below, and on the kind's own `example()`, in which `plan` finds its targets, and fails if there is
none. Also here: which kind gets a
module two kinds claim (precedence), a kind that stacks only some of a module's tensors (a bias-only kind), and a kind
that declares an option.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from algorithm1 import reference_algorithm1
from torch import nn

import lpconvert
from lpconvert import KINDS, LatePhaseConfig, LatePhaseEngine, LatePhaseError
from lpconvert.layers import (
    MemberSelection,
    Option,
    StackedLayer,
    member_mean,
    options_help,
    register_kind,
)
from lpconvert.train.engine import EXECUTION_MODES, shared_batch_norms

K = 3
SIGMA0 = 0.3
TOL = {"rtol": 1e-12, "atol": 1e-12}  # float64: the late-phase path may round differently from the original layer
THETA = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
PHI = partial(torch.optim.SGD, lr=0.2, momentum=0.9)


class NormNet(nn.Module):
    """BatchNorm-free: GroupNorm, two convolutions of one shape in one block (a hypernet group), LayerNorm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.body(self.stem(x)).mean((2, 3)))))


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


class CharLSTM(nn.Module):
    """A character model: embedding, a two-layer LSTM, the head on every step; batch first."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.rnn = nn.LSTM(6, 8, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0]).reshape(-1, 5)


class TimeMajorCharLSTM(CharLSTM):
    """The same in the LSTM's default (time, batch) layout, which vectorized mode refuses (issue #19)."""

    def __init__(self) -> None:
        super().__init__(batch_first=False)


def _images(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def _tokens(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 11, (n, 4), generator=g), torch.randint(0, 5, (4 * n,), generator=g)


def _time_major_tokens(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _tokens(n, g)
    return x.t().contiguous(), y


@dataclass(frozen=True)
class TinyModel:
    name: str
    cls: type[nn.Module]
    batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # n examples -> inputs, targets
    time_major: bool = False  # reads (time, batch) inputs: vectorized mode is refused

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.cls().double()

    def iterations(self, count: int, seed: int = 1) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """`count` iterations of K equal minibatches."""
        g = torch.Generator().manual_seed(seed)
        return [tuple(map(list, zip(*[self.batch(4, g) for _ in range(K)]))) for _ in range(count)]


TINY_MODELS = (TinyModel("norm_cnn", NormNet, _images), TinyModel("batchnorm_cnn", BatchNormNet, _images),
               TinyModel("char_lstm", CharLSTM, _tokens),
               TinyModel("char_lstm_time_major", TimeMajorCharLSTM, _time_major_tokens, time_major=True))


def _models_with(kind: str) -> list[TinyModel]:
    """The tiny models the kind finds targets in: this file's, and the kind's own ``example()``."""
    models = TINY_MODELS
    if KINDS[kind].example() is not None:
        models += (TinyModel(f"{kind}.example()", KINDS[kind].example, _images),)
    found = [tiny for tiny in models if lpconvert.plan(tiny.build(), K, kind).targets]
    if not found:
        pytest.fail(f"no tiny model has a target of kind {kind!r}: give {KINDS[kind].__name__} a static example() "
                    "returning a tiny image model with one, input (N, 3, 5, 5), output (N, 5)")
    return found


def _converted(tiny: TinyModel, kind: str, sigma0: float = SIGMA0, training: bool = False) -> nn.Module:
    return lpconvert.convert(tiny.build().train(training), K=K, targets=kind, sigma0=sigma0, seed=0)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state, expected = a.state_dict(), b.state_dict()
    assert list(state) == list(expected)
    assert [key for key, value in expected.items() if not torch.equal(state[key], value)] == []


# ---------------------------------------------------------------------------------------------------------------------
# the checks, for one kind on one tiny model
# ---------------------------------------------------------------------------------------------------------------------
def check_identity_at_sigma0_zero(kind: str, tiny: TinyModel) -> None:
    """σ0 = 0: every member computes what the original model computes, in eval and in train mode."""
    x, _ = tiny.batch(4, torch.Generator().manual_seed(1))
    for training in (False, True):
        original = tiny.build().train(training)
        expected = original(x)
        lp = _converted(tiny, kind, sigma0=0.0, training=training)
        for k in range(K):
            lpconvert.select_members(lp, k)
            torch.testing.assert_close(lp(x), expected, **TOL, msg=f"member {k}, training={training}")


def check_exact_collapse(kind: str, tiny: TinyModel) -> None:
    """Identical members collapse to the original state_dict bit for bit; perturbed ones to the original classes."""
    original = tiny.build()
    for bn_stats in ("fold", "mean"):
        collapsed = lpconvert.collapse(_converted(tiny, kind, sigma0=0.0), bn_stats=bn_stats)
        assert type(collapsed) is type(original)
        _assert_same_state(collapsed, original)
    collapsed = lpconvert.collapse(_converted(tiny, kind))
    assert {n: type(m) for n, m in collapsed.named_modules()} == {n: type(m) for n, m in original.named_modules()}
    assert list(collapsed.state_dict()) == list(original.state_dict())
    assert any(not torch.equal(collapsed.state_dict()[k], v) for k, v in original.state_dict().items())
    tiny.build(seed=1).load_state_dict(collapsed.state_dict(), strict=True)


def check_unload(kind: str, tiny: TinyModel) -> None:
    """unload(model, k) is member k alone in the original architecture."""
    lp = _converted(tiny, kind)
    x, _ = tiny.batch(4, torch.Generator().manual_seed(2))
    outputs = []
    for k in range(K):
        single = lpconvert.unload(lp, k)
        assert type(single) is type(lp) and not lpconvert.late_phase_layers(single)
        lpconvert.select_members(lp, k)
        outputs.append(lp(x))
        torch.testing.assert_close(single(x), outputs[-1], **TOL, msg=f"member {k}")
    assert not torch.allclose(outputs[0], outputs[1])  # σ0 > 0: the members differ


def check_vectorized_equals_sequential(kind: str, tiny: TinyModel) -> None:
    """Two iterations of Algorithm 1 give the same model in both execution modes, or the engine refuses vectorized
    mode with one line: when BatchNorm layers that stay shared would mix the members' batch statistics, and for a
    model that reads (time, batch) inputs (the members' minibatches stacked along dim 0 would be one long sequence)."""
    states = {}
    for mode in EXECUTION_MODES:
        lp = _converted(tiny, kind, training=True)
        refusal = None
        if shared_batch_norms(lp):
            refusal = "shared BatchNorm"
        elif tiny.time_major:
            refusal = r"rnn \(LSTM\) reads \(time, batch\) inputs"
        if mode == "vectorized" and refusal:
            with pytest.raises(LatePhaseError, match=refusal) as refused:
                LatePhaseEngine(lp, THETA, PHI, mode=mode)
            assert "\n" not in str(refused.value)
            return
        engine = LatePhaseEngine(lp, THETA, PHI, mode=mode)
        for xs, ys in tiny.iterations(2):
            engine.step(xs, ys)
        states[mode] = lp.state_dict()
    for name, value in states["sequential"].items():
        torch.testing.assert_close(states["vectorized"][name], value, rtol=0, atol=1e-10, msg=name)


def check_rebuild_from_config(kind: str, tiny: TinyModel) -> None:
    """convert_from_config on a fresh model with the saved config and state computes what the model computes."""
    lp = _converted(tiny, kind)
    saved = LatePhaseConfig.from_dict(lpconvert.late_phase_config(lp).to_dict())
    rebuilt = lpconvert.convert_from_config(tiny.build(seed=1), saved).eval()
    rebuilt.load_state_dict(lp.state_dict())
    x, _ = tiny.batch(4, torch.Generator().manual_seed(3))
    for k in range(K):
        lpconvert.select_members(lp, k)
        lpconvert.select_members(rebuilt, k)
        assert torch.equal(rebuilt(x), lp(x)), f"member {k}"


def _is_member_tensor(stacked: torch.Tensor, single: torch.Tensor) -> bool:
    """Whether a tensor of the K-member model and the same-named one of the K = 1 model hold members."""
    return single.shape[:1] == (1,) and stacked.shape == (K, *single.shape[1:])


def _member_copy(base: nn.Module, lp: nn.Module, k: int) -> nn.Module:
    """The K = 1 late-phase model of the same targets holding member k of `lp`."""
    config = lpconvert.late_phase_config(lp)
    one = lpconvert.convert_from_config(copy.deepcopy(base), LatePhaseConfig(1, config.targets, options=config.options))
    members = lp.state_dict()
    with torch.no_grad():
        for name, tensor in one.state_dict().items():
            if _is_member_tensor(members[name], tensor):
                tensor.copy_(members[name][k : k + 1])
    return one


def check_engine_equals_reference_algorithm1(kind: str, tiny: TinyModel) -> None:
    """Two iterations of the engine (SGD for θ and the members, γθ = 1/K) equal the plain Algorithm 1 on K separate
    models, each the K = 1 late-phase model holding one member, θ shared by hand."""
    base = tiny.build().train()
    lp = _converted(tiny, kind, training=True)
    start = {name: tensor.clone() for name, tensor in lp.state_dict().items()}
    copies = [_member_copy(base, lp, k) for k in range(K)]
    late_ids = {id(p) for layer in lpconvert.late_phase_layers(copies[0]).values()
                for p in layer.late_phase_parameters()}
    late = {n for n, p in copies[0].named_parameters() if id(p) in late_ids}
    batches = tiny.iterations(2, seed=4)

    engine = LatePhaseEngine(lp, THETA, PHI, gamma_theta=1.0 / K)
    for xs, ys in batches:
        engine.step(xs, ys)
    theta, copies = reference_algorithm1(
        copies, batches, THETA, lambda m: PHI([p for n, p in m.named_parameters() if n in late]), 1.0 / K,
        lambda name: name in late)

    state = lp.state_dict()
    for name, p in theta.items():
        torch.testing.assert_close(state[name], p.detach(), rtol=0, atol=1e-10, msg=f"θ {name}")
    for k, member in enumerate(copies):
        for name, tensor in member.state_dict().items():
            if _is_member_tensor(state[name], tensor):
                torch.testing.assert_close(state[name][k], tensor[0], rtol=0, atol=1e-10, msg=f"member {k} {name}")
    assert any(not torch.equal(state[name], start[name]) for name in late), "no late-phase parameter moved"


CHECKS = (check_identity_at_sigma0_zero, check_exact_collapse, check_unload, check_vectorized_equals_sequential,
          check_rebuild_from_config, check_engine_equals_reference_algorithm1)


def check_kind(kind: str) -> None:
    for tiny in _models_with(kind):
        for check in CHECKS:
            try:
                check(kind, tiny)
            except AssertionError as error:
                raise AssertionError(f"{kind} on {tiny.name}, {check.__name__}: {error}") from error


@pytest.mark.parametrize("kind", list(KINDS))
def test_kind(kind):
    check_kind(kind)


# ---------------------------------------------------------------------------------------------------------------------
# the registry: precedence, and a kind that stacks only some of a module's tensors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def registry():
    """The kinds registry, given back as it was (kinds a test registers are removed)."""
    saved = dict(KINDS)
    yield KINDS
    KINDS.clear()
    KINDS.update(saved)


def _linear_kind(name: str, precedence: int) -> type[StackedLayer]:
    """A kind that claims every Linear layer."""
    return type(name, (StackedLayer,), {"kind": name, "precedence": precedence, "description": "every Linear",
                                        "module_types": (nn.Linear,)})


def test_a_kind_is_swept_on_its_own_example_and_one_without_targets_is_named(registry):
    assert [tiny.name for tiny in _models_with("prelu")] == ["prelu.example()"]  # in no model of this file
    register_kind(type("test_nowhere", (StackedLayer,), {"kind": "test_nowhere", "description": "no module",
                                                         "module_types": (nn.PReLU,), "precedence": -9}))
    with pytest.raises(pytest.fail.Exception, match=r"give test_nowhere a static example\(\)"):
        _models_with("test_nowhere")


@pytest.mark.parametrize("first", ["high", "low"])
def test_a_module_two_kinds_claim_goes_to_the_kind_of_higher_precedence(registry, first):
    kinds = {"high": _linear_kind("test_high", 5), "low": _linear_kind("test_low", -5)}
    register_kind(kinds[first])
    register_kind(kinds["low" if first == "high" else "high"])
    assert list(registry) == sorted(registry, key=lambda kind: (-registry[kind].precedence, kind))
    assert lpconvert.plan(NormNet(), K, targets="test_low,test_high").layers == {"head": "test_high"}
    assert lpconvert.plan(NormNet(), K, targets="test_low").layers == {"head": "test_low"}  # alone, it has it


@pytest.mark.parametrize("first", ["test_a", "test_b"])
def test_kinds_of_equal_precedence_are_ordered_by_name(registry, first):
    register_kind(_linear_kind(first, 5))
    register_kind(_linear_kind("test_b" if first == "test_a" else "test_a", 5))
    assert lpconvert.plan(NormNet(), K, targets="test_b,test_a").layers == {"head": "test_a"}


class LatePhaseBias(StackedLayer):
    """K × b of Linear and Conv layers; the weights stay shared (θ)."""

    kind = "test_bias"
    description = "Linear / Conv biases"
    module_types = (nn.Linear, nn.Conv2d)

    @classmethod
    def member_tensor_names(cls, module: nn.Module) -> tuple[str, ...]:
        return ("bias",)


def test_a_kind_that_stacks_only_the_bias(registry):
    register_kind(LatePhaseBias)
    model = NormNet().double()
    report = lpconvert.plan(model, K, targets="test_bias")
    assert report.layers == dict.fromkeys(["stem.0", "body.0", "body.2", "head"], "test_bias")
    assert report.params_per_member == 4 + 4 + 4 + 5
    assert lpconvert.plan(NormNet().double(), K, targets="test_bias", exclude="head").params_per_member == 12

    source = copy.deepcopy(model)
    weight = source.head.weight
    lp = lpconvert.convert(source, K, "test_bias", sigma0=SIGMA0, seed=0).train()
    assert report.params_after == sum(p.numel() for p in lp.parameters())
    assert lp.head.weight is weight  # the module's own parameter, shared by the members
    assert lp.head.weight.shape == (5, 4) and lp.head.bias.shape == (K, 5)
    assert set(lp.state_dict()) == set(model.state_dict())
    engine = LatePhaseEngine(lp, THETA, PHI)
    assert any(p is lp.head.weight for p in engine.theta_params) and any(p is lp.head.bias for p in engine.stacked)
    before = {n: t.clone() for n, t in lp.state_dict().items()}
    engine.step(*TINY_MODELS[0].iterations(1)[0])
    assert not torch.equal(lp.head.weight, before["head.weight"])  # θ stepped

    collapsed = lpconvert.collapse(lp)
    assert type(collapsed.head) is nn.Linear and collapsed.head.weight is not lp.head.weight
    assert torch.equal(collapsed.head.weight, lp.head.weight)  # shared: given back unchanged
    assert torch.equal(collapsed.head.bias, member_mean(lp.head.bias))
    assert torch.equal(lpconvert.unload(lp, 1).body[2].bias, lp.body[2].bias[1])
    check_kind("test_bias")


class ScaledBias(LatePhaseBias):
    """A bias-only kind with an option: its members start at `scale` times the bias."""

    kind = "test_scaled_bias"
    option_specs = {"scale": Option(float, 1.0, "the members' bias at T0, times the original", minimum=0)}

    def __init__(self, module: nn.Module, num_members: int, selection: MemberSelection, sigma0: float = 0.0,
                 generator: torch.Generator | None = None, scale: float = 1.0) -> None:
        super().__init__(module, num_members, selection, sigma0, generator)
        with torch.no_grad():
            self.bias.mul_(scale)


def test_a_kind_declares_its_options_and_gets_them_checked(registry):
    """A new kind's options need no parsing code: the command line's help lists them, values are converted (text as
    from --late-phase-options) and checked, and the kind's constructor gets all of them, defaults filled in."""
    register_kind(ScaledBias)
    assert "test_scaled_bias: scale=FLOAT >= 0 (the members' bias at T0, times the original; default 1.0)" in \
        options_help()
    model = NormNet().double()
    lp = lpconvert.convert(copy.deepcopy(model), K, "test_scaled_bias", options={"test_scaled_bias": {"scale": "2"}})
    assert torch.equal(lp.head.bias, 2 * model.head.bias.detach().expand(K, 5))
    assert lpconvert.late_phase_config(lp).options == {"test_scaled_bias": {"scale": 2.0}}
    assert lpconvert.plan(model, K, "test_scaled_bias").options == {"test_scaled_bias": {"scale": 1.0}}
    with pytest.raises(LatePhaseError, match=r"test_scaled_bias\.scale must be a finite number >= 0, got 'inf'"):
        lpconvert.convert(copy.deepcopy(model), K, "test_scaled_bias", options={"test_scaled_bias": {"scale": "inf"}})
    with pytest.raises(LatePhaseError, match=r"unknown option test_scaled_bias\.shift; test_scaled_bias's options "
                                             r"are scale$"):
        lpconvert.plan(model, K, "test_scaled_bias", options={"test_scaled_bias": {"shift": 1}})
