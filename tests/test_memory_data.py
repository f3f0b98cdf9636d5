"""The in-memory data path (lpconvert.data.memory): same tensors, labels and seeded order contract as the per-sample
path, its augmentation's distribution, when it is chosen, and a fine-tuning run on it that resumes bit-exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from exact_resume import assert_resume_is_exact
from PIL import Image
from torchvision.transforms import functional as TF

from lpconvert.cli import main
from lpconvert.data import (
    MemoryImages,
    MemorySamples,
    SeededSamples,
    build_data,
    build_datasets,
    build_transform,
    eval_loader,
    memory_data,
    recalibration_loader,
    train_loader,
)
from lpconvert.data.memory import BatchAugment
from lpconvert.data.settings import DataSettings
from lpconvert.errors import LatePhaseError

MODEL = "cifar_lenet5_bn"
CLASSES = ("ant", "bee", "cat", "dog")
BATCH = 8  # 40 training images: 5 batches per epoch


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/: 10 noise PNGs of 32x32 per class; val/: 3 per class, some 48x40 (resized and center-cropped)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("val", 3)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                height, width = (40, 48) if split == "val" and i == 0 else (32, 32)
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _model() -> torch.nn.Module:
    return timm.create_model(MODEL, num_classes=len(CLASSES))


def _data(tree: Path, **settings):
    return build_data(DataSettings(data=str(tree), workers=0, **settings), _model())


def _datasets(tree: Path, train_transform: str = "cifar"):
    return build_datasets(tree / "train", tree / "val", data_config=timm.data.resolve_data_config(model=_model()),
                          num_classes=len(CLASSES), train_transform=train_transform)


def _epoch(samples, epoch: int, start: int = 0, seed: int = 3, **rank) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = train_loader(samples, BATCH, seed=seed, workers=0, **rank)
    loader.batch_sampler.set_position(epoch, start)
    return list(loader)


def _equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_validation_tensors_and_labels_equal_the_per_sample_path(tree: Path) -> None:
    train, val = _datasets(tree)
    samples, memory_val = memory_data(train, val, mode="on", seed=0)
    per_sample = torch.stack([val[i][0] for i in range(len(val))])
    loaded = list(eval_loader(memory_val, 5, workers=2))
    assert [len(x) for x, _ in loaded] == [5, 5, 2]  # file order, last batch kept
    assert torch.equal(torch.cat([x for x, _ in loaded]), per_sample)  # bit for bit: max abs diff 0
    assert torch.cat([y for _, y in loaded]).tolist() == val.targets
    assert torch.equal(memory_val[3][0], val[3][0])
    assert samples.dataset.targets.tolist() == train.targets and len(samples) == len(train) == 40
    assert samples.dataset.samples == train.samples and memory_val.samples == val.samples
    for i in (0, 17, 39):  # the training images are the files' pixels (32x32: the resize keeps them)
        assert torch.equal(samples.dataset.images[i], TF.pil_to_tensor(Image.open(train.samples[i][0])))


def test_same_seed_gives_the_same_batches_and_a_resumed_epoch_is_bit_exact(tree: Path) -> None:
    first, second = _data(tree, seed=3, data_in_memory="on"), _data(tree, seed=3, data_in_memory="on")
    assert isinstance(first.train, MemorySamples)
    full = _epoch(first.train, epoch=1)
    assert len(full) == 5 and full[0][0].shape == (BATCH, 3, 32, 32) and full[0][0].dtype == torch.float32
    assert _equal(_epoch(second.train, epoch=1), full)
    assert _equal(_epoch(second.train, epoch=1, start=2), full[2:])  # resumed mid-epoch
    other = _data(tree, seed=4, data_in_memory="on")
    assert not torch.equal(_epoch(other.train, epoch=1, seed=4)[0][0], full[0][0])


def test_augmentation_belongs_to_the_sample_not_the_batch_or_rank(tree: Path) -> None:
    samples = _data(tree, data_in_memory="on").train
    keys = [(2, i) for i in range(40)]
    x, y = samples.__getitems__(keys)
    assert torch.equal(torch.stack([samples[key][0] for key in keys]), x)
    assert torch.equal(samples.__getitems__(keys[::-1])[0], x.flip(0))
    whole = _epoch(samples, epoch=2)
    for rank in (0, 1):  # two processes see the halves of each global batch, augmented alike
        halves = _epoch(samples, epoch=2, rank=rank, world_size=2)
        assert _equal(halves, [(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]) for x, y in whole])
    changed = [not torch.equal(samples[(0, i)][0], samples[(1, i)][0]) for i in range(40)]
    assert sum(changed) >= 36  # a new epoch draws new crops and flips (the same draw has chance 1/162)


def test_crop_and_flip_have_torchvisions_distribution(tree: Path) -> None:
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 32, 32), dtype=np.uint8))
    padded = TF.pad(image, 4)
    candidates = {}
    for i in range(9):
        for j in range(9):
            crop = TF.crop(padded, i, j, 32, 32)
            candidates[crop.numpy().tobytes()] = (i, j, False)
            candidates[TF.hflip(crop).numpy().tobytes()] = (i, j, True)
    draws = 4000
    keys = np.arange(draws, dtype=np.uint64) * np.uint64(10_000_019)  # the seeds of samples 0, 1, … of one epoch
    out = BatchAugment((32, 32), 4, 0.5)(image.expand(draws, 3, 32, 32).contiguous(), keys)
    found = [candidates.get(crop.numpy().tobytes()) for crop in out]
    assert None not in found  # every output is a zero-padded 32x32 crop, flipped or not
    flips = sum(flip for _, _, flip in found) / draws
    assert abs(flips - 0.5) < 0.03
    counts = np.bincount([9 * i + j for i, j, _ in found], minlength=81)
    chi2 = ((counts - draws / 81) ** 2 / (draws / 81)).sum()
    assert chi2 < 125  # uniform offsets: the 0.999 quantile of χ² with 80 degrees of freedom
    # the per-sample PIL path draws from the same set
    pil_steps = build_transform(timm.data.resolve_data_config(model=_model()), train=True).transforms[:-2]
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    for seed in range(20):
        torch.manual_seed(seed)
        for step in pil_steps:
            pil_out = step(pil if step is pil_steps[0] else pil_out)
        assert TF.pil_to_tensor(pil_out).numpy().tobytes() in candidates


def test_the_setting_chooses_the_path(tree: Path) -> None:
    data = _data(tree)
    assert isinstance(data.train, MemorySamples) and isinstance(data.val, MemoryImages)  # auto: CIFAR-sized, small
    off = _data(tree, data_in_memory="off")
    assert type(off.train) is SeededSamples and not isinstance(off.val, MemoryImages)
    assert off.label_names == data.label_names == list(CLASSES) and off.fingerprint == data.fingerprint
    assert type(_data(tree, train_transform="timm").train) is SeededSamples  # RandomResizedCrop: per sample
    with pytest.raises(LatePhaseError, match="--train-transform cifar"):
        _data(tree, train_transform="timm", data_in_memory="on")
    train, val = _datasets(tree)
    assert memory_data(train, val, mode="auto", seed=0, budget=52 * 3 * 32 * 32) is not None
    assert memory_data(train, val, mode="auto", seed=0, budget=52 * 3 * 32 * 32 - 1) is None  # over the budget
    assert "--data-in-memory [auto|on|off]" in CliRunner().invoke(main, ["finetune", "--help"]).output


def test_loaders_give_the_training_loop_what_it_needs(tree: Path) -> None:
    samples = _data(tree, seed=5).train
    loader = train_loader(samples, BATCH, seed=5, workers=2)
    assert loader.num_workers == 0 and loader.batch_sampler.batches_per_epoch == 5 and len(loader) == 5
    loader.batch_sampler.set_position(3, 3)
    assert len(loader) == 2 and len(list(loader)) == 2
    recalibration = next(iter(recalibration_loader(samples, BATCH, seed=5)))
    assert _equal([recalibration], _epoch(samples, epoch=0, seed=5)[:1])


def test_finetune_on_the_memory_path_resumes_bit_exactly(tree: Path, tmp_path: Path) -> None:
    settings = dict(model=MODEL, pretrained=False, num_classes=len(CLASSES), data=str(tree), K=2, epochs=2,
                    batch_size=BATCH, lr=0.05, schedule="constant", workers=0, quiet=True, log_every=1,
                    data_in_memory="on", late_phase=("batchnorm", "classifier"))
    assert_resume_is_exact(settings, tmp_path)  # stopped mid-epoch 0
