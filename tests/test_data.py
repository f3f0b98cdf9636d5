"""lpconvert.data: locating and extracting data, labels, transforms, subsets, loaders, fingerprints, digits."""

from __future__ import annotations

import io
import os
import random
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torchvision import transforms
from torchvision.datasets import ImageFolder

from lpconvert.data import (
    build_datasets,
    build_transform,
    class_to_index,
    data_fingerprint,
    digits_datasets,
    resolve_data_dirs,
    stratified_indices,
)
from lpconvert.errors import LatePhaseError

CIFAR_CFG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
             "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _png(color=(255, 0, 128), size=32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _tree(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"{i:03d}.png").write_bytes(_png())
    return root


def _info(name: str, payload: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            tar.addfile(_info(name, payload), io.BytesIO(payload))
    return path


# ------------------------------------------------------------------------------------------- locating, extracting


def test_archive_is_extracted_once_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    archive = _tar(tmp_path / "train.tar.gz", {"train/a/0.png": _png(), "train/b/0.png": _png()})
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path / "cache"))
    train, val = resolve_data_dirs(train_dir=archive)
    assert val is None and train.name == "train" and (train / "a" / "0.png").is_file()
    assert train.is_relative_to(tmp_path / "cache" / "extracted")
    assert resolve_data_dirs(train_dir=archive)[0] == train  # reused, not extracted again
    assert [p.name for p in (tmp_path / "cache" / "extracted").iterdir()] == [train.parent.name]  # no temp left


@pytest.mark.parametrize("name", ["../evil.png", "/tmp/lpconvert-evil.png", "ok/../../evil.png"])
def test_unsafe_tar_member_is_rejected(tmp_path: Path, name: str) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", {"a/0.png": _png(), name: b"x"})
    with pytest.raises(LatePhaseError, match="refusing to extract"):
        resolve_data_dirs(train_dir=archive, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "extracted").iterdir())
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/lpconvert-evil.png").exists()


