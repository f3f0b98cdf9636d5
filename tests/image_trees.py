"""Small image folders for tests: two-class RGB trees and folders of given files."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def two_class_tree(root: Path, size: int = 32, per_class: int = 4) -> Path:
    """`root`/train and `root`/val, each with classes ``a`` and ``b`` of `per_class` plain RGB PNGs of `size` px."""
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (40 * i, 200 if label == "a" else 20, 60)).save(
                    root / split / label / f"{i}.png")
    return root


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    """`root` with each relative path of `files` holding its bytes."""
    for name, payload in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(payload)
    return root
