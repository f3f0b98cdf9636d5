"""Settings in sections: the data and optimisation sections of a run's settings, given-ness, one boolean vocabulary,
kind options read once."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from lpconvert.cli_settings import build_config
from lpconvert.config import FinetuneConfig
from lpconvert.data.settings import DataSettings
from lpconvert.errors import LatePhaseError
from lpconvert.train.optim_settings import OptimSettings


def test_the_sections_are_the_runs_settings_by_name():
    config = FinetuneConfig(model="digits_cnn", img_size=40, crop_pct=0.8, val_split=0.2, lr=0.3, K=4,
                            gamma_theta=0.5, swa_start=2, swa_lr=0.01)
    data, optim = config.data_settings, config.optim_settings
    assert (data.img_size, data.crop_pct, data.val_split, data.seed) == (40, 0.8, 0.2, 0)
    assert (optim.lr, optim.K, optim.swa_start, optim.swa_lr) == (0.3, 4, 2, 0.01)
    assert DataSettings() == FinetuneConfig().data_settings  # one set of defaults: the flags'
    assert data.on("hfds/alice/pets") == dataclasses.replace(data, data=None, dataset="hfds/alice/pets")
    assert data.on("/elsewhere").data == "/elsewhere" and data.on("/elsewhere").train_dir is None


@pytest.mark.parametrize("K, accumulate, gamma, now, late, expected", [
    (4, 1, None, 4, True, 0.25),   # 1/K
    (4, 1, 0.5, 4, True, 0.5),     # the flag
    (4, 1, 0.5, 1, False, 1.0),    # before T0: one member, plain steps
    (1, 3, None, 1, True, 1 / 3),  # the accumulation control: 1/M
    (1, 1, 0.5, 1, True, 1.0),     # plain fine-tuning: no late phase, γθ does not apply
])
def test_gamma_theta_has_one_home(K, accumulate, gamma, now, late, expected):
    optim = FinetuneConfig(K=K, accumulate=accumulate, gamma_theta=gamma).optim_settings
    assert optim.late == (K > 1 or accumulate > 1)
    assert optim.theta_scale(now, late) == pytest.approx(expected)
    assert OptimSettings.of(FinetuneConfig(K=K, accumulate=accumulate, gamma_theta=gamma)) == optim


@pytest.mark.parametrize("word, value", [("yes", True), ("No", False), ("1", True), ("false", False)])
def test_one_boolean_vocabulary_for_flags_recipes_and_kind_options(word, value):
    assert FinetuneConfig(nesterov=word).nesterov is value
    options = FinetuneConfig(late_phase=("batchnorm", "rank1"),
                             late_phase_options=(f"rank1.input_weights={word}",)).kind_options()
    assert options == {"rank1": {"input_weights": value}}
    with pytest.raises(LatePhaseError, match="--nesterov must be true or false"):
        FinetuneConfig(nesterov="maybe")


def test_kind_options_are_read_once_and_follow_their_text(monkeypatch):
    import lpconvert.config as config_module

    config = FinetuneConfig(late_phase=("batchnorm", "hypernet"), late_phase_options=("hypernet.rank=3",))
    reads = []
    original = config_module.check_kind_options
    monkeypatch.setattr(config_module, "check_kind_options", lambda *a, **k: reads.append(1) or original(*a, **k))
    assert config.kind_options() == config.kind_options() == {"hypernet": {"rank": 3}}
    assert reads == []  # read by validate() when the settings were made
    config.late_phase_options = ("hypernet.rank=5",)
    assert config.kind_options() == {"hypernet": {"rank": 5}} and reads == [1]


def test_a_milestone_warning_only_for_milestones_given(caplog):
    with caplog.at_level(logging.WARNING, logger="lpconvert"):
        build_config("digits_cnn", None, {"epochs": 5})  # the default milestone 10 is not the user's
        assert "milestones" not in caplog.text
        build_config("digits_cnn", None, {"epochs": 5, "milestones": (2, 8, 12)})
    assert "--milestones 8,12: those at or after --epochs 5 never take effect" in caplog.text
