"""Shared fixtures: the read-only ../shared material (CIFAR-10 test set, pretrained CIFAR ResNets).

../shared is required (CI has it); a missing folder fails the tests that need it with a clear message.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared folder next to the repository."""
    if not (SHARED / "README.md").is_file():
        pytest.fail(f"the shared test material is missing: expected it at {SHARED} (the repository's ../shared)")
    return SHARED


@pytest.fixture(scope="session")
def lpconvert_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide lpconvert cache folder (archive extraction) outside the repository."""
    return tmp_path_factory.mktemp("lpconvert-cache")


@pytest.fixture(scope="session")
def cifar10_test_dir(shared_dir: Path, lpconvert_cache: Path) -> Path:
    """The CIFAR-10 test set (10,000 PNGs, ImageFolder tree), extracted once per session by lpconvert.data."""
    from lpconvert.data import resolve_data_dirs

    _, val_dir = resolve_data_dirs(val_dir=shared_dir / "data/cifar10/test.tar.gz", cache_dir=lpconvert_cache)
    return val_dir


@pytest.fixture(scope="session")
def cifar_resnet_weights(shared_dir: Path) -> dict[int, Path]:
    """Depth -> path of the shared CIFAR-10 ResNet checkpoint (``{'state_dict': ...}``, keys prefixed ``module.``)."""
    return {
        20: shared_dir / "weights/cifar10_resnet/resnet20-12fca82f.th",
        32: shared_dir / "weights/cifar10_resnet/resnet32-d509ac18.th",
    }


def _load_stripped(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}


@pytest.fixture(scope="session")
def load_stripped_state_dict() -> Callable[[Path], dict[str, torch.Tensor]]:
    """Function: checkpoint path -> its ``state_dict`` with the ``module.`` prefixes removed (weights_only load)."""
    return _load_stripped


@pytest.fixture(scope="session")
def pretrained_cifar_resnet(cifar_resnet_weights: dict[int, Path]) -> Callable[[int], torch.nn.Module]:
    """Factory: depth (20 or 32) -> a fresh ``cifar_resnet{depth}`` with the shared CIFAR-10 weights, eval mode."""
    import timm

    import lpconvert.models  # noqa: F401  (registers the architectures)

    def make(depth: int) -> torch.nn.Module:
        model = timm.create_model(f"cifar_resnet{depth}", num_classes=10)
        model.load_state_dict(_load_stripped(cifar_resnet_weights[depth]), strict=True)
        return model.eval()

    return make


@pytest.fixture(scope="session")
def cifar10_root(shared_dir: Path, lpconvert_cache: Path) -> Path:
    """A folder holding the shared CIFAR-10 ``train.tar.gz`` and ``test.tar.gz`` (what ``--data`` accepts)."""
    return shared_dir / "data/cifar10"
