"""Labels: which model output a class (a folder, or a name in a dataset's ClassLabel) stands for.

Labels follow the alphabetical order of the class folders — or a Hugging Face dataset's own class order — except that
classes named by ImageNet WordNet IDs are mapped to the model's ImageNet class indices (``class_map="auto"``); a
class-map text file (``--class-map``) gives the order explicitly.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from timm.data import ImageNetInfo, infer_imagenet_subset

from lpconvert.errors import LatePhaseError

__all__ = ["ClassCountError", "class_to_index", "output_names"]


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
    classes: Sequence[str], num_classes: int | None, class_map: str | os.PathLike | Sequence[str] = "auto", *,
    ordered: bool = False, complete: bool = False,
) -> dict[str, int]:
    """Map class names (folders) to the model's label indices.

    ``class_map``: ``"folder"`` — alphabetical order of the folders (with ``ordered``: the order of ``classes``, a
    dataset's ClassLabel), which must number ``num_classes``;
    ``"imagenet"`` — folders are WordNet IDs (``n01440764``) mapped to their index in the ImageNet label set that
    timm infers from ``num_classes`` (1000: ImageNet-1k; also 21k/12k/22k variants), a subset of classes is fine;
    ``"auto"`` — ``"imagenet"`` when every folder is a WordNet ID of that label set, else ``"folder"``;
    any other string or path — a text file with one class name per line, line ``i`` being label ``i`` (timm's class
    map; ``--class-map FILE``); a sequence of names (not a string) — those names in label order, as a run records
    them. A class map names each of the ``num_classes`` outputs once: duplicates, a class of ``classes`` it does not
    list and a count other than ``num_classes`` are refused; with ``complete`` (training data, whose classes the
    outputs are named after) so is a listed name that is not among ``classes``.

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
        return _mapped(classes, num_classes, class_map, complete)
    if num_classes is not None and len(classes) != num_classes:
        raise ClassCountError(len(classes), num_classes)
    return {name: i for i, name in enumerate(classes)}


def output_names(class_to_idx: Mapping[str, int], num_classes: int | None) -> list[str]:
    """The name of each model output, in label order (a model's ``label_names``): the classes by their index — or,
    when they are WordNet IDs mapped into an ImageNet head they do not fill (:func:`class_to_index`'s
    ``"imagenet"``), that head's whole ImageNet label set."""
    names = sorted(class_to_idx, key=class_to_idx.get)
    synsets = _imagenet_synsets(num_classes) if len(names) != num_classes else []
    if synsets and all(index < len(synsets) and synsets[index] == name for name, index in class_to_idx.items()):
        return synsets
    return names


def _imagenet_synsets(num_classes: int | None) -> list[str]:
    subset = infer_imagenet_subset({"num_classes": num_classes}) if num_classes else None
    return list(ImageNetInfo(subset).label_names()) if subset else []


def _mapped(classes: Sequence[str], num_classes: int | None, class_map: str | os.PathLike | Sequence[str],
            complete: bool) -> dict[str, int]:
    """``classes`` → their line in the class map (a file, or the names themselves), every name listed once."""
    names, where = _class_map_names(class_map)
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise LatePhaseError(f"{where} lists {_listed(repeated)} more than once; list each class once (line i is "
                             "label i)")
    listed, present = set(names), set(classes)
    missing = [name for name in classes if name not in listed]
    if missing:
        raise LatePhaseError(f"class{'es' * (len(missing) > 1)} {_listed(missing)} "
                             f"{'are' if len(missing) > 1 else 'is'} not listed in {where}; add "
                             f"{'them' if len(missing) > 1 else 'it'} (one name per line, line i is label i)")
    absent = [name for name in names if name not in present] if complete else []
    if absent:
        raise LatePhaseError(f"{where} lists {_listed(absent)}, which the training data has no class for; remove "
                             f"{'them' if len(absent) > 1 else 'it'} or add the images: every output is trained and "
                             "named after a class of the data")
    if num_classes is not None and len(names) != num_classes:
        raise ClassCountError(len(names), num_classes, f"{where} lists")
    index = {name: i for i, name in enumerate(names)}
    return {name: index[name] for name in classes}


def _class_map_names(class_map: str | os.PathLike | Sequence[str]) -> tuple[list[str], str]:
    """The names of a class map in label order, and how a message names the map."""
    if not isinstance(class_map, (str, os.PathLike)):
        return [str(name) for name in class_map], "the recorded class names"
    path = Path(class_map)
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise LatePhaseError(
            f"cannot read class map {path}: {getattr(exc, 'strerror', None) or exc}; pass a text file with one "
            "class name per line"
        ) from exc
    return names, f"the class map {path}"


def _listed(names: Sequence[str], shown: int = 5) -> str:
    """Names quoted and comma-separated, the first `shown` of them and how many more."""
    text = ", ".join(repr(name) for name in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")
