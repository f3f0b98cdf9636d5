"""Data that must not be taken at its word: class maps that misname outputs, tar archives read in place that must
read as their extracted tree (hard links, files beside the class folders, damaged archives inside them), progress
bars under ``--quiet``, hold-outs too small for their classes, a test split beside the validation split, and input
sizes no memory holds. Every data set is made in the test."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from huggingface_hub import utils as hub_utils
from image_trees import write_files
from PIL import Image
from torch.utils.data import TensorDataset

from lpconvert.cli import main
from lpconvert.data import (
    build_data,
    build_datasets,
    class_to_index,
    data_fingerprint,
    hub_splits,
    resolve_data_dirs,
)
from lpconvert.data.archives import data_splits
from lpconvert.data.datasets import hold_out
from lpconvert.data.hfds import hub_sources
from lpconvert.data.labels import ClassCountError
from lpconvert.data.selection import split_indices
from lpconvert.data.settings import DataSettings
from lpconvert.errors import LatePhaseError

MODEL = "cifar_lenet5_bn"
CFG = {"input_size": (3, 8, 8), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
       "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _tree(root: Path, splits: tuple[str, ...], classes: tuple[str, ...], per_class: int) -> Path:
    """ImageFolder splits of `per_class` distinct 8×8 PNGs per class."""
    return write_files(root, {f"{split}/{name}/{i}.png": _png(hash((split, name, i)) % 2**32)
                          for split in splits for name in classes for i in range(per_class)})


def _tar_bytes(members: dict[str, bytes | tuple[str, str]]) -> bytes:
    """An uncompressed tar of `members`: bytes are a file's, ("hard" | "sym", target) a link."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(payload, tuple):
                info.type = tarfile.LNKTYPE if payload[0] == "hard" else tarfile.SYMTYPE
                info.linkname = payload[1]
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _model(num_classes: int = 2) -> torch.nn.Module:
    return timm.create_model(MODEL, num_classes=num_classes)


