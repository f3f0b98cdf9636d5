"""Common corruptions (Hendrycks & Dietterich, ICLR 2019): the 15 corruption types at severities 1–5, generated from
the evaluation images or read from a published copy (ImageNet-C folders, CIFAR-10-C arrays), and the mean corruption
error over them.

Generated sets (:func:`generated_sets`) apply the ``imagecorruptions-imaug`` library (the maintained fork of
``imagecorruptions``, which carries ImageNet-C's reference code; ``pip install 'lpconvert[corruptions]'``) to the
evaluation images only, after the geometric part of the model's evaluation transform (resize, centre crop: ImageNet-C
corrupts the 224-px crops) and before its to-tensor and normalisation. Every image is corrupted with NumPy's global
generator seeded from (corruption, severity, index of the image in the evaluation set) (:func:`corruption_seed`):
the same bytes every time and the same images for every model with the same preprocessing. The sets are cached in
``<cache>/corruptions/<key>/<corruption>-<severity>.npy`` (``<cache>``: ``LPCONVERT_CACHE``, else
``~/.cache/lpconvert``), the key being the SHA-256 of the clean images' pixels, this scheme's version and the versions
of the library and of the image libraries under it, so that comparing several models corrupts once.

Generated sets are not the published CIFAR-10-C files: the library has ImageNet-C's severity parameters (e.g. Gaussian
noise σ = 0.08…0.38 where CIFAR-10-C uses 0.04…0.10, larger blur kernels), so generated corruptions of 32-px images
are harsher than CIFAR-10-C's at the same severity, and numbers are comparable only among models evaluated the same
way. For figures comparable with published CIFAR-10-C / ImageNet-C results, pass the published files
(:func:`directory_sets`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from lpconvert.errors import LatePhaseError

logger = logging.getLogger(__name__)

__all__ = ["CORRUPTIONS", "EXTRA_CORRUPTIONS", "SEVERITIES", "ArrayImages", "CorruptedSet", "corrupt_image",
           "corruption_seed", "corruption_summary", "directory_sets", "generated_sets", "split_transform"]

#: The 15 corruption types of ImageNet-C / CIFAR-10-C (noise, blur, weather, digital), in the paper's order.
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
#: The 4 held-out ("validation") corruptions of the paper, available on request (``--corruption-types``).
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
LIBRARY = "imagecorruptions-imaug"
_INSTALL = "pip install 'lpconvert[corruptions]'"
_SCHEME = 1  # the version of how images are seeded and corrupted here: part of the cache key
_SEED_ARGUMENT = ("impulse_noise", "glass_blur")  # corruptions that take their own seed instead of NumPy's global one
_TO_TENSOR = ("ToTensor", "MaybeToTensor", "PILToTensor", "MaybePILToTensor")


@dataclass
class CorruptedSet:
    """One corruption at one severity: ``dataset`` yields (x, y) preprocessed for the model."""

    corruption: str
    severity: int
    dataset: Dataset


@functools.cache
def _library() -> Any:
    """The corruption library (looked up once per process), or a one-line error naming the extra to install."""
    try:
        metadata.version(LIBRARY)
        import imagecorruptions
    except (metadata.PackageNotFoundError, ImportError):
        raise LatePhaseError(f"generated corruptions need the {LIBRARY} library (the original imagecorruptions does "
                             f"not run with current scikit-image); install it with {_INSTALL}") from None
    return imagecorruptions


def library_versions() -> dict[str, str]:
    """The versions of the corruption library and of the libraries whose arithmetic decides its output bytes."""
    versions = {}
    for name in (LIBRARY, "scikit-image", "opencv-python", "opencv-python-headless", "scipy", "numpy", "numba"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def check_names(types: Sequence[str] | None, severities: Sequence[int] | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The corruption types (default: the 15) and severities (default 1–5) asked for, checked."""
    types = tuple(types or CORRUPTIONS)
    unknown = [t for t in types if t not in CORRUPTIONS + EXTRA_CORRUPTIONS]
    if unknown:
        raise LatePhaseError(f"unknown corruption type {unknown[0]!r}; choose among {', '.join(CORRUPTIONS)} (and "
                             f"{', '.join(EXTRA_CORRUPTIONS)})")
    severities = tuple(severities or SEVERITIES)
    if any(s not in SEVERITIES for s in severities):
        raise LatePhaseError(f"--severities takes values among 1,2,3,4,5, got {','.join(map(str, severities))}")
    if len(set(types)) != len(types) or len(set(severities)) != len(severities):
        raise LatePhaseError("--corruption-types and --severities must not repeat a value")
    return types, severities


