"""Small real image sets for the evaluation tests: a few CIFAR-10 test images per class copied into a fresh ImageFolder
root (and tar archives of trees), so that a test corrupts, calibrates and detects on a few dozen images."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from lpconvert.cli import main

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the shared CIFAR ResNets' preprocessing


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def cifar_tree(cifar10_test_dir: Path, folder: Path, per_class: int, skip: int = 0) -> Path:
    """`folder`/<class>/<name>.png: images skip … skip+per_class−1 (in file order) of every CIFAR-10 test class."""
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        for path in sorted((cifar10_test_dir / name).iterdir())[skip:skip + per_class]:
            (folder / name / path.name).write_bytes(path.read_bytes())
    return folder


def noise_tree(folder: Path, count: int, seed: int) -> Path:
    """`folder`/noise/<i>.png: `count` 32x32 images of uniform random pixels."""
    rng = np.random.default_rng(seed)
    (folder / "noise").mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "noise" / f"{i}.png")
    return folder


def tar_tree(tree: Path, archive: Path, arcname: str = "test") -> Path:
    """A .tar.gz of `tree` under the top-level folder `arcname` (CIFAR's layout: test/<class>/<image>)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=arcname)
    return archive


def tree_images(tree: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 32, 32, 3), labels (N,)) of a CIFAR tree, in ImageFolder's order."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((tree / name).iterdir()):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def predict(model: torch.nn.Module, images: np.ndarray, log: bool = False) -> torch.Tensor:
    """The model's softmax (`log`: log-softmax) on uint8 images, preprocessed by hand: [0, 1], then the ImageNet
    mean/std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        logits = model.eval()(x)
    return logits.log_softmax(-1) if log else logits.softmax(-1)
