"""Late-phase hypernetwork embeddings: W^(l) = θ φ^(l), θ shared by a group of layers of one shape. Exact conversion of a
pretrained model, exact collapse (W is linear in φ), a truncated-SVD rank with its error, one θ with one optimizer
state in the engine, and the engine against a plain K-copy Algorithm 1."""

import copy
from functools import partial

import pytest
import timm
import torch
from algorithm1 import reference_algorithm1

import lpconvert
from lpconvert import LatePhaseEngine
from lpconvert.config import FinetuneConfig
from lpconvert.convert.surgery import plan_or_refuse
from lpconvert.layers import HypernetLayer

K = 3


def _resnet20():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", num_classes=10).double()
    with torch.no_grad():  # non-trivial BN statistics
        model.train()(torch.randn(16, 3, 32, 32, dtype=torch.float64))
    return model.eval()


def test_groups_exact_conversion_and_collapse():
    model = _resnet20()
    report = lpconvert.plan(model, K=K, targets="hypernet")
    groups = [t.modules for t in report.targets]
    # per stage, the 3×3 convolutions of one shape: 6 in stage 1, 5 in stages 2 and 3 (their first conv differs)
    assert [len(g) for g in groups] == [6, 5, 5] and groups[1][0] == "layer2.0.conv2"
    assert report.params_per_member == 6 * 6 + 5 * 5 + 5 * 5
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    expected = model(x)

    exact = lpconvert.convert(copy.deepcopy(model), K=K, targets="hypernet")
    assert exact.layer1[0].conv1.hyper_theta is exact.layer1[2].conv2.hyper_theta  # one θ per group
    assert torch.equal(exact(x), expected)
    for mode in ("fold", "mean"):
        state = lpconvert.collapse(exact, bn_stats=mode).state_dict()
        assert [k for k, v in model.state_dict().items() if not torch.equal(state[k], v)] == []

    lp = lpconvert.convert(copy.deepcopy(model), K=K, targets="hypernet", sigma0=0.1, seed=0)
    layer = lp.layer2[1].conv1
    assert layer.hyper_embedding.shape == (K, 5)
    for k in range(K):
        lpconvert.select_members(lp, k)
        torch.testing.assert_close(lp(x), lpconvert.unload(lp, k)(x), rtol=0, atol=1e-10)
    averaged = lpconvert.collapse(lp)
    fresh = timm.create_model("cifar_resnet20", num_classes=10).double()
    fresh.load_state_dict(averaged.state_dict(), strict=True)
    torch.testing.assert_close(averaged.layer2[1].conv1.weight,
                               (layer.hyper_theta @ layer.hyper_embedding.mean(0)).view(32, 32, 3, 3))
    assert not torch.allclose(averaged(x), expected)


def test_a_smaller_embedding_by_truncated_svd_reports_and_refuses_its_error():
    model = _resnet20()
    with pytest.raises(lpconvert.LatePhaseError, match="relative error of 0.[0-9]+ .> 0.001.*allow_error"):
        lpconvert.plan(model, targets="hypernet", options={"hypernet": {"rank": 2}})
    report = lpconvert.plan(model, targets="hypernet", options={"hypernet": {"rank": 2, "allow_error": True}})
    assert report.params_per_member == 2 * 16 and len(report.notes) == 3 and "rank 2" in report.notes[0]
    # a group whose weights have rank 2 is reproduced exactly by a rank-2 hypernetwork
    with torch.no_grad():
        a, b = model.layer1[0].conv2.weight.clone(), model.layer1[1].conv1.weight.clone()
        for i, name in enumerate(["0.conv1", "0.conv2", "1.conv1", "1.conv2", "2.conv1", "2.conv2"]):
            model.layer1.get_submodule(name).weight.copy_(a + (i / 5) * b)
    low = lpconvert.plan(model, targets="hypernet", include="layer1.*", options={"hypernet": {"rank": 2}})
    assert float(low.notes[0].rsplit(" ", 1)[1]) < 1e-12
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    converted = lpconvert.convert(copy.deepcopy(model), K=K, targets="hypernet", include="layer1.*",
                                  options={"hypernet": {"rank": 2}})
    torch.testing.assert_close(converted(x), model(x), rtol=1e-9, atol=1e-9)


def test_the_reconstruction_guard_cannot_be_bypassed_by_option_values():
    """Issue #19: ``--late-phase-options hypernet.tolerance=nan`` and ``hypernet.allow_error=no`` ("no" read as true)
    let a rank-2 embedding that wrecks the model through. The flags are read by the kind's declared options, as the
    Python API's values are: nan is refused, "no" is false, and the guard refuses the error."""
    model = _resnet20()
    with pytest.raises(lpconvert.LatePhaseError, match=r"^--late-phase-options: hypernet\.tolerance must be a finite "
                                                       r"number >= 0, got 'nan'$"):
        FinetuneConfig(model="cifar_resnet20", late_phase=("hypernet",),
                       late_phase_options=("hypernet.rank=2", "hypernet.tolerance=nan"))
    for given in ({"late_phase_options": ("hypernet.rank=2", "hypernet.allow_error=no")},
                  {"late_phase_options": ("hypernet.rank=2", "hypernet.allow_error=0", "hypernet.tolerance=0.05")}):
        config = FinetuneConfig(model="cifar_resnet20", late_phase=("hypernet",), **given)
        assert config.kind_options()["hypernet"]["allow_error"] is False
        with pytest.raises(lpconvert.LatePhaseError, match=r"relative error of 0\.807 \(> 0\.(001|05)\); raise "
                                                           r"hypernet\.rank, or set hypernet\.allow_error=true"):
            plan_or_refuse(model, 3, config.late_phase, include=None, exclude=None, options=config.kind_options())
    with pytest.raises(lpconvert.LatePhaseError, match="relative error"):
        lpconvert.convert(model, K=3, targets="hypernet", options={"hypernet": {"rank": 2, "allow_error": "no"}})
    config = FinetuneConfig(model="cifar_resnet20", late_phase=("hypernet",),
                            late_phase_options=("hypernet.rank=2", "hypernet.allow_error=yes"))
    report = plan_or_refuse(model, 3, config.late_phase, include=None, exclude=None, options=config.kind_options())
    assert report.options == {"hypernet": {"rank": 2, "tolerance": 1e-3, "allow_error": True}}
    with pytest.raises(lpconvert.LatePhaseError, match=r"^late-phase options: hypernet\.rank must be at most 5 \(the "
                                                       r"layers of the group of shape \(32, 32, 3, 3\)\), got 6; lower it$"):
        lpconvert.plan(model, targets="hypernet", options={"hypernet": {"rank": 6, "allow_error": True}})


