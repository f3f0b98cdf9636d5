"""Discovery (torch.fx), plan and convert: what is found, what is refused, all-or-nothing."""

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import lpconvert
from lpconvert import LatePhaseError
from lpconvert.layers import LatePhaseBatchNorm, LatePhaseLinear


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.block(self.stem(x)).mean((2, 3))
        return self.head(F.relu(self.proj(x)))


class FunctionalNorm(Tiny):
    """Calls F.layer_norm itself: a module swap cannot reach that."""

    def forward(self, x):
        x = self.block(self.stem(x)).mean((2, 3))
        x = F.layer_norm(x, (4,))
        return self.head(F.relu(self.proj(x)))


class ReusedNorm(Tiny):
    def forward(self, x):
        x = self.stem(x)
        x = self.stem[1](x)  # the stem's BN reached twice
        return self.head(F.relu(self.proj(self.block(x).mean((2, 3)))))


class Untraceable(Tiny):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 1.0
        return super().forward(x)


def test_plan_counts_and_classifier_found_by_fx():
    assert lpconvert.plan(Tiny(), K=4).layers == {"stem.1": "batchnorm", "block.1": "batchnorm"}  # the default
    report = lpconvert.plan(Tiny(), K=4, targets=("batchnorm", "classifier"))
    assert report.layers == {"stem.1": "batchnorm", "block.1": "batchnorm", "head": "classifier"}
    assert report.params_per_member == 8 + 8 + 6 * 3 + 3
    assert report.model_params == sum(p.numel() for p in Tiny().parameters())
    assert report.traced and not report.functional_calls and not report.reused
    text = str(report)
    assert "batchnorm" in text and "2 layers" in text and f"{report.params_per_member:,}" in text


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, 7)

    def forward(self, x):
        return self.head(self.norm(self.lstm(self.embed(x))[0]))


@pytest.mark.parametrize("model, targets, options", [
    ("cifar_resnet20", ("batchnorm", "classifier"), None),
    ("cifar_resnet20", "rank1", None),
    ("cifar_resnet20", "hypernet", None),
    ("cifar_resnet20", "hypernet", {"hypernet": {"rank": 2, "allow_error": True}}),
    ("recurrent", ("rank1", "norm"), {"rank1": {"input_weights": True}}),
])
def test_plan_counts_the_converted_models_parameters(model, targets, options):
    """`after conversion` is the converted model's parameter count, whether the members replace the original tensors
    (BatchNorm, classifier, norm), multiply a weight that stays (rank-1) or replace a group by θ (hypernetwork)."""
    model = Recurrent() if model == "recurrent" else timm.create_model(model)
    report = lpconvert.plan(model, K=3, targets=targets, options=options)
    converted = lpconvert.convert(model, K=3, targets=targets, options=options)
    assert report.params_after == sum(p.numel() for p in converted.parameters())
    assert f"after conversion {report.params_after:,} parameters" in str(report)


def test_plan_reports_functional_calls_reuse_and_untraceable_models():
    assert any("layer_norm" in f for f in lpconvert.plan(FunctionalNorm()).functional_calls)
    assert lpconvert.plan(ReusedNorm()).reused == ["stem.1"]
    report = lpconvert.plan(Untraceable())
    assert not report.traced and report.layers  # still converts by module type
    with pytest.warns(UserWarning, match="could not trace"):
        lpconvert.convert(Untraceable(), K=2)
    with pytest.warns(UserWarning, match="functional norm call"):
        lpconvert.convert(FunctionalNorm(), K=2)


def test_convert_is_plan_warn_and_convert_from_config():
    """What the fine-tuner composes: the plan's warnings (attributed to the caller, as convert's are) and its config
    give the model that convert gives."""
    report = lpconvert.plan(FunctionalNorm(), K=2, targets="bn,head")
    config = report.late_phase_config(0.1, 3)
    assert config == lpconvert.LatePhaseConfig(2, report.targets, 0.1, 3, report.options)
    with pytest.warns(UserWarning, match="functional norm call") as via_plan:
        report.warn(stacklevel=1)
    torch.manual_seed(0)
    with pytest.warns(UserWarning) as via_convert:
        converted = lpconvert.convert(FunctionalNorm(), K=2, targets="bn,head", sigma0=0.1, seed=3)
    assert [str(w.message) for w in via_plan] == [str(w.message) for w in via_convert]
    assert {w.filename for w in [*via_plan, *via_convert]} == {__file__}
    torch.manual_seed(0)
    rebuilt = lpconvert.convert_from_config(FunctionalNorm(), config)
    assert lpconvert.late_phase_config(converted) == config
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in converted.state_dict().items())


