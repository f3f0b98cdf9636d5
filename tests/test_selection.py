"""Selection never touches the test set: a validation set held out of the training images when the data's only
evaluation split is a test set, the test set measured once on the exported model, and "best" that includes the
starting checkpoint."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from lpconvert.compare.plan import Arm, arm_config
from lpconvert.config import FinetuneConfig
from lpconvert.data import DIGITS, MemoryImages, build_data
from lpconvert.errors import LatePhaseError
from lpconvert.train.finetune import run

MODEL = "cifar_lenet5_bn"
CLASSES = ("ant", "bee", "cat", "dog")


def _tree(root: Path, evaluation: str) -> Path:
    """train/: 10 noise PNGs of 32x32 per class; `evaluation`/: 3 per class."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), (evaluation, 3)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def _data(root: Path, **settings):
    config = FinetuneConfig(**{"model": MODEL, "data": str(root), "workers": 0, **settings})
    return build_data(config.data_settings, timm.create_model(MODEL, num_classes=len(CLASSES)))


@pytest.mark.parametrize("in_memory", ["off", "on"])
def test_a_test_split_makes_a_stratified_held_out_validation_set(tmp_path, in_memory):
    data = _data(_tree(tmp_path, "test"), val_split=0.2, train_transform="cifar", data_in_memory=in_memory)
    assert data.val_role == "held-out" and len(data.test) == 12
    assert isinstance(data.val, MemoryImages) == (in_memory == "on")
    train_files = {path for path, _ in data.train.dataset.samples}
    val_files = {path for path, _ in data.val.samples}
    assert len(train_files) == 32 and len(val_files) == 8 and not train_files & val_files  # 20 % of 40, disjoint
    assert all("/train/" in path for path in val_files)
    assert Counter(label for _, label in data.val.samples) == {0: 2, 1: 2, 2: 2, 3: 2}  # stratified: 2 per class
    # validation images are not augmented: the same tensor every time, and the test set's preprocessing
    first, again = data.val[0][0], data.val[0][0]
    assert torch.equal(first, again) and first.shape == data.test[0][0].shape == (3, 32, 32)
    assert set(data.fingerprint) == {"train", "val", "test"} and data.fingerprint["test"]["num_files"] == 12
    # the same images for every --seed (the hold-out follows --subset-seed), others for another --subset-seed
    assert {p for p, _ in _data(tmp_path, val_split=0.2, seed=5).val.samples} == val_files
    assert {p for p, _ in _data(tmp_path, val_split=0.2, subset_seed=1).val.samples} != val_files


def test_a_validation_split_is_used_as_it_is(tmp_path):
    data = _data(_tree(tmp_path / "a", "val"), val_split=0.2)
    assert data.val_role == "validation" and data.test is None and len(data.val) == 12 and len(data.train) == 40
    data = _data(_tree(tmp_path / "b", "test"), val_split=0.0, select="last")
    assert data.val_role == "test" and data.test is None and len(data.val) == 12 and len(data.train) == 40


def test_select_best_on_the_test_set_is_refused_before_anything_is_written(tmp_path):
    root = _tree(tmp_path / "data", "test")
    output = tmp_path / "run"
    with pytest.raises(LatePhaseError, match="--select best would choose the epoch on the test set"):
        run(FinetuneConfig(model=MODEL, pretrained=False, num_classes=4, data=str(root), val_split=0.0, K=1,
                           epochs=1, batch_size=8, workers=0, quiet=True, output=str(output)))
    assert not output.exists()
    with pytest.raises(LatePhaseError, match="--val-split must lie in"):
        FinetuneConfig(val_split=1.0)


def test_compare_holds_nothing_out(tmp_path):
    base = FinetuneConfig(model=MODEL, data=str(tmp_path), K=10, epochs=3)
    assert base.val_split == 0.1  # fine-tuning's default
    config = arm_config(base, Arm("late", {"sigma0": "0.5"}), seed=0, output=tmp_path / "out")
    assert config.val_split == 0.0 and config.select == "last"


FAST = dict(data=DIGITS, batch_size=40, workers=0, quiet=True, schedule="constant", log_every=5)


