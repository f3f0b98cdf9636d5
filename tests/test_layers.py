"""Late-phase layers: per-member forward, vectorized slices, Eq. 2 initialisation, rank-1 algebra."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lpconvert import LatePhaseError
from lpconvert.layers import (
    LatePhaseBatchNorm,
    LatePhaseLayerNorm,
    LatePhaseLinear,
    MemberSelection,
    Option,
    Rank1Layer,
    member_mean,
    options_help,
)


def test_batchnorm_statistics_are_estimated_per_member_slice():
    sel = MemberSelection(3)
    bn = LatePhaseBatchNorm(nn.BatchNorm2d(4, momentum=0.5), 3, sel).train()
    x = torch.randn(8, 4, 5, 5)
    x[4:] = 3 * x[4:] + 2  # the second slice has other statistics
    sel.select([2, 0])
    y = bn(x)
    for g, k in enumerate([2, 0]):
        x_g = x[4 * g : 4 * (g + 1)]
        torch.testing.assert_close(y[4 * g : 4 * (g + 1)], F.batch_norm(x_g, None, None, training=True))
        torch.testing.assert_close(bn.running_mean[k], 0.5 * x_g.mean((0, 2, 3)))
        torch.testing.assert_close(bn.running_var[k], 0.5 + 0.5 * x_g.var((0, 2, 3), unbiased=True))
    assert torch.equal(bn.running_mean[1], torch.zeros(4)) and bn.num_batches_tracked.tolist() == [1, 0, 1]
    with pytest.raises(LatePhaseError, match="cannot be split evenly"):
        bn(torch.randn(7, 4, 2, 2))


def test_tensors_left_out_of_the_members_stay_shared():
    """StackedLayer.member_tensor_names: a BatchNorm with K × (γ, β) and one set of running statistics, which every
    member's slice updates and collapse gives back as it is."""

    class AffineMembers(LatePhaseBatchNorm):  # not registered
        @classmethod
        def member_tensor_names(cls, module: nn.Module) -> tuple[str, ...]:
            return ("weight", "bias")

    bn = nn.BatchNorm1d(3, momentum=0.5)
    running_mean = bn.running_mean
    assert AffineMembers.member_parameters([bn], {}) == 6
    sel = MemberSelection(2)
    layer = AffineMembers(bn, 2, sel, sigma0=0.5, generator=torch.Generator().manual_seed(0)).train()
    assert layer.running_mean is running_mean and layer.weight.shape == (2, 3) and layer.shared_names == [
        "running_mean", "running_var", "num_batches_tracked"]
    x = torch.randn(4, 3)
    sel.select([1, 0])
    y = layer(x)
    for g, k in enumerate([1, 0]):
        x_g = x[2 * g : 2 * (g + 1)]
        expected = F.batch_norm(x_g, None, None, layer.weight[k], layer.bias[k], training=True)
        torch.testing.assert_close(y[2 * g : 2 * (g + 1)], expected)
    torch.testing.assert_close(running_mean, 0.25 * x[:2].mean(0) + 0.5 * x[2:].mean(0))  # slice 0, then slice 1
    assert bn.num_batches_tracked == 2
    original = layer.collapse(bn_stats="fold")
    assert type(original) is nn.BatchNorm1d and original.running_mean is not running_mean
    assert torch.equal(original.running_mean, running_mean) and original.num_batches_tracked == 2
    assert torch.equal(original.weight, member_mean(layer.weight)) and torch.equal(original.bias, member_mean(layer.bias))


def test_an_option_reads_text_and_python_values_strictly():
    """A kind's option converts command-line text and Python values alike (the flags' schema): booleans only from
    true/false/yes/no/1/0, integers not from fractions (an integral float is its integer), numbers finite and in
    range."""
    flag = Option(bool, False, "a flag")
    given = ("true", "YES", " 1 ", "false", "No", "0", True, False, 1, 0)
    assert [flag.coerce(v) for v in given] == [True, True, True, False, False, False, True, False, True, False]
    number, count = Option(float, 1e-3, "a bound", minimum=0), Option(int, None, "a size", minimum=1)
    assert [number.coerce(v) for v in ("1e-2", 0, " 3 ", 0.5)] == [0.01, 0.0, 3.0, 0.5]
    assert [count.coerce(v) for v in ("4", 7, None, 2.0)] == [4, 7, None, 2]
    for option, bad in ((flag, ("maybe", "", "2", 2, 1.0, None, "nan")),
                        (number, ("nan", float("inf"), "-inf", "-1", -0.5, True, "abc", None)),
                        (count, ("2.5", 2.5, "0", 0, False, "x"))):
        for value in bad:
            with pytest.raises(ValueError):
                option.coerce(value)
    help_text = options_help()
    assert "rank1: input_weights=BOOL (the input matrices of LSTM / GRU / RNN layers too; default false)" in help_text
    assert "tolerance=FLOAT >= 0 (" in help_text and "default 0.001)" in help_text and "rank=INT >= 1 (" in help_text


