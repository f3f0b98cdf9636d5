"""Where data comes from: folders, uncompressed tar archives read in place, Hugging Face datasets (``--dataset
hfds/NAME``) — the same images give the same tensors, labels and seeded batches through each — the validation split's
names, ``--class-map``, and ``lpconvert evaluate`` on each. Offline: every dataset is made in the test."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from exact_resume import assert_resume_is_exact
from image_trees import write_files
from PIL import Image

import lpconvert.models  # noqa: F401  (registers cifar_lenet5_bn)
from lpconvert.config import FinetuneConfig
from lpconvert.data import (
    TarPath,
    build_data,
    build_datasets,
    data_fingerprint,
    hub_dataset_id,
    hub_splits,
    resolve_data_dirs,
)
from lpconvert.data.settings import DataSettings
from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.command import evaluate
from lpconvert.train.finetune import run

MODEL = "cifar_lenet5_bn"
CLASSES = ("ant", "bee", "cat")
COUNTS = {"train": 6, "validation": 2}  # images per class: 18 training, 6 validation
BATCH = 6
CFG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
       "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def _png(rng: np.random.Generator, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar_bytes(files: dict[str, bytes], mode: str = "w") -> bytes:
    """A tar of `files` (uncompressed unless `mode` says otherwise; a payload may itself be a tar's bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _plain_tar(path: Path, files: dict[str, bytes]) -> Path:
    path.write_bytes(_tar_bytes(files))
    return path


def _hub(root: Path, splits: dict[str, list[tuple[bytes, int]]], names: tuple[str, ...], image: str = "image",
         label: str = "label") -> Path:
    """A local Hugging Face dataset folder (Parquet files, as on the Hub) with an Image and a ClassLabel column."""
    features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=list(names))})
    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        table = datasets.Dataset.from_dict({image: [{"bytes": png, "path": None} for png, _ in rows],
                                            label: [y for _, y in rows]}, features=features)
        table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(autouse=True)