def test_a_run_that_makes_the_model_worse_exports_the_starting_checkpoint(tmp_path):
    start = run(FinetuneConfig(model="digits_cnn", pretrained=False, K=1, epochs=2, lr=0.05, select="last",
                               output=str(tmp_path / "start"), **FAST))
    assert start["validation"] == "held-out" and start["test_top1"] > 60
    # σ0 = 3 buries the classifier's members in noise: their average is far worse than the start, whatever the lr
    report = run(FinetuneConfig(model=f"local-dir:{start['model_dir']}", K=2, epochs=1, lr=1e-6, sigma0=3.0,
                                late_phase=("classifier",), output=str(tmp_path / "worse"), **FAST))
    rows = [json.loads(line) for line in (tmp_path / "worse" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["val_top1"] < rows[0]["val_top1"] - 10
    assert report["epoch"] == 0 and report["select"] == "best" and report["K"] == 1
    assert report["final_top1"] == report["start_top1"] == rows[0]["val_top1"] == start["final_top1"]
    assert "starting model is exported unchanged" in report["note"]
    assert report["test_top1"] == start["test_top1"]  # the same model, measured once on the same test digits
    exported = safetensors.torch.load_file(str(tmp_path / "worse" / "model" / "model.safetensors"))
    original = safetensors.torch.load_file(str(tmp_path / "start" / "model" / "model.safetensors"))
    assert exported.keys() == original.keys()
    for name in original:
        assert torch.equal(exported[name], original[name]), name


def test_the_test_split_is_read_only_after_the_last_epoch(tmp_path, monkeypatch):
    """Every read of a test image is logged beside the training epochs: all of them come after the last epoch, each
    image exactly once (the exported model's one evaluation)."""
    from torch.utils.data import Dataset

    from lpconvert.train import finetune, job

    events: list[str] = []

    class Recorded(Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            events.append(f"test {index}")
            return self.dataset[index]

    real_build, real_epoch = job.build_data, finetune.train_one_epoch

    def build(*args, **kwargs):
        data = real_build(*args, **kwargs)
        data.test = Recorded(data.test)
        return data

    def epoch(*args, **kwargs):
        events.append("epoch")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(job, "build_data", build)
    monkeypatch.setattr(finetune, "train_one_epoch", epoch)
    report = run(FinetuneConfig(model="digits_cnn", pretrained=False, K=2, epochs=3, lr=0.05,
                                late_phase=("batchnorm",), output=str(tmp_path / "run"), **FAST))
    assert events.count("epoch") == 3
    reads = events[events.index("epoch"):]
    last_epoch = len(reads) - 1 - reads[::-1].index("epoch")
    assert all(event == "epoch" for event in reads[:last_epoch + 1])  # nothing of the test set during training
    # then each image twice: the start and the exported model, each measured once (nothing is chosen on them)
    assert sorted(int(e.split()[1]) for e in reads[last_epoch + 1:]) == sorted(list(range(597)) * 2)
    assert events.index("epoch") == 0  # nor before it (the start is measured on the held-out digits)
    assert 0 < report["test_top1"] <= 100


def test_evaluate_recalibrates_on_the_runs_own_training_images(tmp_path):
    """A run that held digits out recalibrated on the rest: `lpconvert evaluate --bn-stats recalibrate` re-estimates
    on the same batches and scores exactly the run's one test figure."""
    from lpconvert.evaluate.command import evaluate

    report = run(FinetuneConfig(model="digits_cnn", pretrained=False, K=2, epochs=1, lr=0.05, select="last",
                                bn_stats="recalibrate", recalibrate_batches=5, late_phase=("batchnorm",),
                                output=str(tmp_path / "run"), **FAST))
    rows = evaluate(str(tmp_path / "run"), DIGITS, checkpoint="last", workers=0)
    assert [row["variant"] for row in rows] == ["averaged (recalibrate)"]
    assert rows[0]["top1"] == report["test_top1"]


@pytest.mark.slow  # two runs of the shared ResNet-20 on CIFAR-10: run with -m slow
def test_a_hold_out_the_start_has_memorised_is_named_before_training(tmp_path, cifar10_root, cifar_resnet_weights,
                                                                       lpconvert_cache, monkeypatch, caplog):
    """The shared ResNet-20 was trained on every CIFAR-10 training image: on 40 of them held out it scores 100 %, so
    they cannot rank epochs — said before the first epoch, not only after the run exported the start."""
    monkeypatch.setenv("LPCONVERT_CACHE", str(lpconvert_cache))
    config = FinetuneConfig(model="cifar_resnet20", weights=str(cifar_resnet_weights[20]), data=str(cifar10_root),
                            train_subset=400, val_subset=100, val_split=0.1, epochs=1, K=2, batch_size=50, lr=0.01,
                            workers=0, quiet=True, output=str(tmp_path / "run"))
    with caplog.at_level("INFO", logger="lpconvert"):
        report = run(config)
    messages = [r.getMessage() for r in caplog.records]
    warning = next(i for i, m in enumerate(messages) if "cannot rank epochs" in m)
    assert "scores 100.00 % on the 40 validation images held out" in messages[warning]
    assert warning < next(i for i, m in enumerate(messages) if m.startswith("epoch 1/1"))
    assert report["start_top1"] == 100.0
    # a run that validates on a real split, or selects nothing, is not warned
    caplog.clear()
    with caplog.at_level("INFO", logger="lpconvert"):
        run(FinetuneConfig(**{**config.to_dict(), "select": "last", "output": str(tmp_path / "last")}))
    assert not any("cannot rank epochs" in r.getMessage() for r in caplog.records)


def test_without_a_validation_set_nothing_is_chosen_and_a_folder_named_test_is_a_test_set(tmp_path):
    """--val-split 0 --select last on a test-only split writes no best.pt (it could only be chosen on the test set):
    reopening the run gives what it exported. A --val-dir named test is a test set, like test/ under --data."""
    config = FinetuneConfig(model="digits_cnn", pretrained=False, data=DIGITS, val_split=0.0, select="last", K=2,
                            epochs=3, batch_size=40, lr=1.0, workers=0, quiet=True, output=str(tmp_path / "run"))
    report = run(config)
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert report["select"] == "last" and report["epoch"] == 3 and report["validation"] == "test"
    from lpconvert.run.saved import load_late_phase

    _, checkpoint = load_late_phase(tmp_path / "run")  # the default: what the run exported
    assert checkpoint.position.epoch == 3 and checkpoint.history.best_epoch is None
    root = _tree(tmp_path / "data", "test")
    for val_dir in (root / "test", tmp_path / "test.tar"):
        if val_dir.suffix == ".tar":
            import tarfile

            with tarfile.open(val_dir, "w") as tar:
                tar.add(root / "test", arcname="test")
        data = _data(root, val_split=0.2, data=None, train_dir=str(root / "train"), val_dir=str(val_dir))
        assert data.val_role == "held-out" and len(data.test) == 12 and len(data.val) == 8
    with pytest.raises(LatePhaseError, match="--select best would choose the epoch on the test set"):
        run(FinetuneConfig(model=MODEL, pretrained=False, num_classes=4, train_dir=str(root / "train"),
                           val_dir=str(root / "test"), val_split=0.0, K=1, epochs=1, batch_size=8, workers=0,
                           quiet=True, output=str(tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()