def test_classifier_runs_member_g_on_slice_g():
    sel = MemberSelection(4)
    head = LatePhaseLinear(nn.Linear(5, 3), 4, sel, sigma0=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, 5)
    sel.select([3, 1])
    expected = torch.cat([F.linear(x[:3], head.weight[3], head.bias[3]), F.linear(x[3:], head.weight[1], head.bias[1])])
    torch.testing.assert_close(head(x), expected)


def test_layernorm2d_keeps_channels_first_forward():
    sel = MemberSelection(2)
    ln = timm.layers.LayerNorm2d(6)
    nn.init.normal_(ln.weight)
    lp = LatePhaseLayerNorm(ln, 2, sel)
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(lp(x), ln(x))


def test_sigma0_noise_has_the_per_layer_scale_of_eq2():
    """φ_k − φ0 = σ0 ‖φ0‖/√D ε_k: the per-entry std of the noise equals σ0 ‖φ0‖/√D, ε standard normal."""
    torch.manual_seed(0)
    sigma0, K = 0.3, 64
    source = nn.Linear(40, 25)  # D = 1000 + 25
    phi0 = torch.cat([source.weight.detach().flatten(), source.bias.detach()])
    layer = LatePhaseLinear(source, K, MemberSelection(K), sigma0, torch.Generator().manual_seed(1))
    noise = torch.cat([(layer.weight - source.weight).flatten(1), layer.bias - source.bias], 1)
    scale = sigma0 * phi0.norm() / math.sqrt(phi0.numel())
    eps = noise / scale  # should be standard normal: 64 × 1025 draws
    assert abs(eps.mean().item()) < 0.01
    assert abs(eps.std().item() - 1.0) < 0.01
    # the scale is per layer: a layer with 10× larger weights gets 10× larger noise
    big = nn.Linear(40, 25)
    with torch.no_grad():
        big.weight.copy_(10 * source.weight)
        big.bias.copy_(10 * source.bias)
    big_layer = LatePhaseLinear(big, K, MemberSelection(K), sigma0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(big_layer.weight - big.weight, 10 * (layer.weight - source.weight), rtol=1e-4, atol=1e-5)
    # σ0 = 0: every member equals φ0
    plain = LatePhaseLinear(source, 3, MemberSelection(3))
    assert all(torch.equal(plain.weight[k], source.weight) for k in range(3))


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Linear(6, 4), (5, 6)),
        (nn.Linear(6, 4), (5, 2, 6)),
        (nn.Conv2d(6, 4, 3, padding=1), (4, 6, 5, 5)),
        (nn.Conv2d(6, 4, 3, groups=2), (4, 6, 5, 5)),
        (nn.Conv1d(6, 8, 3), (4, 6, 7)),
    ],
)
def test_rank1_members_equal_w_times_outer_product(module, shape):
    K = 3
    sel = MemberSelection(K)
    layer = Rank1Layer(module, K, sel, sigma0=0.3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(*shape)
    for k in range(K):
        sel.select([k])
        explicit = layer.unload(k)  # W ∘ (u_k v_kᵀ) as an ordinary layer
        torch.testing.assert_close(layer(x), explicit(x), rtol=1e-5, atol=1e-5)
    # the vectorized slices run their own members
    sel.select([2, 0])
    xx = torch.cat([x, x])
    torch.testing.assert_close(layer(xx), torch.cat([layer.unload(2)(x), layer.unload(0)(x)]), rtol=1e-5, atol=1e-5)
    # collapse: W̄ = W ∘ mean_k(u_k v_kᵀ) = mean of the members' explicit weights (linear in W_k)
    averaged = layer.collapse()
    assert type(averaged) is type(module)
    expected = torch.stack([layer.unload(k).weight for k in range(K)]).mean(0)
    torch.testing.assert_close(averaged.weight, expected)
    assert torch.equal(averaged.bias, module.bias)


def test_rank1_initialised_at_one_is_the_original_layer():
    conv = nn.Conv2d(3, 5, 3)
    layer = Rank1Layer(conv, 4, MemberSelection(4))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), conv(x))
    assert layer.weight is conv.weight
    assert list(dict(layer.named_parameters())) == ["weight", "bias", "rank1_u", "rank1_v"]


@pytest.mark.parametrize("vectorized", [False, True])
def test_switching_members_does_not_recompile(vectorized):
    """The member index is a tensor updated in place: torch.compile traces one graph for all K members. A counting
    backend sees every compilation (dynamo's recompile counter stays empty on some torch versions)."""
    import torch._dynamo

    import lpconvert

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = lpconvert.convert(timm.create_model("digits_cnn"), K=10, targets="bn,head").train()
    compiled = torch.compile(model, backend=counting_backend)
    x = torch.randn(4 if vectorized else 2, 1, 8, 8)
    for k in range(10):
        lpconvert.select_members(model, [k, (k + 3) % 10] if vectorized else k)
        compiled(x).sum().backward()
    assert len(graphs) == 1, f"{len(graphs)} compilations for 10 member selections"
    expected = [2] * 10 if vectorized else [1] * 10
    assert model.features[0][1].num_batches_tracked.tolist() == expected  # every member's statistics were updated
    torch._dynamo.reset()