def _hub(root: Path, splits: dict[str, list[tuple[bytes, int]]], names: tuple[str, ...]) -> Path:
    """A local Hugging Face dataset folder (Parquet files, as on the Hub) with an Image and a ClassLabel column."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        table = datasets.Dataset.from_dict({"image": [{"bytes": png, "path": None} for png, _ in rows],
                                            "label": [y for _, y in rows]}, features=features)
        table.to_parquet(str(root / "data" / f"{split}.parquet"))
    return root


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path / "lpconvert-cache"))


# ---------------------------------------------------------------------------------------------------- class maps


def test_a_class_map_names_every_output_once_and_only_classes_of_the_training_data(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", ("train", "val"), ("cat", "dog"), 1)
    model = _model(2)

    def built(lines: str, num_classes: int = 2):
        (tmp_path / "classes.txt").write_text(lines)
        settings = DataSettings(data=str(root), workers=0, class_map=str(tmp_path / "classes.txt"))
        return build_data(settings, _model(num_classes) if num_classes != 2 else model)

    good = built("dog\ncat\n")
    assert good.label_names == ["dog", "cat"] and [int(good.val[i][1]) for i in range(2)] == [1, 0]
    with pytest.raises(LatePhaseError, match=r"classes\.txt lists 'dog' more than once"):
        built("dog\ncat\ndog\n")
    with pytest.raises(LatePhaseError, match=r"lists 'bird', which the training data has no class for"):
        built("dog\nbird\ncat\n", num_classes=3)  # output 1 would be named 'bird' and never trained
    with pytest.raises(LatePhaseError, match=r"classes 'cat', 'dog' are not listed in the class map"):
        built("cow\nemu\n")
    with pytest.raises(ClassCountError, match=r"classes\.txt lists 2 classes but the model has 3 outputs"):
        built("dog\ncat\n", num_classes=3)  # output 2 would have no name

    # WordNet IDs in an ImageNet head they do not fill: the head's 1,000 names, each at its output
    imagenet = _tree(tmp_path / "imagenet", ("train", "val"), ("n01443537", "n01440764"), 1)
    subset = build_data(DataSettings(data=str(imagenet), workers=0), _model(1000))
    assert len(subset.label_names) == 1000 and subset.label_names[:2] == ["n01440764", "n01443537"]
    assert subset.label_names[999] == "n15075141" and sorted(int(subset.val[i][1]) for i in range(2)) == [0, 1]

    # the names a run recorded, in label order: the same rules; evaluating on some of the classes is fine
    assert class_to_index(["cat"], 3, ("dog", "bird", "cat")) == {"cat": 2}
    with pytest.raises(LatePhaseError, match="the recorded class names lists 'cat' more than once"):
        class_to_index(["cat"], 3, ("cat", "dog", "cat"))
    with pytest.raises(LatePhaseError, match="lists 'bird', which the training data has no class"):
        build_datasets(root / "train", None, data_config=CFG, num_classes=3, class_map=("dog", "bird", "cat"))


# ------------------------------------------------------------------------------------------- tar archives in place


def test_links_in_a_tar_read_in_place_read_as_the_extracted_tree(tmp_path: Path, caplog) -> None:
    cat, dog = _png(1), _png(2)
    members = {"cat/0.png": cat, "cat/1.png": ("hard", "cat/0.png"), "dog/0.png": dog,
               "dog/1.png": ("hard", "cat/0.png"),  # a hard link across classes: the same bytes, labelled dog
               "dog/2.png": ("sym", "0.png"), "dog/3.png": ("sym", "../cat/0.png"),
               "dog/gone.png": ("sym", "../../outside.png")}
    plain = tmp_path / "train.tar"
    plain.write_bytes(_tar_bytes(members))
    packed = tmp_path / "packed" / "train.tar.gz"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(_tar_bytes({k: v for k, v in members.items() if k != "dog/gone.png"})))
    with caplog.at_level("WARNING", logger="lpconvert.data.datasets"):
        _, in_place = build_datasets(None, resolve_data_dirs(val_dir=plain)[1], data_config=CFG, num_classes=2)
    _, extracted = build_datasets(None, resolve_data_dirs(val_dir=packed)[1], data_config=CFG, num_classes=2)
    names = ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/2.png", "dog/3.png"]
    assert [Path(p).relative_to(plain).as_posix() for p, _ in in_place.samples] == names
    assert in_place.targets == extracted.targets == [0, 0, 1, 1, 1, 1]
    assert data_fingerprint(in_place)["sha256"] == data_fingerprint(extracted)["sha256"]
    pixels = [in_place[i][0] for i in range(6)]
    assert all(torch.equal(pixels[i], extracted[i][0]) for i in range(6))
    assert torch.equal(pixels[3], pixels[0]) and torch.equal(pixels[4], pixels[2]) and torch.equal(pixels[5], pixels[0])
    assert any("skipped 1 symlink(s)" in r.getMessage() and "dog/gone.png" in r.getMessage() for r in caplog.records)

    dangling = tmp_path / "dangling.tar"
    dangling.write_bytes(_tar_bytes({"cat/0.png": cat, "dog/0.png": ("hard", "dog/missing.png")}))
    with pytest.raises(LatePhaseError, match=r"'dog/0\.png' is a hard link to 'dog/missing\.png', which is no file"):
        resolve_data_dirs(train_dir=dangling)
    (tmp_path / "dangling.tar.gz").write_bytes(gzip.compress(dangling.read_bytes()))  # extraction: no KeyError
    with pytest.raises(LatePhaseError, match=r"refusing to extract .*'dog/0\.png' is a hard link"):
        resolve_data_dirs(train_dir=tmp_path / "dangling.tar.gz")


def test_only_folders_are_classes_in_a_tar_read_in_place(tmp_path: Path) -> None:
    extras = _tar_bytes({"notes.txt": b"not an image"})
    files = {"cat/0.png": _png(1), "dog/0.png": _png(2), "README.md": b"# about", "extras.tar": extras}
    archive = tmp_path / "train.tar"
    archive.write_bytes(_tar_bytes(files))
    in_place, _ = build_datasets(resolve_data_dirs(train_dir=archive)[0], None, data_config=CFG, num_classes=None)
    extracted, _ = build_datasets(write_files(tmp_path / "train", files), None, data_config=CFG, num_classes=None)
    assert in_place.classes == extracted.classes == ["cat", "dog"] and in_place.targets == [0, 1]

    # a tree of class archives only (ImageNet's training archive): each archive is a class
    imagenet = tmp_path / "imagenet.tar"
    imagenet.write_bytes(_tar_bytes({"cat.tar": _tar_bytes({"0.png": _png(1)}),
                                     "dog.tar": _tar_bytes({"0.png": _png(2)}), "README.md": b"# about"}))
    tree = resolve_data_dirs(train_dir=imagenet)[0]
    assert build_datasets(tree, None, data_config=CFG, num_classes=None)[0].classes == ["cat", "dog"]


def test_a_damaged_tar_inside_a_tar_is_named(tmp_path: Path) -> None:
    good = _tar_bytes({"0.png": _png(1)})
    for name, inner in (("garbage", b"\x01" * 1024), ("cut", _tar_bytes({"0.png": _png(2), "1.png": _png(3)})[:700])):
        archive = tmp_path / f"{name}.tar"
        archive.write_bytes(_tar_bytes({"n01440764.tar": good, "n01443537.tar": inner}))
        with pytest.raises(LatePhaseError) as info:
            resolve_data_dirs(train_dir=archive)
        assert f"cannot read {archive}/n01443537.tar, a tar archive inside {name}.tar" in str(info.value)
    whole = _tar_bytes({"n01440764.tar": good, "n01443537.tar": good})
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        second = tar.getmember("n01443537.tar")
    cut = tmp_path / "outer-cut.tar"
    cut.write_bytes(whole[:second.offset_data + second.size // 2])  # the outer archive ends inside the second one
    with pytest.raises(LatePhaseError, match=rf"cannot read {cut}: it ends inside n01443537\.tar; check that the "):
        resolve_data_dirs(train_dir=cut)


# ------------------------------------------------------------------------------------------------- --quiet


def test_quiet_hides_the_datasets_progress_bars_and_leaves_the_users_setting(tmp_path: Path, capfd) -> None:
    rows = [(_png(i), i % 2) for i in range(4)]
    loud, quiet = (_hub(tmp_path / name, {"train": rows, "validation": rows}, ("a", "b")) for name in ("loud", "quiet"))
    capfd.readouterr()
    hub_splits(f"hfds/{loud}")
    assert "Generating train split" in capfd.readouterr().err  # the bars this test would catch
    hub_splits(f"hfds/{quiet}", quiet=True)
    assert "Generating" not in capfd.readouterr().err
    assert not datasets.are_progress_bars_disabled() and not hub_utils.are_progress_bars_disabled()

    datasets.disable_progress_bars()  # the user's own choice stays as it was
    try:
        hub_splits(f"hfds/{_hub(tmp_path / 'again', {'train': rows}, ('a', 'b'))}", quiet=True)
        assert datasets.are_progress_bars_disabled()
    finally:
        datasets.enable_progress_bars()


# --------------------------------------------------------------------------------------------------- hold-outs


def test_a_hold_out_without_an_image_of_every_class_is_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", ("train", "test"), ("ant", "bee", "cat"), 6)  # 18 training images, 3 classes
    model = _model(3)
    with pytest.raises(LatePhaseError) as info:
        build_data(DataSettings(data=str(root), workers=0, val_split=0.1), model)
    assert str(info.value) == ("--val-split 0.1 holds out 2 of the 18 training images for 3 classes, so 1 class gets "
                               "no validation image; use --val-split 0.17 or more, which gives every class at least "
                               "one")
    data = build_data(DataSettings(data=str(root), workers=0, val_split=0.17), model)
    assert data.val_role == "held-out" and sorted(int(data.val[i][1]) for i in range(3)) == [0, 1, 2]

    digits_like = TensorDataset(torch.zeros(1200, 1), torch.arange(1200) % 10)  # the digits' 1,200 training images
    with pytest.raises(LatePhaseError, match=r"--val-split 0\.005 holds out 6 of the 1200 training images for 10 "
                                             r"classes, so 4 classes get .*use --val-split 0\.0084 or more"):
        hold_out(digits_like, digits_like, 0.005, seed=0)
    assert hold_out(digits_like, digits_like, 0.0084, seed=0)[1].tensors[1].unique().tolist() == list(range(10))

    lopsided = [0] * 98 + [1, 2]  # --selection-split (and --calibration-split) stratify alike
    with pytest.raises(LatePhaseError, match=r"^--selection-split 0\.1 holds out 10 of the 100 evaluation images for "
                                             r"3 classes, so 2 classes get no held-out image; use --selection-split "
                                             r"0\.67 or more"):
        split_indices(lopsided, 0.1)
    assert sorted({lopsided[i] for i in split_indices(lopsided, 0.67)[0]}) == [0, 1, 2]
    with pytest.raises(LatePhaseError, match=r"so 2 classes get no held-out image, and no --selection-split gives "
                                             r"every class one; use an evaluation set with more images of each class"):
        split_indices([0, 1, 2, 3], 0.5)  # one image a class: a part of every class leaves none for the rest


# -------------------------------------------------------------------------------------------- val/ beside test/


def test_a_test_split_beside_the_validation_split_is_the_test_set(tmp_path: Path) -> None:
    classes = ("ant", "bee")
    root = _tree(tmp_path / "data", ("train",), classes, 4)
    _tree(root, ("val",), classes, 2)
    _tree(root, ("test",), classes, 3)
    data = build_data(DataSettings(data=str(root), workers=0, val_subset=2), _model(2))
    assert data.val_role == "validation" and len(data.train) == 8 and len(data.val) == 2 and len(data.test) == 6
    assert data.fingerprint["val"]["held_out"] is False and data.fingerprint["test"]["num_files"] == 6
    assert {Path(p).parent.parent.name for p, _ in data.test.samples} == {"test"}
    assert sorted(int(data.test[i][1]) for i in range(6)) == [0, 0, 0, 1, 1, 1]

    whole = tmp_path / "whole.tar"  # the same root as one archive read in place
    with tarfile.open(whole, "w") as tar:
        tar.add(root, arcname="data")
    found = data_splits(whole)
    assert (found.train.name, found.val.name, found.test.name, found.evaluation) == ("train", "val", "test",
                                                                                     "validation")
    assert resolve_data_dirs(whole)[1].name == "val"
    cifar_like = data_splits(_tree(tmp_path / "cifar", ("train", "test"), classes, 1))  # test/ alone: selects nothing
    assert cifar_like.val.name == "test" and cifar_like.evaluation == "test" and cifar_like.test is None

    rows = [(_png(i), i % 2) for i in range(4)]
    hub = _hub(tmp_path / "hub", {"train": rows, "validation": rows[:2], "test": rows[:3]}, classes)
    train, val, test = hub_sources(f"hfds/{hub}")
    assert (train.split, val.split, test.split) == ("train", "validation", "test")
    on_hub = build_data(DataSettings(dataset=f"hfds/{hub}", workers=0), _model(2))
    assert on_hub.val_role == "validation" and len(on_hub.val) == 2 and len(on_hub.test) == 3


# ---------------------------------------------------------------------------------------------------- --img-size


def test_an_input_size_no_memory_holds_is_blamed_on_its_flag(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", ("train", "val"), ("ant", "bee"), 2)
    model = _model(2)
    with pytest.raises(LatePhaseError, match=r"^--img-size 100000 is too large: images of 100000×100000 pixels"):
        build_data(DataSettings(data=str(root), workers=0, img_size=100000), model)
    with pytest.raises(LatePhaseError, match=r"^--input-size 3 8193 32 is too large"):
        build_data(DataSettings(data=str(root), workers=0, input_size=(3, 8193, 32)), model)
    with pytest.raises(LatePhaseError, match=r"^--crop-pct 0\.001 resizes the images to 32000 pixels a side .* at "
                                             r"least 0\.004$"):
        build_data(DataSettings(data=str(root), workers=0, crop_pct=0.001), model)
    assert build_data(DataSettings(data=str(root), workers=0, img_size=8192, data_in_memory="off"), model)

    result = CliRunner().invoke(main, ["finetune", MODEL, "--no-pretrained", "--num-classes", "2", "--data", str(root),
                                       "--img-size", "100000", "--workers", "0", "--output", str(tmp_path / "run")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --img-size 100000 is too large")
    assert ".png" not in lines[0] and not (tmp_path / "run").exists()