def extraction_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The datasets library offline, with its cache and lpconvert's extraction cache in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path / "lpconvert-cache"))
    return tmp_path / "lpconvert-cache"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """The same noise PNGs as train/ + validation/ folders, an uncompressed tar of them (under a top folder), and a
    Hugging Face dataset (train and validation splits, rows in the folders' order): FinetuneConfig data settings."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    files = {f"{split}/{name}/{i}.png": _png(rng) for split, count in COUNTS.items() for name in CLASSES
             for i in range(count)}
    write_files(root / "folder", files)
    _plain_tar(root / "images.tar", {f"images/{name}": payload for name, payload in files.items()})
    rows = {split: [(files[f"{split}/{name}/{i}.png"], y) for y, name in enumerate(CLASSES) for i in range(count)]
            for split, count in COUNTS.items()}
    _hub(root / "hub", rows, CLASSES)
    return {"folder": {"data": str(root / "folder")}, "tar": {"data": str(root / "images.tar")},
            "hub": {"dataset": f"hfds/{root / 'hub'}"}}


def _model() -> torch.nn.Module:
    return timm.create_model(MODEL, num_classes=len(CLASSES))


# ----------------------------------------------------------------------------------- the same images, three ways


@pytest.mark.parametrize("in_memory", ["off", "on"])
def test_folder_plain_tar_and_hub_dataset_give_the_same_samples(sources, extraction_cache: Path,
                                                                in_memory: str) -> None:
    built = {kind: build_data(DataSettings(workers=0, data_in_memory=in_memory, **settings), _model())
             for kind, settings in sources.items()}
    folder = built["folder"]
    assert len(folder.train) == 18 and len(folder.val) == 6 and folder.label_names == list(CLASSES)
    for data in built.values():
        assert data.label_names == folder.label_names
        for key in [(epoch, i) for epoch in (0, 1) for i in range(18)]:  # seeded augmentation per (epoch, sample)
            (x, y), (u, v) = data.train[key], folder.train[key]
            assert torch.equal(x, u) and int(y) == int(v)
        for i in range(6):
            (x, y), (u, v) = data.val[i], folder.val[i]
            assert torch.equal(x, u) and int(y) == int(v) == i // 2
    for split, folder_name in (("train", "train"), ("val", "validation")):  # the same file list, another root
        assert built["tar"].fingerprint[split] == {**folder.fingerprint[split],
                                                   "root": f"{sources['tar']['data']}/images/{folder_name}"}
    hub = built["hub"].fingerprint
    assert (hub["train"]["num_files"], hub["val"]["split"], hub["val"]["root"]) == (18, "validation",
                                                                                     sources["hub"]["dataset"])
    assert not extraction_cache.exists()  # the tar was read in place: nothing extracted


def test_a_run_on_a_hub_dataset_resumes_exactly_and_evaluates_alike_on_every_source(sources, tmp_path: Path) -> None:
    settings = dict(model=MODEL, pretrained=False, num_classes=len(CLASSES), K=2, epochs=2, batch_size=BATCH, lr=0.05,
                    schedule="constant", workers=0, quiet=True, data_in_memory="off", **sources["hub"])
    assert_resume_is_exact(settings, tmp_path)  # stopped mid-epoch 0

    rows = [evaluate(str(tmp_path / "straight"), bn_stats="all", batch_size=BATCH, workers=0, device="cpu",
                     **source) for source in sources.values()]
    assert rows[0] == rows[1] == rows[2]
    assert [row["variant"] for row in rows[0]] == ["averaged (fold)", "averaged (mean)", "averaged (recalibrate)"]
    assert rows[0][0]["count"] == 6


# ------------------------------------------------------------------------------------------------- split names


def test_validation_split_is_the_first_of_val_validation_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    one = {"a/0.png": _png(rng), "b/0.png": _png(rng)}
    root, order = tmp_path / "root", ("train", "test", "validation", "val")
    for upto, split in enumerate(order):  # add the splits one by one: the last one added is preferred
        write_files(root / split, one)
        whole = _plain_tar(tmp_path / f"{split}.tar", {f"{s}/{n}": p for s in order[:upto + 1] for n, p in one.items()})
        for train, val in (resolve_data_dirs(root), resolve_data_dirs(whole)):
            assert train.name == "train" and (val.name if val else None) == (None if split == "train" else split)

    names = ("a", "b")
    _hub(tmp_path / "hub", {s: [(one["a/0.png"], 0), (one["b/0.png"], 1)] for s in ("train", "test", "validation")},
         names)
    _hub(tmp_path / "hub-test", {s: [(one["a/0.png"], 0)] for s in ("train", "test")}, names)
    assert [s.split for s in hub_splits(f"hfds/{tmp_path / 'hub'}")] == ["train", "validation"]
    assert [s.split for s in hub_splits(f"hfds/{tmp_path / 'hub-test'}")] == ["train", "test"]


# ------------------------------------------------------------------------------------------ tar archives in place


def test_imagenet_tar_of_class_tars_is_read_in_place_with_imagenet_labels(tmp_path: Path,
                                                                          extraction_cache: Path) -> None:
    """ImageNet's training archive holds one .tar per WordNet ID; read in place, labels are ImageNet indices."""
    rng = np.random.default_rng(2)
    files = {f"{wnid}/{wnid}_{i}.JPEG": _png(rng) for wnid in ("n01443537", "n01440764") for i in range(3)}
    archive = _plain_tar(tmp_path / "train.tar", {f"{wnid}.tar": _tar_bytes({n.split("/")[1]: p for n, p in
                                                                            files.items() if n.startswith(wnid)})
                                                  for wnid in ("n01443537", "n01440764")})
    tree, _ = resolve_data_dirs(train_dir=archive)
    _, in_tar = build_datasets(None, tree, data_config=CFG, num_classes=1000)  # the evaluation transform
    _, in_folder = build_datasets(None, write_files(tmp_path / "train", files), data_config=CFG, num_classes=1000)
    assert isinstance(tree, TarPath) and in_tar.targets == in_folder.targets == [0, 0, 0, 1, 1, 1]
    assert in_tar.class_to_idx == {"n01440764": 0, "n01443537": 1}
    assert all(torch.equal(in_tar[i][0], in_folder[i][0]) for i in range(6))
    assert data_fingerprint(in_tar)["sha256"] == data_fingerprint(in_folder)["sha256"]
    assert not extraction_cache.exists()


def test_tar_read_in_place_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    broken = _plain_tar(tmp_path / "broken.tar", {"a/0.png": _png(rng), "b/0.png": b"not a png"})
    _, val = build_datasets(None, resolve_data_dirs(val_dir=broken)[1], data_config=CFG, num_classes=2)
    with pytest.raises(LatePhaseError, match=r"cannot read image .*broken\.tar/b/0\.png.*remove or replace"):
        val[1]
    with pytest.raises(LatePhaseError, match=r"refusing to read .*'\.\./x\.png'"):
        resolve_data_dirs(train_dir=_plain_tar(tmp_path / "up.tar", {"a/0.png": b"", "../x.png": b""}))
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(broken.read_bytes()[:700])
    with pytest.raises(LatePhaseError, match="check that the archive is complete"):
        resolve_data_dirs(train_dir=truncated)
    inner_gz = _tar_bytes({"a/0.png": _png(rng)}, "w:gz")
    root = _plain_tar(tmp_path / "root.tar", {"train.tar.gz": inner_gz, "val/a/0.png": _png(rng)})
    with pytest.raises(LatePhaseError, match="train.tar.gz is an archive inside the uncompressed archive"):
        resolve_data_dirs(root)


# ---------------------------------------------------------------------------------------------------- labels