@pytest.mark.parametrize("mode", ["w:gz", "w"])
def test_symlink_leaving_the_tree_is_rejected(tmp_path: Path, mode: str) -> None:
    archive = tmp_path / ("link.tar.gz" if mode == "w:gz" else "link.tar")
    with tarfile.open(archive, mode) as tar:
        link = tarfile.TarInfo("a/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        tar.addfile(link)
        tar.addfile(_info("b/0.png", _png()), io.BytesIO(_png()))
    if mode == "w:gz":  # extracted: refused
        with pytest.raises(LatePhaseError, match="refusing to extract"):
            resolve_data_dirs(train_dir=archive, cache_dir=tmp_path / "cache")
    else:  # read in place: links are not files, nothing is written
        train, _ = resolve_data_dirs(train_dir=archive, cache_dir=tmp_path / "cache")
        assert [path for path, _ in train.files()] == ["b/0.png"] and not (tmp_path / "cache").exists()


def test_data_root_layouts(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _tree(root / "train", {"a": 1, "b": 1})
    _tar(root / "test.tar.gz", {"test/a/0.png": _png(), "test/b/0.png": _png()})
    train, val = resolve_data_dirs(data=root, cache_dir=tmp_path / "cache")
    assert train == root / "train" and val.name == "test" and sorted(p.name for p in val.iterdir()) == ["a", "b"]

    _tree(root / "val", {"a": 1})
    assert resolve_data_dirs(data=root, cache_dir=tmp_path / "cache")[1] == root / "val"  # val before test
    assert resolve_data_dirs(data=root, val_dir=root / "train")[1] == root / "train"  # explicit dirs win

    # the whole root as one archive, under a top-level folder
    whole = _tar(tmp_path / "whole.tgz", {"ds/train/a/0.png": _png(), "ds/val/a/0.png": _png()})
    train, val = resolve_data_dirs(data=whole, cache_dir=tmp_path / "cache")
    assert (train.name, val.name) == ("train", "val")


def test_missing_or_invalid_paths(tmp_path: Path) -> None:
    with pytest.raises(LatePhaseError, match="no data given"):
        resolve_data_dirs()
    with pytest.raises(LatePhaseError, match=str(tmp_path / "nope")):
        resolve_data_dirs(train_dir=tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LatePhaseError, match="neither a directory nor a tar archive"):
        resolve_data_dirs(val_dir=tmp_path / "notes.txt")
    (tmp_path / "flat").mkdir()
    with pytest.raises(LatePhaseError, match="found neither train/ nor val/"):
        resolve_data_dirs(data=tmp_path / "flat")
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(_tar(tmp_path / "full.tar.gz", {"a/0.png": _png()}).read_bytes()[:60])
    with pytest.raises(LatePhaseError):
        resolve_data_dirs(train_dir=truncated, cache_dir=tmp_path / "cache")


def test_empty_or_missing_data_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatePhaseError, match=f"{tmp_path / 'empty'} has no class folders"):
        build_datasets(tmp_path / "empty", None, data_config=CIFAR_CFG, num_classes=None)
    with pytest.raises(LatePhaseError, match=str(tmp_path / "gone")):
        build_datasets(None, tmp_path / "gone", data_config=CIFAR_CFG, num_classes=None)
    _tree(tmp_path / "hollow", {"a": 1})
    (tmp_path / "hollow" / "b").mkdir()
    with pytest.raises(LatePhaseError, match="hollow"):
        build_datasets(tmp_path / "hollow", None, data_config=CIFAR_CFG, num_classes=2)


# ------------------------------------------------------------------------------------------------------- labels


def test_imagenet_wnids_map_to_model_indices() -> None:
    synsets = list(ImageNetInfo("imagenet-1k").label_names())
    picked = random.Random(0).sample(synsets, 50)
    mapping = class_to_index(picked, 1000)
    assert mapping == {wnid: synsets.index(wnid) for wnid in picked}
    assert class_to_index(synsets[::-1], 1000, "imagenet") == {w: i for i, w in enumerate(synsets)}
    assert class_to_index(picked[:10], 10) == {w: i for i, w in enumerate(sorted(picked[:10]))}  # not an ImageNet head
    with pytest.raises(LatePhaseError, match="'zebra' is not an ImageNet class ID"):
        class_to_index(["n01440764", "zebra"], 1000, "imagenet")
    with pytest.raises(LatePhaseError, match="needs an ImageNet head"):
        class_to_index(picked, 10, "imagenet")


def test_folder_order_and_class_count_mismatch() -> None:
    assert class_to_index(["b", "a", "c"], 3) == {"a": 0, "b": 1, "c": 2}
    assert class_to_index(["b", "a"], None, "folder") == {"a": 0, "b": 1}
    names = [f"c{i:02d}" for i in range(12)]
    with pytest.raises(LatePhaseError) as info:
        class_to_index(names, 10)
    assert str(info.value) == (  # true for every caller; the CLI gives each command its own fix (test_messages)
        "the data has 12 classes but the model has 10 outputs; train a new head for them (lpconvert finetune "
        "--num-classes 12), or use data of the model's 10 classes"
    )
    with pytest.raises(LatePhaseError, match="has 1000"):
        class_to_index(["n01440764", "zebra"], 1000)  # auto falls back to folder order, whose count then mismatches


def test_class_map_file(tmp_path: Path) -> None:
    class_map = tmp_path / "classes.txt"
    class_map.write_text("cat\ndog\nbird\n")
    assert class_to_index(["bird", "cat"], 3, class_map) == {"cat": 0, "bird": 2}
    with pytest.raises(LatePhaseError, match="'fish' is not listed"):
        class_to_index(["fish"], 3, class_map)
    with pytest.raises(LatePhaseError, match="classes.txt lists 3 classes but the model has 2 outputs"):
        class_to_index(["bird"], 2, class_map)
    with pytest.raises(LatePhaseError, match="cannot read class map"):
        class_to_index(["bird"], 2, tmp_path / "missing.txt")


def test_validation_reuses_training_labels(tmp_path: Path) -> None:
    _tree(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    _tree(tmp_path / "val", {"b": 1, "c": 1})
    train, val = build_datasets(tmp_path / "train", tmp_path / "val", data_config=CIFAR_CFG, num_classes=3)
    assert train.class_to_idx == {"a": 0, "b": 1, "c": 2} and val.class_to_idx == {"b": 1, "c": 2}
    assert val.targets == [1, 2]
    _tree(tmp_path / "val", {"d": 1})
    with pytest.raises(LatePhaseError, match="'d'"):
        build_datasets(tmp_path / "train", tmp_path / "val", data_config=CIFAR_CFG, num_classes=3)


# ------------------------------------------------------------------------------------------- transforms, subsets


def test_cifar_transform_chosen_for_small_inputs() -> None:
    small = build_transform(CIFAR_CFG, train=True)
    assert any(isinstance(t, transforms.RandomCrop) for t in small.transforms)
    large = build_transform({**CIFAR_CFG, "input_size": (3, 224, 224)}, train=True)
    assert any("RandomResizedCrop" in type(t).__name__ for t in large.transforms)
    timm_small = build_transform(CIFAR_CFG, train=True, train_transform="timm")
    assert not any(isinstance(t, transforms.RandomCrop) for t in timm_small.transforms)
    with pytest.raises(LatePhaseError, match="unknown train transform"):
        build_transform(CIFAR_CFG, train=True, train_transform="fancy")

    image = Image.new("RGB", (32, 32), (255, 0, 128))
    expected = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    evaluated = build_transform(CIFAR_CFG, train=False)(image)
    assert evaluated.shape == (3, 32, 32)
    torch.testing.assert_close(evaluated.mean(dim=(1, 2)), expected)
    augmented = small(image)
    assert augmented.shape == (3, 32, 32)
    padding = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    values = {tuple(v) for v in augmented.flatten(1).T.round(decimals=4).tolist()}
    assert values <= {tuple(expected.round(decimals=4).tolist()), tuple(padding.round(decimals=4).tolist())}


def test_stratified_subsets() -> None:
    targets = [0] * 50 + [1] * 30 + [2] * 20
    picked = stratified_indices(targets, 10, seed=0)
    assert picked == sorted(picked) and np.bincount([targets[i] for i in picked]).tolist() == [5, 3, 2]
    assert picked == stratified_indices(targets, 10, seed=0) != stratified_indices(targets, 10, seed=1)
    assert np.bincount([targets[i] for i in stratified_indices(targets, 7)]).tolist() == [4, 2, 1]
    assert stratified_indices(targets, 1000) == list(range(100))
    with pytest.raises(LatePhaseError):
        stratified_indices(targets, 0)


def test_dataset_subset_keeps_imagefolder(tmp_path: Path) -> None:
    _tree(tmp_path / "train", {"a": 6, "b": 4})
    train, _ = build_datasets(tmp_path / "train", None, data_config=CIFAR_CFG, num_classes=2, train_subset=5)
    assert len(train) == 5 and train.targets == [t for _, t in train.samples]
    assert sorted(train.targets) == [0, 0, 0, 1, 1]
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == 0


def test_fingerprint_changes_when_a_file_is_added(tmp_path: Path) -> None:
    _tree(tmp_path / "d", {"a": 2, "b": 1})
    before = data_fingerprint(tmp_path / "d")
    assert before["num_files"] == 3 and before == data_fingerprint(str(tmp_path / "d"))
    dataset, _ = build_datasets(tmp_path / "d", None, data_config=CIFAR_CFG, num_classes=2)
    assert data_fingerprint(dataset) == before
    (tmp_path / "d" / "b" / "new.png").write_bytes(_png())
    after = data_fingerprint(tmp_path / "d")
    assert after["num_files"] == 4 and after["sha256"] != before["sha256"]
    with pytest.raises(LatePhaseError):
        data_fingerprint(tmp_path / "missing")


def test_digits_split() -> None:
    train, test = digits_datasets(seed=0)
    assert (len(train), len(test)) == (1200, 597)
    x, y = train.tensors
    assert x.shape == (1200, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    all_x = torch.cat([x, test.tensors[0]])
    assert abs(all_x.mean().item()) < 1e-3 and abs(all_x.std().item() - 1) < 1e-3
    assert torch.equal(digits_datasets(seed=0)[1].tensors[1], test.tensors[1])
    assert not torch.equal(digits_datasets(seed=1)[1].tensors[1], test.tensors[1])
    assert (torch.bincount(test.tensors[1], minlength=10) >= 57).all()  # stratified: ~59-60 per digit


# ----------------------------------------------------------------------------------------- the real CIFAR-10 tar


def test_cifar10_test_archive(cifar10_test_dir: Path) -> None:
    assert cifar10_test_dir.name == "test"
    _, val = build_datasets(None, cifar10_test_dir, data_config=CIFAR_CFG, num_classes=10)
    assert val.classes == CIFAR10_CLASSES and len(val) == 10_000
    assert np.bincount(val.targets).tolist() == [1000] * 10
    assert data_fingerprint(val)["num_files"] == 10_000
    image, label = val[0]
    assert image.shape == (3, 32, 32) and label == 0


def test_fine_tuning_subsets_do_not_depend_on_the_training_seed(tmp_path: Path) -> None:
    """--train-subset/--val-subset pick the same images for every --seed (paired seeds), another --subset-seed others."""
    import timm

    from lpconvert.config import FinetuneConfig
    from lpconvert.data import build_data

    _tree(tmp_path / "train", {"a": 12, "b": 8})
    _tree(tmp_path / "val", {"a": 6, "b": 6})
    model = timm.create_model("cifar_resnet20", num_classes=2)

    def files(**settings) -> tuple[list[str], list[str]]:
        config = FinetuneConfig(train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"), train_subset=10,
                                val_subset=4, **settings)
        data = build_data(config.data_settings, model)
        return [p for p, _ in data.train.dataset.samples], [p for p, _ in data.val.samples]

    assert files(seed=0) == files(seed=1) == files(seed=1, subset_seed=0)
    assert files(seed=0) != files(seed=0, subset_seed=1)


# ------------------------------------------------------------------------------------------------- data that lies


def test_symlinks_are_followed_only_inside_the_tree_and_never_into_a_loop(tmp_path: Path, caplog) -> None:
    val = _tree(tmp_path / "val", {"cat": 20, "dog": 20})
    outside = _tree(tmp_path / "elsewhere", {"cat": 5})
    (val / "cat" / "current").symlink_to(".")  # a loop: torchvision walks it until the path is too long
    (val / "cat" / "up").symlink_to("..")  # another one, through the root
    (val / "dog" / "more").symlink_to(outside / "cat")  # images from outside the tree
    (val / "dog" / "gone.png").symlink_to(tmp_path / "missing.png")  # leads nowhere
    (val / "dog" / "alias.png").symlink_to("000.png")  # a file inside the tree: harmless, kept
    with caplog.at_level("WARNING", logger="lpconvert.data.datasets"):
        _, dataset = build_datasets(None, val, data_config=CIFAR_CFG, num_classes=2)
    assert len(dataset) == 41 and dataset.targets.count(0) == 20 and dataset.targets.count(1) == 21
    assert data_fingerprint(dataset)["num_files"] == 41
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "skipped 4 symlink(s) leading outside it or into a loop" in warning and "cat/current" in warning
    plain = _tree(tmp_path / "plain", {"cat": 20, "dog": 20})  # without links: torchvision's samples, in its order
    assert build_datasets(None, plain, data_config=CIFAR_CFG, num_classes=2)[1].samples == ImageFolder(plain).samples


def test_a_killed_extraction_is_removed_on_the_next_use(tmp_path: Path, monkeypatch) -> None:
    archive = _tar(tmp_path / "train.tar.gz", {"train/a/0.png": _png(), "train/b/0.png": _png()})
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path / "cache"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    train = resolve_data_dirs(train_dir=archive)[0]
    cache = tmp_path / "cache" / "extracted"
    host = socket.gethostname()
    partial = cache / f".{train.parent.name}-{host}-{int(dead.stdout)}-abc123"  # what a kill -9 mid-way leaves
    (partial / "train" / "a").mkdir(parents=True)
    running = cache / f".{train.parent.name}-{host}-{os.getpid()}-def456"  # an extraction still in progress
    running.mkdir()
    assert resolve_data_dirs(train_dir=archive)[0] == train
    assert sorted(p.name for p in cache.iterdir()) == sorted([running.name, train.parent.name])
