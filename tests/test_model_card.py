"""The card tells a Hub visitor only what is true: whether the checkpoint beat its start (with the uncertainty one
run has), what loading needs, and — for a start no epoch beat — that it is the start, unchanged."""

from lpconvert.publish.loading import ModelSource
from lpconvert.publish.model_card import render_model_card, sampling_error

DATASET = {"type": "cifar10", "name": "cifar10", "split": "train", "held_out": True, "num_images": 100}
TEST = {"name": "cifar10", "split": "test", "num_images": 10_000}
METRICS = {"base": {"top1": 100.0}, "final": {"top1": 100.0}, "dataset": DATASET,
           "base_test": {"top1": 91.73}, "test": {"top1": 91.75}, "test_dataset": TEST}


def _card(architecture, averaging, metrics=METRICS, hparams=None):
    source = ModelSource(spec=architecture, library="timm", origin="timm", architecture=architecture)
    return render_model_card(source, metrics=metrics, averaging=averaging, hparams=hparams)


def test_the_card_leads_with_the_start_and_the_uncertainty_of_one_run():
    card = _card("resnet18", {"K": 10, "run_K": 10, "late_phase": "batchnorm", "epoch": 3, "select": "last"})
    body = card.split("---\n", 2)[2]
    first = body.split("\n\n")[1]
    assert first.startswith("**Against the starting checkpoint** — ")
    assert "top-1 on cifar10, test split, 10,000 images: 91.73 % → 91.75 % (+0.02 points; one accuracy on 10,000 " \
           f"images is uncertain by about ±{sampling_error(91.75, 10_000):.2f} points)" in first
    assert "One run gives no interval over seeds" in first
    assert abs(sampling_error(91.75, 10_000) - 0.54) < 0.01  # 1.96 √(p(1−p)/N) in points
    # held-out training images are named as what they are, and kept out of the model-index
    assert "cifar10, training images held out (never trained on), 100 images" in body
    meta = card.split("---\n", 2)[1]
    assert "split: test" in meta and "split: train" not in meta and "validation" not in meta
    # a timm architecture loads without lpconvert
    assert "loads without lpconvert" in body and "(timm)" in body


def test_an_lpconvert_architecture_says_it_needs_lpconvert():
    card = _card("cifar_resnet20", {"K": 1, "run_K": 1, "epoch": 2, "select": "last"})
    assert "loads without lpconvert" not in card and "(timm)" not in card
    assert "an lpconvert architecture, registered with timm when lpconvert is imported" in card
    assert "loads with timm once lpconvert is installed" in card and "pip install lpconvert" in card


def test_a_start_no_epoch_beat_is_published_as_the_start_unchanged():
    card = _card("resnet18", {"K": 1, "run_K": 2, "late_phase": None, "epoch": 0, "select": "best"},
                 hparams={"K": 1, "gamma_theta": 0.5, "U_phi": "sgd lr=0.01"})
    body = card.split("---\n", 2)[2]
    assert "# resnet18: the starting checkpoint, unchanged" in body
    assert "**Did fine-tuning help? No**: this is the starting checkpoint, unchanged" in body
    assert "lpconvert tried fine-tuning with K = 2 late-phase members, and no result beat the starting checkpoint" in body
    assert "without late-phase weights (K = 1)" not in body and "plain fine-tuning" not in body
    hyper = body.split("## Hyper-parameters\n", 1)[1].split("\n## ", 1)[0]
    assert "None apply" in hyper and "gamma_theta" not in hyper and "U_phi" not in hyper