def corruption_seed(corruption: str, severity: int, index: int) -> int:
    """The 32-bit seed of image `index` (its position in the evaluation set) for `corruption` at `severity`: the
    first 4 bytes (little-endian) of SHA-256("corruption/severity/index")."""
    return int.from_bytes(hashlib.sha256(f"{corruption}/{severity}/{index}".encode()).digest()[:4], "little")


def corrupt_image(image: np.ndarray, corruption: str, severity: int, index: int) -> np.ndarray:
    """`image` (H, W, 3) uint8 with `corruption` at `severity` (1–5), seeded by :func:`corruption_seed`: the same
    bytes for the same arguments. NumPy's global random state is restored afterwards."""
    library = _library()
    seed = corruption_seed(corruption, severity, index)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        kwargs = {"seed": seed} if corruption in _SEED_ARGUMENT else {}
        out = library.corrupt(np.ascontiguousarray(image), severity=severity, corruption_name=corruption, **kwargs)
    finally:
        np.random.set_state(state)
    out = np.asarray(out, dtype=np.uint8)
    if out.shape != image.shape:
        raise LatePhaseError(f"{LIBRARY} turned a {image.shape} image into {out.shape} with {corruption}; images of "
                             "this size cannot be corrupted this way, leave that type out (--corruption-types)")
    return out


def split_transform(transform: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(the geometric steps of an evaluation transform, before its to-tensor step; the rest: to-tensor and
    normalisation), from a torchvision ``Compose`` such as timm's ``Resize, CenterCrop, MaybeToTensor, Normalize``."""
    steps = list(getattr(transform, "transforms", ()))
    at = next((i for i, step in enumerate(steps) if type(step).__name__ in _TO_TENSOR), None)
    if at is None:
        raise LatePhaseError("corruptions need an image transform with a to-tensor step (timm's evaluation "
                             f"transform), got {type(transform).__name__}")
    return transforms.Compose(steps[:at]), transforms.Compose(steps[at:])


class ArrayImages(Dataset):
    """(transform(images[i]), labels[i]) for uint8 images (N, H, W, 3), e.g. a memory-mapped ``.npy``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Any], Any]) -> None:
        if len(images) != len(labels):
            raise LatePhaseError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(np.array(self.images[index])), int(self.labels[index])


class _AtInputSize:
    """Published corrupted images that already have the model's input size (ImageNet-C's 224-px crops, CIFAR-10-C's
    32-px images) only get to-tensor and normalisation, as Hendrycks evaluates them; others the whole transform."""

    def __init__(self, transform: Any, size: tuple[int, int]) -> None:
        self.head, self.tail = split_transform(transform)
        self.size = size  # (height, width)

    def __call__(self, image: Any) -> Any:
        height, width = (image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width))
        if (height, width) != self.size:
            image = self.head(Image.fromarray(image) if isinstance(image, np.ndarray) else image)
        return self.tail(image)


# ------------------------------------------------------------------------------------------------ generated sets


class _Uint8(Dataset):
    """The evaluation images after the geometric steps of the transform, as (H, W, 3) uint8 arrays."""

    def __init__(self, dataset: Any, head: Callable[[Any], Any]) -> None:
        self.dataset = copy.copy(dataset)
        self.dataset.transform = head

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.dataset[index]
        return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8), label


class _Jobs(Dataset):
    """Item k: image k mod N corrupted with the (k div N)-th (corruption, severity)."""

    def __init__(self, images: np.ndarray, jobs: Sequence[tuple[str, int]]) -> None:
        self.images, self.jobs = images, list(jobs)

    def __len__(self) -> int:
        return len(self.jobs) * len(self.images)

    def __getitem__(self, k: int) -> np.ndarray:
        job, index = divmod(k, len(self.images))
        return corrupt_image(self.images[index], *self.jobs[job], index)


def _stack(items: list[Any]) -> Any:
    if isinstance(items[0], tuple):
        return np.stack([image for image, _ in items]), np.asarray([label for _, label in items], dtype=np.int64)
    return np.stack(items)


def _cache_root(cache_dir: str | Path | None) -> Path:
    from lpconvert.data.archives import cache_root as root

    return root(cache_dir) / "corruptions"


def _progress(iterable: Any, total: int, description: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description, disable=None, leave=False, unit=" batches")


def clean_images(dataset: Any, transform: Any, *, workers: int = 0,
                 batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, 3) uint8 after the geometric steps of `transform`, labels (N,)) of a labelled image dataset
    (an ImageFolder or Hugging Face split of :func:`lpconvert.data.build_datasets`)."""
    if not hasattr(dataset, "transform"):
        raise LatePhaseError("corruptions are generated from images (an ImageFolder tree or archive, or hfds/NAME), "
                             f"not from a {type(dataset).__name__} of preprocessed tensors such as sklearn-digits")
    head, _ = split_transform(transform)
    loader = DataLoader(_Uint8(dataset, head), batch_size=batch_size, num_workers=workers, collate_fn=_stack)
    parts = list(loader)
    if not parts:
        raise LatePhaseError("the evaluation set is empty: nothing to corrupt")
    try:
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    except ValueError:
        raise LatePhaseError("the evaluation images differ in size after the model's resize and crop; corruptions "
                             "need one size") from None