def test_class_map_file_and_the_datasets_class_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    cat, dog = _png(rng), _png(rng)
    write_files(tmp_path / "folder", {f"{split}/{name}/0.png": png for split in ("train", "val")
                                  for name, png in (("cat", cat), ("dog", dog))})
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    model = timm.create_model(MODEL, num_classes=2)
    mapped = build_data(DataSettings(data=str(tmp_path / "folder"), workers=0,
                                     class_map=str(tmp_path / "classes.txt")), model)
    assert mapped.label_names == ["dog", "cat"] and [int(mapped.val[i][1]) for i in range(2)] == [1, 0]

    # a ClassLabel keeps its own order (dog = 0), which a class map reorders like folders
    _hub(tmp_path / "hub", {s: [(cat, 1), (dog, 0)] for s in ("train", "validation")}, ("dog", "cat"))
    own = build_data(DataSettings(dataset=f"hfds/{tmp_path / 'hub'}", workers=0), model)
    assert own.label_names == ["dog", "cat"] and [int(own.val[i][1]) for i in range(2)] == [1, 0]
    (tmp_path / "reversed.txt").write_text("cat\ndog\n")
    remapped = build_data(DataSettings(dataset=f"hfds/{tmp_path / 'hub'}", workers=0,
                                       class_map=str(tmp_path / "reversed.txt")), model)
    assert remapped.label_names == ["cat", "dog"] and [int(remapped.val[i][1]) for i in range(2)] == [0, 1]


# -------------------------------------------------------------------------------------------- Hugging Face datasets


def test_a_hub_dataset_by_its_id_from_the_cache_offline(tmp_path: Path) -> None:
    """What `load_dataset("alice/pets")` left in the cache is read by its Hub id, without a network."""
    rng = np.random.default_rng(5)
    rows = [(_png(rng), 0), (_png(rng), 1)]
    staging = tmp_path / "staging"
    datasets.load_dataset(str(_hub(tmp_path / "pets", {"train": rows, "validation": rows}, ("cat", "dog"))),
                          cache_dir=str(staging))
    (tmp_path / "hf-cache").mkdir()
    (staging / "pets").rename(tmp_path / "hf-cache" / "alice___pets")  # the Hub's cache layout: ORG___NAME/...
    train, val = hub_splits("hfds/alice/pets")
    images, _ = build_datasets(train, None, data_config=CFG, num_classes=2)
    assert (train.split, val.split, images.targets, str(val)) == ("train", "validation", [0, 1],
                                                                  "hfds/alice/pets (split validation)")
    assert data_fingerprint(images)["root"] == "hfds/alice/pets"
    assert hub_dataset_id("hfds/alice/pets") == hub_dataset_id("HFDS/alice/pets") == "alice/pets"
    assert hub_dataset_id(f"hfds/{tmp_path / 'pets'}") is None and hub_dataset_id(None) is None


def test_hub_dataset_columns_and_what_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    rows = [(_png(rng), 0), (_png(rng), 1)]
    cifar_like = _hub(tmp_path / "cifar", {"train": rows, "test": rows}, ("a", "b"), image="img")  # uoft-cs/cifar10
    train, val = hub_splits(f"hfds/{cifar_like}")
    assert val.split == "test" and build_datasets(train, val, data_config=CFG, num_classes=2)[1].targets == [0, 1]

    two_labels = tmp_path / "two"
    features = datasets.Features({"image": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b"]),
                                  "coarse_label": datasets.ClassLabel(names=["x"])})
    (two_labels / "data").mkdir(parents=True)
    table = {"image": [{"bytes": rows[0][0], "path": None}], "fine_label": [0], "coarse_label": [0]}
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(two_labels / "data" / "train.parquet"))
    with pytest.raises(LatePhaseError, match=r"2 ClassLabel columns \(fine_label, coarse_label\), none named 'label'"):
        hub_splits(f"hfds/{two_labels}")
    unlabelled = _hub(tmp_path / "unlabelled", {"train": rows, "test": [(rows[0][0], -1)]}, ("a", "b"))
    with pytest.raises(LatePhaseError, match=r"split test\) has unlabelled rows"):
        build_datasets(*hub_splits(f"hfds/{unlabelled}"), data_config=CFG, num_classes=2)
    with pytest.raises(LatePhaseError, match="cannot open the Hugging Face dataset nobody/nothing"):
        hub_splits("hfds/nobody/nothing")

    monkeypatch.setitem(sys.modules, "datasets", None)  # the library not installed
    config = FinetuneConfig(model=MODEL, pretrained=False, num_classes=2, dataset=f"hfds/{cifar_like}", workers=0,
                            output=str(tmp_path / "run"))
    with pytest.raises(LatePhaseError, match=r"needs the Hugging Face datasets library: pip install 'lpconvert\[hf"):
        run(config)
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_dataset_settings_are_checked_with_the_others(tmp_path: Path) -> None:
    with pytest.raises(LatePhaseError, match="--dataset replaces --data, --train-dir and --val-dir"):
        FinetuneConfig(dataset="hfds/alice/pets", data=str(tmp_path))
    with pytest.raises(LatePhaseError, match=r"--dataset takes hfds/NAME .*got 'hfids/alice/pets'"):
        FinetuneConfig(dataset="hfids/alice/pets")
    with pytest.raises(LatePhaseError, match="--class-map names the classes of folders or a dataset"):
        FinetuneConfig(data="sklearn-digits", class_map=str(tmp_path / "classes.txt"))
    with pytest.raises(LatePhaseError, match="pass the evaluation data: --data .* or --dataset hfds/NAME"):
        evaluate(MODEL)