@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
def test_engine_one_theta_per_group_equals_a_plain_k_copy_algorithm_1(mode):
    """θ of a group is one parameter with one optimizer state; embeddings get no weight decay (U_φ's 0.5 is not
    applied to them); everything follows the reference: K separate K = 1 models, θ shared by hand."""
    base = _resnet20().train()
    targets = ("hypernet", "batchnorm")
    start = lpconvert.convert(copy.deepcopy(base), K=K, targets=targets, sigma0=0.2, seed=1)
    lp = copy.deepcopy(start)
    theta_factory = partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-3)
    phi_factory = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.5)
    g = torch.Generator().manual_seed(2)
    batches = [([torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(K)],
                [torch.randint(0, 10, (4,), generator=g) for _ in range(K)]) for _ in range(3)]
    engine = LatePhaseEngine(lp, theta_factory, phi_factory, gamma_theta=1.0, mode=mode)
    thetas = {id(m.hyper_theta) for m in lp.modules() if isinstance(m, HypernetLayer)}
    assert len(thetas) == 3 and sum(id(p) in thetas for p in engine.theta_params) == 3  # 16 layers, 3 groups
    for xs, ys in batches:
        engine.step(xs, ys)

    copies = []
    for k in range(K):
        one = lpconvert.convert(copy.deepcopy(base), K=1, targets=targets)
        with torch.no_grad():
            for name, tensor in one.state_dict().items():
                member = start.state_dict()[name]
                if tensor.shape[:1] == (1,) and member.shape == (K, *tensor.shape[1:]):
                    tensor.copy_(member[k : k + 1])
        copies.append(one)

    def is_late(name):
        return name.endswith(("hyper_embedding", "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"))

    def phi_optimizer(m):  # the engine's U_φ: SGD with weight decay, none on the embeddings
        return torch.optim.SGD([{"params": [p for n, p in m.named_parameters() if is_late(n) and "hyper" not in n]},
                                {"params": [p for n, p in m.named_parameters() if "hyper_embedding" in n],
                                 "weight_decay": 0.0}], lr=0.1, momentum=0.9, weight_decay=0.5)

    theta, copies = reference_algorithm1(copies, batches, theta_factory, phi_optimizer, 1.0, is_late)

    state = lp.state_dict()
    for n, p in theta.items():
        torch.testing.assert_close(state[n], p.detach(), rtol=0, atol=1e-8, msg=n)
    moved = state["layer3.0.conv2.hyper_theta"] - start.state_dict()["layer3.0.conv2.hyper_theta"]
    assert moved.abs().max() > 1e-6
    for k, m in enumerate(copies):
        for n, p in m.named_parameters():
            if is_late(n):
                torch.testing.assert_close(state[n][k], p.detach()[0], rtol=0, atol=1e-8, msg=f"member {k} {n}")


@pytest.mark.parametrize("kinds", ["hypernet,bn", "rank1"])
def test_inspect_and_finetune_from_the_command_line(tmp_path, monkeypatch, kinds):
    """The new kinds on a registered model (`cifar_resnet20`), through `lpconvert inspect` and `lpconvert finetune`."""
    import json

    import safetensors.torch
    from click.testing import CliRunner
    from PIL import Image

    from lpconvert.cli import main

    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "images" / split / label).mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (32, 32), (30 * i, 100 if label == "a" else 10, 50)).save(
                    tmp_path / "images" / split / label / f"{i}.png")
    runner = CliRunner()
    inspected = runner.invoke(main, ["inspect", "cifar_resnet20", "--late-phase", kinds], catch_exceptions=False)
    assert inspected.exit_code == 0 and kinds.split(",")[0] in inspected.output, inspected.output
    result = runner.invoke(main, ["finetune", "cifar_resnet20", "--no-pretrained", "--num-classes", "2", "--data",
                                  "images", "--late-phase", kinds, "--K", "2", "--epochs", "1", "--batch-size", "4",
                                  "--workers", "0", "--quiet", "--schedule", "constant", "--output", "run"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    fresh = timm.create_model("cifar_resnet20", num_classes=2)
    fresh.load_state_dict(safetensors.torch.load_file(str(tmp_path / "run" / "model" / "model.safetensors")),
                          strict=True)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert {t["kind"] for t in checkpoint["late_phase"]["targets"]} == set(lpconvert.layers.resolve_kinds(kinds))
    assert json.loads((tmp_path / "run" / "report.json").read_text())["K"] == 2
    # the run reloads by its saved LatePhaseConfig (groups included) and collapses to what it published
    late, _ = lpconvert.load_late_phase(tmp_path / "run", "last")
    published = fresh.state_dict()
    assert all(torch.equal(v, published[k]) for k, v in lpconvert.collapse(late).state_dict().items())
