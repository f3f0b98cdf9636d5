"""Common corruptions: generated deterministically from the evaluation images only, cached, read back from published
layouts (CIFAR-10-C arrays, ImageNet-C folders) with the same numbers, and summarised as the mean corruption error."""

from __future__ import annotations

import json
from importlib import metadata

import numpy as np
import pytest
from evaluation_sets import CLASSES, cifar_tree, invoke, predict, tree_images
from PIL import Image

from lpconvert.errors import LatePhaseError
from lpconvert.evaluate import corruptions
from lpconvert.evaluate.command import eval_set, evaluate
from lpconvert.evaluate.corruptions import (
    CORRUPTIONS,
    corrupt_image,
    corruption_summary,
    generated_sets,
)

TYPES, LEVELS = ("gaussian_noise", "contrast"), (1, 3)


@pytest.fixture(scope="module")
def tiny_root(cifar10_test_dir, tmp_path_factory):
    """A data root: test/ with 4 CIFAR-10 test images per class, train/ with 2 others per class."""
    root = tmp_path_factory.mktemp("tiny-cifar")
    cifar_tree(cifar10_test_dir, root / "test", 4)
    cifar_tree(cifar10_test_dir, root / "train", 2, skip=4)
    return root


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LPCONVERT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_corruption_gives_the_same_bytes_twice(cifar10_test_dir):
    """All 15 types at severity 3 on a real 32-px image: the same bytes on a second call, other bytes for another
    image index (the random ones), NumPy's global random state untouched, uint8 of the input's shape."""
    image = np.asarray(Image.open(sorted((cifar10_test_dir / "cat").iterdir())[0]).convert("RGB"))
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    seeded = set()
    for corruption in CORRUPTIONS:
        first = corrupt_image(image, corruption, 3, index=7)
        assert first.dtype == np.uint8 and first.shape == image.shape
        assert np.array_equal(first, corrupt_image(image, corruption, 3, index=7)), corruption
        assert not np.array_equal(first, image), corruption
        if not np.array_equal(first, corrupt_image(image, corruption, 3, index=8)):
            seeded.add(corruption)
    assert np.array_equal(np.random.get_state()[1], state)
    assert seeded == {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost",
                      "fog", "elastic_transform"}  # the others draw nothing at random


def test_generated_sets_are_the_evaluation_images_corrupted_and_are_cached(tiny_root, cache, cifar_resnet_weights):
    """The cached sets hold exactly the 40 test images (not the 20 training images), each corrupted with its own
    seed; a second evaluation reuses them (nothing rewritten) and the clean figures do not change."""
    weights = str(cifar_resnet_weights[20])
    kwargs = dict(data=str(tiny_root), weights=weights, workers=0, device="cpu", batch_size=16)
    clean = evaluate("cifar_resnet20", **kwargs)[0]
    row = evaluate("cifar_resnet20", corruptions=True, corruption_types=TYPES, severities=LEVELS, **kwargs)[0]
    assert {k: row[k] for k in clean} == clean
    files = sorted(cache.glob("corruptions/*/*.npy"))
    assert [f.name for f in files] == sorted(f"{c}-{s}.npy" for c in TYPES for s in LEVELS)
    images, _ = tree_images(tiny_root / "test")
    for path in files:
        corruption, severity = path.stem.rsplit("-", 1)
        saved = np.load(path)
        assert saved.shape == (40, 32, 32, 3)
        for i in (0, 17, 39):
            assert np.array_equal(saved[i], corrupt_image(images[i], corruption, int(severity), i))
    times = [f.stat().st_mtime_ns for f in files]
    again = evaluate("cifar_resnet20", corruptions=True, corruption_types=TYPES, severities=LEVELS,
                                     **kwargs)[0]
    assert again == row and [f.stat().st_mtime_ns for f in files] == times


def test_mean_corruption_error_is_the_hand_computation(tiny_root, cache, pretrained_cifar_resnet,
                                                       cifar_resnet_weights):
    """mCE and the per-severity accuracies of `lpconvert evaluate --corruptions` equal the same figures computed by
    hand: corrupt each image, preprocess it by hand, count the errors."""
    result = invoke("evaluate", "cifar_resnet20", "--weights", cifar_resnet_weights[20], "--data", tiny_root,
                    "--corruptions", "--corruption-types", ",".join(TYPES), "--severities", "1,3", "-j", 0,
                    "--device", "cpu", "--json", cache.parent / "rows.json")
    assert result.exit_code == 0, result.output
    row = json.loads((cache.parent / "rows.json").read_text())[0]
    model = pretrained_cifar_resnet(20)
    images, labels = tree_images(tiny_root / "test")
    errors = {}
    for c in TYPES:
        for s in LEVELS:
            corrupted = np.stack([corrupt_image(image, c, s, i) for i, image in enumerate(images)])
            errors[c, s] = 100.0 * float((predict(model, corrupted).argmax(1).numpy() != labels).mean())
    assert row["mce"] == pytest.approx(sum(errors.values()) / 4, abs=1e-9)
    for s in LEVELS:
        assert row[f"corruption/severity{s}"] == pytest.approx(100 - (errors[TYPES[0], s] + errors[TYPES[1], s]) / 2)
    assert 0 < row["mce"] < 100 and row["mce"] > 100 - row["top1"]  # corruptions cost accuracy
    assert "mCE" in result.stdout and "gaussian_noise" in result.stdout


