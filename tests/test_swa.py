"""SWA from the start (``--swa-start 0``), every ``--swa-freq`` minibatches, annealed into ``--swa-lr`` as torch's
SWALR: the average is the plain mean of the models it sampled, for K = 1 and for late-phase models."""

import math

import pytest
import torch

from lpconvert.config import FinetuneConfig
from lpconvert.errors import LatePhaseError
from lpconvert.train.finetune import DIGITS, RunInterrupted, run
from lpconvert.train.optim import lr_factor

FAST = dict(model="digits_cnn", pretrained=False, data=DIGITS, batch_size=120, workers=0, quiet=True, lr=0.05,
            schedule="constant", log_every=5, late_phase=("batchnorm", "classifier"))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_swa_from_the_start_is_the_mean_of_the_models_it_sampled(tmp_path):
    """K = 1, one minibatch per iteration: a sample after minibatches 4 and 8 of 9. Stopping right after each sample
    keeps the model it added; the final average equals their hand-computed mean."""
    settings = dict(FAST, K=1, epochs=1, swa_start=0, swa_freq=4, swa_lr=0.05, output=str(tmp_path / "run"))
    sampled = []
    for after in (4, 8):
        with pytest.raises(RunInterrupted):
            run(FinetuneConfig(**settings, resume=str(tmp_path / "run") if sampled else None), stop_after=after)
        checkpoint = _load(tmp_path / "run" / "checkpoints" / "last.pt")
        assert checkpoint["position"]["iteration"] == after and checkpoint["swa"]["n_averaged"].item() == after // 4
        sampled.append(checkpoint["model"])
    run(FinetuneConfig(**settings, resume=str(tmp_path / "run")))
    final = _load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert final["position"]["iteration"] == 9  # the training digits (held-out ones left out) in batches of 120
    assert final["swa"]["n_averaged"].item() == 2
    parameters = [name for name in final["model"] if name.endswith(("weight", "bias"))]
    assert len(parameters) > 5
    for name in parameters:
        mean = torch.stack([s[name].double() for s in sampled]).mean(0)
        torch.testing.assert_close(final["swa"][f"module.{name}"].double(), mean, rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(final["swa"][f"module.{name}"], final["model"][name]), name  # an average, not the last


def test_swa_frequency_counts_minibatches_so_every_K_samples_equally(tmp_path):
    counts = {}
    for K in (1, 3):
        run(FinetuneConfig(**FAST, K=K, epochs=2, swa_start=1, swa_freq=3, output=str(tmp_path / f"K{K}")))
        counts[K] = _load(tmp_path / f"K{K}" / "checkpoints" / "last.pt")["swa"]["n_averaged"].item()
    assert counts == {1: 3, 3: 3}  # epoch 2's 9 minibatches: K = 1 in 9 iterations, K = 3 in 3


def test_swa_learning_rate_anneals_like_swalr():
    config = FinetuneConfig(model="digits_cnn", lr=0.1, schedule="linear", anneal_start=0, anneal_end=10, lr_end=0.0,
                            epochs=20, swa_start=4, swa_lr=0.02, swa_anneal_epochs=2)
    before = 1.0 - 4 / 10  # the linear schedule's factor at the SWA start
    assert lr_factor(config.optim_settings, 3.5) == pytest.approx(1.0 - 3.5 / 10)
    assert lr_factor(config.optim_settings, 4) == pytest.approx(before)
    assert lr_factor(config.optim_settings, 5) == pytest.approx(before + (0.2 - before) * (1 - math.cos(math.pi / 2)) / 2)
    assert lr_factor(config.optim_settings, 6) == pytest.approx(0.2) and lr_factor(config.optim_settings, 19) == pytest.approx(0.2)
    at_once = FinetuneConfig(**{**config.to_dict(), "swa_anneal_epochs": 0})
    assert lr_factor(at_once.optim_settings, 4) == pytest.approx(0.2)


@pytest.mark.parametrize("settings, problem", [
    (dict(swa_freq=5), "--swa-freq needs --swa-start"),
    (dict(swa_start=0, swa_freq=0), "--swa-freq must be a positive integer"),
    (dict(swa_start=0, swa_anneal_epochs=2), "--swa-anneal-epochs anneals into --swa-lr"),
])
def test_swa_settings_are_checked(settings, problem):
    with pytest.raises(LatePhaseError, match=problem):
        FinetuneConfig(model="digits_cnn", **settings)
