"""collapse (mean / fold / recalibrate), unload, ensemble prediction and their errors."""

import copy

import pytest
import timm
import torch
from torch import nn

import lpconvert
from lpconvert import LatePhaseError


def _trained_late_phase(K=3):
    """A late-phase resnet whose members really differ (perturbed weights, statistics from different data)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4)
    lp = lpconvert.convert(model, K=K, targets="bn,head", sigma0=0.1, seed=0).train()
    with torch.no_grad():
        for k in range(K):
            lpconvert.select_members(lp, k)
            for _ in range(3):
                lp(torch.randn(4, 3, 32, 32) * (1 + k) + k)
    return lp.eval()


def test_recalibrate_reestimates_statistics_with_one_pass():
    lp = _trained_late_phase()
    data = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    out = lpconvert.collapse(lp, bn_stats="recalibrate", data=[(x, torch.zeros(8)) for x in data])
    # reference: the mean-collapsed model, statistics reset, cumulative average over the same batches
    ref = lpconvert.collapse(lp, bn_stats="mean")
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        for x in data:
            ref(x)
    ref.eval()
    for (n, a), (_, b) in zip(out.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    assert out.bn1.momentum == 0.1 and not out.training  # settings and mode restored
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(out(x), lpconvert.collapse(lp, bn_stats="mean")(x), atol=1e-3)


def test_inplace_collapse_returns_the_same_object():
    lp = _trained_late_phase()
    out = lpconvert.collapse(lp, bn_stats="mean", inplace=True)
    assert out is lp and not lpconvert.late_phase_layers(lp)
    assert lp.fc.weight.shape == (4, 512)


def test_unload_returns_member_k_alone():
    lp = _trained_late_phase()
    x = torch.randn(2, 3, 32, 32)
    single = lpconvert.unload(lp, 2)
    lpconvert.select_members(lp, 2)
    torch.testing.assert_close(single(x), lp(x))
    assert not lpconvert.late_phase_layers(single)


def test_ensemble_predict_is_the_mean_of_member_softmax():
    lp = _trained_late_phase()
    x = torch.randn(5, 3, 32, 32)
    probs = lpconvert.ensemble_predict(lp, x)
    expected = torch.stack([lpconvert.unload(lp, k)(x).softmax(-1) for k in range(3)]).mean(0)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))


def test_collapse_modes_differ_and_fold_keeps_the_mean_statistics():
    lp = _trained_late_phase()
    x = torch.randn(2, 3, 32, 32)
    fold, mean = lpconvert.collapse(lp, bn_stats="fold"), lpconvert.collapse(lp, bn_stats="mean")
    assert not torch.allclose(fold(x), mean(x), atol=1e-4)  # eval: fold averages outputs, mean averages weights
    assert torch.equal(fold.bn1.running_mean, mean.bn1.running_mean)
    assert torch.equal(fold.bn1.running_var, mean.bn1.running_var)
    assert not torch.equal(fold.bn1.weight, mean.bn1.weight)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: lpconvert.collapse(m, bn_stats="average"), "unknown bn_stats 'average'"),
        (lambda m: lpconvert.collapse(m, bn_stats="recalibrate"), "needs data"),
        (lambda m: lpconvert.collapse(m, bn_stats="recalibrate", data=[]), "got no batches"),
        (lambda m: lpconvert.collapse(m, bn_stats="recalibrate", data=[{"x": 1}]), "input_fn"),
        (lambda m: lpconvert.unload(m, 3), r"\[0, 2\]"),
    ],
)
def test_collapse_bad_input(call, message):
    lp = _trained_late_phase()
    before = copy.deepcopy(lp.state_dict())
    with pytest.raises(LatePhaseError, match=message):
        call(lp)
    assert all(torch.equal(before[k], v) for k, v in lp.state_dict().items())


def test_collapse_of_a_model_never_converted():
    with pytest.raises(LatePhaseError, match="never converted"):
        lpconvert.collapse(timm.create_model("resnet10t"))


def test_readme_python_api_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's Python API block itself, executed: a small timm model stands in for the downloaded resnet50, and
    the loader has a number of minibatches that is not a multiple of K with a short last one. The saved directory
    reloads with timm alone and computes what the averaged model computes."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "lpconvert.iterate_members(train_loader" in code and "save_pretrained" in code

    create_model = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: create_model("resnet10t", num_classes=3))
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    train_loader = [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in [4] * 12 + [3]]
    namespace = {"train_loader": train_loader}
    exec(compile(code, "README.md", "exec"), namespace)
    monkeypatch.undo()

    averaged, saved = namespace["averaged"].eval(), tmp_path / "resnet50-lp"
    assert not lpconvert.late_phase_layers(averaged) and namespace["engine"].next_member == 3  # 13 minibatches, K = 10
    reloaded = timm.create_model(f"local-dir:{saved}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded(x), averaged(x), rtol=0, atol=0)