def test_timm_norm_act_layers_stay_modules_and_keep_their_activation():
    model = timm.create_model("efficientnet_b0", num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    expected = model(x)
    pretrained_cfg = model.pretrained_cfg
    lpconvert.convert(model, K=2, targets="bn,head")
    layers = lpconvert.late_phase_layers(model)
    assert sum(isinstance(m, LatePhaseBatchNorm) for m in layers.values()) == 49
    assert type(model.bn1.template).__name__ == "BatchNormAct2d" and isinstance(model.bn1.act, nn.SiLU)
    assert model.pretrained_cfg is pretrained_cfg and callable(model.get_classifier)
    assert isinstance(model.get_classifier(), LatePhaseLinear)
    torch.testing.assert_close(model(x), expected)


def test_shared_parameters_keep_names_and_identity():
    model = Tiny()
    conv_weight = model.stem[0].weight
    lpconvert.convert(model, K=3, targets="bn,head")
    assert model.stem[0].weight is conv_weight
    state = model.state_dict()
    assert state["stem.1.weight"].shape == (3, 4) and state["head.weight"].shape == (3, 3, 6)
    assert set(state) == set(Tiny().state_dict())


def test_include_exclude_patterns_and_kinds():
    report = lpconvert.plan(Tiny(), targets="bn", include="block.*")
    assert report.layers == {"block.1": "batchnorm"}
    report = lpconvert.plan(Tiny(), targets=("norm", "head"), exclude=["stem.*"])
    assert report.layers == {"block.1": "batchnorm", "head": "classifier"}
    report = lpconvert.plan(Tiny(), targets="rank1,classifier")
    assert report.layers == {"stem.0": "rank1", "block.0": "rank1", "proj": "rank1", "head": "classifier"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"K": 0}, "integer >= 1"),
        ({"K": 2.0}, "integer >= 1"),
        ({"K": True}, "integer >= 1"),
        ({"targets": "batchnrom"}, "unknown late-phase target 'batchnrom'"),
        ({"targets": "layernorm"}, r"no layernorm layers to convert; kinds present: batchnorm \(2\), classifier \(1\), rank1 \(4\)"),
        ({"include": "nothing.*"}, "matches no"),
        ({"exclude": ["stem.1", "nope"]}, "'nope' matches no"),
        ({"sigma0": -1.0}, "sigma0"),
    ],
)
def test_convert_bad_input_leaves_model_untouched(kwargs, message):
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LatePhaseError, match=message):
        lpconvert.convert(model, **{"K": 2, **kwargs})
    assert not lpconvert.late_phase_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_convert_twice_is_refused():
    model = lpconvert.convert(Tiny(), K=2)
    with pytest.raises(LatePhaseError, match="already late-phase"):
        lpconvert.convert(model, K=2)


def test_convert_is_all_or_nothing(monkeypatch):
    model = Tiny()
    real_init = LatePhaseLinear.__init__

    def failing_init(self, *args, **kwargs):
        raise RuntimeError("simulated failure while building the classifier")

    monkeypatch.setattr(LatePhaseLinear, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="simulated"):
        lpconvert.convert(model, K=2, targets="bn,head")
    monkeypatch.setattr(LatePhaseLinear, "__init__", real_init)
    assert not lpconvert.late_phase_layers(model)
    assert isinstance(model.stem[1], nn.BatchNorm2d) and type(model.stem[1]) is nn.BatchNorm2d


def test_select_members_validates_indices():
    model = lpconvert.convert(Tiny(), K=2)
    with pytest.raises(LatePhaseError, match=r"\[0, 1\]"):
        lpconvert.select_members(model, 2)
    with pytest.raises(LatePhaseError, match="no late-phase layers"):
        lpconvert.select_members(Tiny(), 0)


def test_a_1x1_convolution_producing_the_logits_is_the_classifier():
    """torchvision's SqueezeNet ends in Conv2d(512, classes, 1) → ReLU → global pooling: that conv is the head."""
    import torchvision

    model = torchvision.models.squeezenet1_1(num_classes=5).eval()
    assert lpconvert.plan(model, targets="classifier").layers == {"classifier.1": "classifier"}
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    lp = lpconvert.convert(copy.deepcopy(model), K=3, targets="classifier", sigma0=0.1, seed=0)
    assert lp.classifier[1].weight.shape == (3, 5, 512, 1, 1)
    lpconvert.select_members(lp, 1)
    torch.testing.assert_close(lpconvert.unload(lp, 1)(x), lp(x))
    averaged = lpconvert.collapse(lp)
    torch.testing.assert_close(averaged.classifier[1].weight, lp.classifier[1].weight.mean(0))
    fresh = torchvision.models.squeezenet1_1(num_classes=5)
    fresh.load_state_dict(averaged.state_dict(), strict=True)
    assert not torch.allclose(averaged(x), expected)


def test_convert_reports_missing_classifier_for_a_3x3_conv_head():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lpconvert.convert(model, K=2, targets="bn,head")
    assert any("no classifier" in str(w.message) for w in caught)


def test_a_model_without_the_kind_asked_for_is_told_what_would_work():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32)
    with pytest.raises(LatePhaseError) as error:
        lpconvert.convert(model, K=2)  # the default, BatchNorm: a ViT has none
    message = str(error.value)
    assert "VisionTransformer has no batchnorm layers" in message and "layernorm (" in message
    assert "--late-phase layernorm,classifier" in message and "\n" not in message
    lpconvert.convert(model, K=2, targets="layernorm,classifier")  # what the message proposes works