def test_corruption_summary_by_hand():
    top1 = {("a", 1): 90.0, ("a", 2): 80.0, ("b", 1): 70.0, ("b", 2): 50.0}
    reference = {("a", 1): 80.0, ("a", 2): 60.0, ("b", 1): 60.0, ("b", 2): 40.0}
    summary = corruption_summary(top1, reference)
    assert summary["mce"] == pytest.approx((10 + 20 + 30 + 50) / 4)
    assert summary["corruption/severity2"] == pytest.approx(65.0)
    assert summary["ce/a"] == pytest.approx(100 * 30 / 60) and summary["ce/b"] == pytest.approx(100 * 80 / 100)
    assert summary["mce_ref"] == pytest.approx(65.0)
    with pytest.raises(LatePhaseError, match="no result for b at severity 2"):
        corruption_summary(top1, {k: v for k, v in reference.items() if k != ("b", 2)})


def test_published_layouts_give_the_generated_numbers(tiny_root, cache, tmp_path, cifar_resnet_weights):
    """The generated sets written out as CIFAR-10-C arrays and as ImageNet-C folders evaluate to the same accuracies
    (and the reference model's relative CE against itself is 100)."""
    import timm

    weights = str(cifar_resnet_weights[20])
    kwargs = dict(data=str(tiny_root), weights=weights, workers=0, device="cpu", batch_size=16,
                  corruption_types=TYPES, severities=LEVELS)
    generated = evaluate("cifar_resnet20", corruptions=True, **kwargs)[0]
    dataset = eval_set(timm.create_model("cifar_resnet20"), str(tiny_root), subset=None, batch_size=16, workers=0,
                       num_classes=10).dataset
    sets, _ = generated_sets(dataset, dataset.transform, types=TYPES, severities=LEVELS)
    _, labels = tree_images(tiny_root / "test")
    arrays, folders = tmp_path / "cifar10-c", tmp_path / "imagenet-c"
    arrays.mkdir()
    np.save(arrays / "labels.npy", np.tile(labels, 5))
    for c in TYPES:
        blocks = {s: next(item.dataset.images for item in sets if (item.corruption, item.severity) == (c, s))
                  for s in LEVELS}
        filler = np.zeros_like(blocks[1])
        np.save(arrays / f"{c}.npy", np.concatenate([blocks.get(s, filler) for s in range(1, 6)]))
        for s, block in blocks.items():
            for i, (image, label) in enumerate(zip(block, labels)):
                folder = folders / c / str(s) / CLASSES[label]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.asarray(image)).save(folder / f"{i:03d}.png")
    for directory in (arrays, folders):
        row = evaluate("cifar_resnet20", corruption_dir=str(directory), reference="cifar_resnet20",
                       reference_weights=weights, **kwargs)
        assert {k: v for k, v in row[0].items() if k.startswith("corruption/") and k != "corruption/count"} == \
            {k: v for k, v in generated.items() if k.startswith("corruption/") and k != "corruption/count"}
        assert row[0]["mce_ref"] == pytest.approx(100.0) and row[1]["variant"].startswith("reference")


def test_missing_library_and_bad_names_are_one_line(tiny_root, cache, monkeypatch, cifar_resnet_weights):
    result = invoke("evaluate", "cifar_resnet20", "--weights", cifar_resnet_weights[20], "--data", tiny_root,
                    "--corruptions", "--corruption-types", "gaussian_noise,fish", "-j", 0)
    assert result.exit_code == 2 and "unknown corruption type 'fish'" in result.output
    real = metadata.version

    def version(name):
        if name == "imagecorruptions-imaug":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    corruptions._library.cache_clear()  # looked up once per process: look again
    result = invoke("evaluate", "cifar_resnet20", "--weights", cifar_resnet_weights[20], "--data", tiny_root,
                    "--corruptions", "-j", 0)
    assert result.exit_code == 2 and "pip install 'lpconvert[corruptions]'" in result.output
    assert len(result.output.strip().splitlines()) == 1