def cache_key(images: np.ndarray) -> str:
    """SHA-256 of the clean images (shape and pixels), the seeding scheme and the libraries' versions."""
    digest = hashlib.sha256(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).data)
    key = {"images": digest.hexdigest(), "scheme": _SCHEME, "libraries": library_versions()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def generate(images: np.ndarray, jobs: Sequence[tuple[str, int]], folder: Path, *, workers: int = 0,
             batch_size: int = 64) -> float:
    """Corrupt `images` with every (corruption, severity) of `jobs` whose ``folder/<corruption>-<severity>.npy`` is
    missing, and write each set there atomically; the seconds spent (0 when all were cached)."""
    from lpconvert.files import atomic_target

    missing = [job for job in jobs if not (folder / f"{job[0]}-{job[1]}.npy").is_file()]
    if not missing:
        return 0.0
    _library()
    start, n = time.perf_counter(), len(images)
    logger.info("corrupting %d image(s) %d way(s), once; cached in %s", n, len(missing), folder)
    loader = DataLoader(_Jobs(images, missing), batch_size=batch_size, num_workers=workers, collate_fn=_stack)
    current, filled, position = np.empty_like(images), 0, 0
    for batch in _progress(loader, len(loader), f"corrupting {len(missing)} set(s)"):
        while len(batch):
            take = min(len(batch), n - filled)
            current[filled:filled + take], batch, filled = batch[:take], batch[take:], filled + take
            if filled == n:
                corruption, severity = missing[position]
                with atomic_target(folder / f"{corruption}-{severity}.npy") as tmp, open(tmp, "wb") as file:
                    np.save(file, current, allow_pickle=False)
                current, filled, position = np.empty_like(images), 0, position + 1
    return time.perf_counter() - start


def generated_sets(dataset: Any, transform: Any, *, types: Sequence[str] | None = None,
                   severities: Sequence[int] | None = None, workers: int = 0, batch_size: int = 256,
                   cache_dir: str | Path | None = None, create: bool = True) -> tuple[list[CorruptedSet], dict[str, Any]]:
    """The corrupted copies of the evaluation images of `dataset` (with their evaluation `transform`), one per type
    and severity, generated once into the cache (see the module's docstring) unless `create` is false (then they
    must be there). Returns (the sets, {"cache": folder, "seconds": time spent corrupting, "images": N})."""
    types, severities = check_names(types, severities)
    images, labels = clean_images(dataset, transform, workers=workers, batch_size=batch_size)
    folder = _cache_root(cache_dir) / cache_key(images)[:32]
    jobs = [(c, s) for c in types for s in severities]
    seconds = 0.0
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LatePhaseError(f"cannot create the corruption cache {folder}: {exc.strerror or exc}; set "
                                 "LPCONVERT_CACHE to a writable folder") from exc
        from lpconvert.files import atomic_write_json

        if not (folder / "key.json").is_file():
            atomic_write_json(folder / "key.json", {"images": int(len(images)), "shape": list(images.shape[1:]),
                                                   "scheme": _SCHEME, "libraries": library_versions()})
        seconds = generate(images, jobs, folder, workers=workers)
    _, tail = split_transform(transform)
    sets = []
    for corruption, severity in jobs:
        path = folder / f"{corruption}-{severity}.npy"
        if not path.is_file():
            raise LatePhaseError(f"the corrupted set {path} is missing; rerun to generate it")
        sets.append(CorruptedSet(corruption, severity, ArrayImages(np.load(path, mmap_mode="r"), labels, tail)))
    return sets, {"cache": str(folder), "seconds": seconds, "images": int(len(images))}


# ------------------------------------------------------------------------------------------------ published sets


def directory_sets(root: str | Path, transform: Any, *, data_config: Mapping[str, Any], num_classes: int | None,
                   class_map: str | Sequence[str] | None = None, types: Sequence[str] | None = None,
                   severities: Sequence[int] | None = None, subset: int | None = None) -> list[CorruptedSet]:
    """Published corrupted sets in `root`: CIFAR-10-C's arrays (``<corruption>.npy`` of shape (5·n, H, W, 3) uint8,
    severities 1–5 in order, and ``labels.npy``) or ImageNet-C's folders (``<corruption>/<severity>/<class>/<image>``,
    labels as for ``--data``). Without `types`, the 15 types that `root` holds. `subset` keeps that many images of
    each set, stratified (the same images at every severity)."""
    from lpconvert.data import build_datasets, stratified_indices

    root = Path(root).expanduser()
    if not root.is_dir():
        raise LatePhaseError(f"--corruption-dir {root} is not a folder")
    arrays = (root / "labels.npy").is_file()
    present = [c for c in CORRUPTIONS + EXTRA_CORRUPTIONS if (root / (f"{c}.npy" if arrays else c)).exists()]
    if types is None:
        types = [c for c in CORRUPTIONS if c in present]
        if not types:
            raise LatePhaseError(f"--corruption-dir {root} holds none of the 15 corruptions: expected CIFAR-10-C's "
                                 "<corruption>.npy + labels.npy or ImageNet-C's <corruption>/<severity>/<class>/")
    types, severities = check_names(types, severities)
    absent = [c for c in types if c not in present]
    if absent:
        raise LatePhaseError(f"--corruption-dir {root} has no {absent[0]}; leave it out with --corruption-types")
    size = tuple(data_config["input_size"][-2:])
    sets = []
    if arrays:
        labels = np.load(root / "labels.npy", allow_pickle=False)
        for corruption in types:
            images = np.load(root / f"{corruption}.npy", mmap_mode="r", allow_pickle=False)
            n = len(images) // len(SEVERITIES)
            if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n * len(SEVERITIES) or \
                    len(labels) not in (n, len(images)):
                raise LatePhaseError(f"{root / corruption}.npy is not CIFAR-10-C's layout: (5·n, H, W, 3) uint8 with "
                                     f"n or 5·n labels, got {images.shape} {images.dtype} and {len(labels)} labels")
            keep = stratified_indices(labels[:n].tolist(), subset, 0) if subset else list(range(n))
            for severity in severities:
                rows = [(severity - 1) * n + i for i in keep]
                sets.append(CorruptedSet(corruption, severity, ArrayImages(
                    images[rows[0]:rows[-1] + 1] if subset is None else images[rows], labels[np.asarray(keep)],
                    _AtInputSize(transform, size))))
        return sets
    for corruption in types:
        for severity in severities:
            tree = root / corruption / str(severity)
            if not tree.is_dir():
                raise LatePhaseError(f"--corruption-dir: {tree} is missing (ImageNet-C layout "
                                     "<corruption>/<severity>/<class>/<image>); pick --severities it has")
            _, dataset = build_datasets(None, tree, data_config=data_config, num_classes=num_classes,
                                        class_map=class_map or "auto", val_subset=subset)
            dataset.transform = _AtInputSize(transform, size)
            sets.append(CorruptedSet(corruption, severity, dataset))
    return sets


# ------------------------------------------------------------------------------------------------ summaries


def corruption_summary(top1: Mapping[tuple[str, int], float],
                       reference: Mapping[tuple[str, int], float] | None = None) -> dict[str, float]:
    """Accuracy per corruption and severity, per severity, and the mean corruption error, from top-1 accuracies (%)
    keyed by (corruption, severity).

    With E_{c,s} = 100 − top-1_{c,s} (%), C the corruption types and S the severities evaluated:

    * ``corruption/<c>/<s>``: top-1_{c,s}; ``corruption/severity<s>``: (1/|C|) Σ_c top-1_{c,s};
      ``corruption/top1``: the mean top-1 over all |C|·|S| sets;
    * ``mce``: the mean corruption error (1/(|C|·|S|)) Σ_c Σ_s E_{c,s} — the unnormalised mCE of the late-phase
      paper's CIFAR tables (e.g. Table 16), 100 − ``corruption/top1``;
    * with `reference` (the same keys for a reference model): Hendrycks & Dietterich's corruption error
      ``ce/<c>`` = 100 · Σ_s E_{c,s} / Σ_s E^ref_{c,s} and ``mce_ref`` = (1/|C|) Σ_c ``ce/<c>`` (100 = the reference).
    """
    if not top1:
        raise LatePhaseError("no corrupted sets were evaluated")
    types = list(dict.fromkeys(c for c, _ in top1))
    severities = sorted({s for _, s in top1})
    if len(top1) != len(types) * len(severities):
        raise LatePhaseError("every corruption type needs the same severities")
    out = {f"corruption/{c}/{s}": top1[c, s] for c in types for s in severities}
    for s in severities:
        out[f"corruption/severity{s}"] = sum(top1[c, s] for c in types) / len(types)
    out["corruption/top1"] = sum(top1.values()) / len(top1)
    out["mce"] = sum(100.0 - v for v in top1.values()) / len(top1)
    if reference is not None:
        missing = [key for key in top1 if key not in reference]
        if missing:
            raise LatePhaseError(f"the reference has no result for {missing[0][0]} at severity {missing[0][1]}; "
                                 "evaluate it on the same corruptions")
        for c in types:
            ref = sum(100.0 - reference[c, s] for s in severities)
            if ref <= 0:
                raise LatePhaseError(f"the reference makes no error on {c}: the relative corruption error is undefined")
            out[f"ce/{c}"] = 100.0 * sum(100.0 - top1[c, s] for s in severities) / ref
        out["mce_ref"] = sum(out[f"ce/{c}"] for c in types) / len(types)
    return out


def top1_by_set(row: Mapping[str, Any]) -> dict[tuple[str, int], float]:
    """The ``corruption/<c>/<s>`` accuracies of a result row (e.g. of ``lpconvert evaluate --json``), by (c, s)."""
    found = {}
    for key, value in row.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "corruption" and parts[2].isdigit():
            found[parts[1], int(parts[2])] = float(value)
    return found
