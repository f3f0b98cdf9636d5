"""One way to reopen a run (lpconvert.run.saved): a run with its own input size, crop, hold-out and class order is
read back the same way by `evaluate RUN`, `evaluate RUN/model`, `collapse` + `evaluate`, and its own report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpconvert.collapse.command import collapse_run
from lpconvert.config import FinetuneConfig
from lpconvert.evaluate.command import evaluate
from lpconvert.run.saved import load_run, reading
from lpconvert.train.finetune import run

CLASSES = ("ant", "bee", "cat")


def _tree(root: Path) -> Path:
    """train/ (8 per class) and test/ (4 per class): 24×24 PNGs whose centre is brighter for later classes and whose
    border is noise, so the crop and the input size change what the model sees."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 4)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                image[6:18, 6:18] = np.clip(image[6:18, 6:18] // 4 + 80 * label, 0, 255)
                Image.fromarray(image).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = _tree(tmp_path_factory.mktemp("data"))
    classes = root.parent / "classes.txt"
    classes.write_text("cat\nant\nbee\n")  # not the folders' alphabetical order
    out = root.parent / "run"
    report = run(FinetuneConfig(model="cifar_resnet20", pretrained=False, num_classes=3, data=str(root), K=2,
                                epochs=1, batch_size=6, lr=0.05, img_size=16, crop_pct=0.75, val_split=0.25,
                                class_map=str(classes), workers=0, quiet=True, output=str(out)))
    classes.unlink()  # the run recorded its class order: reopening needs the file no more
    return root, out, report


def test_a_run_is_read_back_as_it_ran(trained, tmp_path):
    root, out, report = trained
    saved = load_run(out)
    assert (saved.data.img_size, saved.data.crop_pct, saved.data.val_split) == (16, 0.75, 0.25)
    assert saved.data.class_map == ("cat", "ant", "bee") == reading(out / "model").class_map
    recorded = json.loads((out / "model" / "lpconvert.json").read_text())["metrics"]["test"]
    assert report["validation"] == "held-out" and report["test_top1"] == recorded["top1"]

    collapse_run(out, tmp_path / "collapsed")
    rows = {name: evaluate(str(source), str(root), workers=0)[0]
            for name, source in (("run", out), ("model", out / "model"), ("collapsed", tmp_path / "collapsed"))}
    for name, row in rows.items():
        assert row["count"] == 12, name  # the test set: nothing held out of it
        assert row["top1"] == report["test_top1"], name
        assert row["nll"] == pytest.approx(recorded["nll"], rel=1e-5, abs=1e-6), name


def test_the_runs_reading_is_what_makes_the_numbers_agree(trained, tmp_path):
    """The same model read at its architecture's default size (32 px) and in alphabetical class order scores other
    numbers: the agreement above is not an accident of the data."""
    root, out, _ = trained
    model = f"local-dir:{out / 'model'}"
    config = json.loads((out / "model" / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 32, 32]
    config.pop("label_names", None)
    other = tmp_path / "default-reading"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((out / "model" / "model.safetensors").read_bytes())
    own = evaluate(model, str(root), workers=0)[0]
    default = evaluate(str(other), str(root), workers=0)[0]
    assert default["nll"] != pytest.approx(own["nll"], rel=1e-3)