@pytest.mark.parametrize("options, message", [
    ({"rank1": {"foo": 1}}, r"unknown option rank1\.foo; rank1's options are input_weights$"),
    ({"hypernet": {"rnak": 1}}, r"unknown option hypernet\.rnak; hypernet's options are rank, tolerance, allow_error$"),
    ({"batchnorm": {"momentum": 0.1}}, r"unknown option batchnorm\.momentum; batchnorm has no options$"),
    ({"hypernets": {"rank": 2}}, r"unknown late-phase kind 'hypernets'; kinds with options: hypernet, rank1$"),
    ({"hypernet": {"tolerance": float("nan")}}, r"hypernet\.tolerance must be a finite number >= 0, got nan$"),
    ({"hypernet": {"tolerance": "abc"}}, r"hypernet\.tolerance must be a finite number >= 0, got 'abc'$"),
    ({"hypernet": {"tolerance": -1e-3}}, r"hypernet\.tolerance must be a finite number >= 0, got -0\.001$"),
    ({"hypernet": {"rank": 0}}, r"hypernet\.rank must be an integer >= 1, got 0$"),
    ({"hypernet": {"rank": 2.5}}, r"hypernet\.rank must be an integer >= 1, got 2\.5$"),
    ({"hypernet": {"rank": True}}, r"hypernet\.rank must be an integer >= 1, got True$"),
    ({"hypernet": {"allow_error": "nope"}}, r"hypernet\.allow_error must be a boolean \(true/false/yes/no/1/0\)"),
    ({"rank1": {"input_weights": 2}}, r"rank1\.input_weights must be a boolean"),
    ({"rank1": ["input_weights"]}, r"the options of rank1 must be a mapping"),
])
def test_kind_options_are_checked_against_their_declarations(options, message):
    """Through the Python API as on the command line: an unknown kind or option is refused with the valid ones, a
    value must have the option's type and lie in its range — one line, a LatePhaseError, the model untouched."""
    model = Recurrent()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LatePhaseError, match="^late-phase options: " + message) as error:
        lpconvert.convert(model, K=2, targets=("rank1", "hypernet", "batchnorm", "layernorm"), options=options)
    assert "\n" not in str(error.value)
    assert not lpconvert.late_phase_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("value, factored", [
    ("no", ["weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse"]),
    (0, ["weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse"]),
    (" Yes ", ["weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse", "weight_hh_l0_reverse",
               "weight_ih_l1", "weight_hh_l1", "weight_ih_l1_reverse", "weight_hh_l1_reverse"]),
])
def test_boolean_options_read_strictly_and_are_saved_converted(value, factored):
    """``input_weights: "no"`` does not factor the input matrices (it did: a non-empty string was true); the plan and
    the saved configuration hold every option of the converted kinds, converted, defaults filled in."""
    report = lpconvert.plan(Recurrent(), K=2, targets="rank1,hypernet", include="lstm",
                            options={"rank1": {"input_weights": value}})
    expected = {"rank1": {"input_weights": factored[0].startswith("weight_ih")},
                "hypernet": {"rank": None, "tolerance": 1e-3, "allow_error": False}}
    assert report.options == expected
    lp = lpconvert.convert(Recurrent(), K=2, targets="rank1", include="lstm",
                           options={"rank1": {"input_weights": value}})
    assert lp.lstm.factored == factored
    assert lpconvert.late_phase_config(lp).options == {"rank1": expected["rank1"]}


def test_an_option_for_layers_the_kind_does_not_convert_is_refused():
    """rank-1's input_weights concerns recurrent layers: on a model without one it would silently do nothing."""
    with pytest.raises(LatePhaseError, match=r"^late-phase options: rank1\.input_weights concerns RNNBase layers, but "
                                             r"none of the rank1 layers here \(4\) is one; drop the option$"):
        lpconvert.plan(Tiny(), K=2, targets="rank1", options={"rank1": {"input_weights": True}})
    with pytest.raises(LatePhaseError, match=r"none of the rank1 layers here \(1\)"):
        lpconvert.plan(Recurrent(), K=2, targets="rank1", exclude="lstm", options={"rank1": {"input_weights": False}})
    assert lpconvert.plan(Recurrent(), K=2, targets="rank1", options={"rank1": {"input_weights": True}}).layers == {
        "lstm": "rank1", "head": "rank1"}


def test_a_saved_configuration_is_checked_like_the_api():
    """convert_from_config (a run resumed, a model loaded) reads the saved options through the same declarations."""
    config = lpconvert.plan(Recurrent(), K=2, targets="rank1", include="lstm").late_phase_config(0.0, None)
    config.options = {"rank1": {"input_weights": "maybe"}}
    with pytest.raises(LatePhaseError, match=r"rank1\.input_weights must be a boolean"):
        lpconvert.convert_from_config(Recurrent(), config)
    config.options = {"rank1": {"input_weights": "1"}}
    assert lpconvert.convert_from_config(Recurrent(), config).lstm.factored[0] == "weight_ih_l0"
