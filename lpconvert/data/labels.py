"""Labels: which model output a class (a folder, or a name in a dataset's ClassLabel) stands for.

Labels follow the alphabetical order of the class folders — or a Hugging Face dataset's own class order — except that
classes named by ImageNet WordNet IDs are mapped to the model's ImageNet class indices (``class_map="auto"``); a
class-map text file (``--class-map``) gives the order explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from timm.data import ImageNetInfo, infer_imagenet_subset

from lpconvert.errors import LatePhaseError

__all__ = ["ClassCountError", "class_to_index"]


class ClassCountError(LatePhaseError):
    """The data has a different number of classes than the model has outputs. The message suits any caller;
    :meth:`for_command` gives the fix of one ``lpconvert`` command (finetune can train a new head, evaluate cannot)."""

    def __init__(self, data_classes: int, model_classes: int, subject: str = "the data has") -> None:
        self.data_classes, self.model_classes = data_classes, model_classes
        self.mismatch = f"{subject} {data_classes} classes but the model has {model_classes} outputs"
        super().__init__(f"{self.mismatch}; train a new head for them (lpconvert finetune --num-classes "
                         f"{data_classes}), or use data of the model's {model_classes} classes")

    def for_command(self, command: str | None) -> str:
        """The message for ``lpconvert COMMAND``: the fix that command has."""
        if command in ("finetune", "compare"):
            return f"{self.mismatch}; pass --num-classes {self.data_classes} to train a new head"
        if command == "evaluate":
            return (f"{self.mismatch}; evaluate it on data of its {self.model_classes} classes, or first train a "
                    f"head for these: lpconvert finetune MODEL --num-classes {self.data_classes} --data …")
        return str(self)


def class_to_index(
    classes: Sequence[str], num_classes: int | None, class_map: str | os.PathLike = "auto", *, ordered: bool = False
) -> dict[str, int]:
    """Map class names (folders) to the model's label indices.

    ``class_map``: ``"folder"`` — alphabetical order of the folders (with ``ordered``: the order of ``classes``, a
    dataset's ClassLabel), which must number ``num_classes``;
    ``"imagenet"`` — folders are WordNet IDs (``n01440764``) mapped to their index in the ImageNet label set that
    timm infers from ``num_classes`` (1000: ImageNet-1k; also 21k/12k/22k variants), a subset of classes is fine;
    ``"auto"`` — ``"imagenet"`` when every folder is a WordNet ID of that label set, else ``"folder"``;
    any other value — a text file with one class name per line, line ``i`` being label ``i`` (timm's class map;
    ``--class-map FILE``).

    Example: ``class_to_index(["n01443537", "n01440764"], 1000)`` gives ``{"n01440764": 0, "n01443537": 1}``.
    """
    classes = list(classes) if ordered else sorted(classes)
    if class_map in ("auto", "imagenet"):
        synsets = _imagenet_synsets(num_classes)
        unknown = sorted(set(classes) - set(synsets)) if synsets else classes
        if not unknown:
            index = {name: i for i, name in enumerate(synsets)}
            return {name: index[name] for name in classes}
        if class_map == "imagenet":
            if not synsets:
                raise LatePhaseError(
                    f"class_map 'imagenet' needs an ImageNet head (1000 classes or an ImageNet-21k/12k/22k size), "
                    f"but the model head has {num_classes}; use class_map 'folder'"
                )
            raise LatePhaseError(
                f"class {unknown[0]!r} is not an ImageNet class ID (WordNet ID like n01440764); "
                "use class_map 'folder'"
            )
    elif class_map != "folder":
        return _class_map_file(Path(class_map), classes, num_classes)
    if num_classes is not None and len(classes) != num_classes:
        raise ClassCountError(len(classes), num_classes)
    return {name: i for i, name in enumerate(classes)}


def _imagenet_synsets(num_classes: int | None) -> list[str]:
    subset = infer_imagenet_subset({"num_classes": num_classes}) if num_classes else None
    return list(ImageNetInfo(subset).label_names()) if subset else []


def _class_map_file(path: Path, classes: Sequence[str], num_classes: int | None) -> dict[str, int]:
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise LatePhaseError(
            f"cannot read class map {path}: {exc.strerror or exc}; pass a text file with one class name per line"
        ) from exc
    index = {name: i for i, name in enumerate(names)}
    missing = [name for name in classes if name not in index]
    if missing:
        raise LatePhaseError(f"class {missing[0]!r} is not listed in the class map {path}; add it")
    if num_classes is not None and max((index[name] for name in classes), default=-1) >= num_classes:
        raise ClassCountError(len(names), num_classes, f"the class map {path} lists")
    return {name: index[name] for name in classes}
